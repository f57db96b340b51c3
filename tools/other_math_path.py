"""Print environment settings that put this CPU's math libraries on another code path.

    env $(python tools/other_math_path.py) python -m pytest tests book

Results of different computations (another row count, order of operations, or kernel) may differ
in the last bits from one CPU to the next: a one-row and a many-row matrix product agree bit for
bit on one processor and not on another. A check that compares them bitwise passes on the machine
that wrote it and fails on a reader's. CI runs the tests a second time with the settings printed
here, so that such a check fails on CI's machine too. Each candidate is tried in a fresh process,
and the first that changes the bits of a few products, exponentials and sums is printed:

- MKL_ENABLE_INSTRUCTIONS caps the instruction set of MKL's matrix products, and
- ATEN_CPU_CAPABILITY that of PyTorch's own vectorised kernels.

Exits with status 1, printing the last candidate, when none changes anything on this machine.
"""

import os
import subprocess
import sys

PROBE = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
a, b, x = torch.randn(64, 300, generator=g), torch.randn(300, 96, generator=g), torch.randn(4099, generator=g)
out = (a @ b, a[:1] @ b, a[:7] @ b, x.exp(), x.sum(0, keepdim=True), x.softmax(0))
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in out)).hexdigest())
"""
CANDIDATES = [
    {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},  # AVX-512 CPUs
    {
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ATEN_CPU_CAPABILITY": "default",
    },  # AVX2 CPUs
]


def fingerprint(settings):
    "A hash of the probe's results, computed in a fresh process with `settings` in its environment."
    env = {k: v for k, v in os.environ.items() if k not in CANDIDATES[0]}
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**env, **settings},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def main():
    base = fingerprint({})
    for settings in CANDIDATES:
        if fingerprint(settings) != base:
            print(" ".join(f"{k}={v}" for k, v in settings.items()))
            return 0
    print(" ".join(f"{k}={v}" for k, v in CANDIDATES[-1].items()))
    print(
        "no candidate changes a bit of the probe's results on this CPU", file=sys.stderr
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
