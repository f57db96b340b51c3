"""A check in a Python process of its own, for what cannot be undone in this one; and
whether this one runs Triton's kernels interpreted, which is decided once, at its start."""

import os
import subprocess
import sys

# conftest.py switches the interpreter on where there is no GPU
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# where chapters 9 and 10's kernels run the tests' tensors: the GPU, unless interpreted
KERNELS_DEVICE = "cpu" if INTERPRETED else "cuda"
INTERPRETER_ONLY = (
    "these checks feed CPU tensors to the kernels, which only Triton's interpreter runs "
    "(on where there is no GPU); with a GPU, tests/test_chunked.py runs chapter 9's "
    "kernels and tests/test_decode.py chapter 10's on it"
)


def run_without_triton(code: str) -> str:
    "Run `code` in a new Python where Triton cannot be imported; return what it printed."
    hidden = "import sys; sys.modules['triton'] = None\n"  # as if it were not installed
    out = subprocess.run(
        [sys.executable, "-c", hidden + code],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
