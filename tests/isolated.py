"""A check in a Python process of its own, for what cannot be undone in this one; and
whether this one runs Triton's kernels interpreted, which is decided once, at its start."""

import os
import subprocess
import sys

import torch

# conftest.py switches the interpreter on where there is no GPU
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# where chapters 9 and 10's kernels run the tests' tensors: the GPU, unless interpreted
KERNELS_DEVICE = "cpu" if INTERPRETED else "cuda"
# neither: TRITON_INTERPRET=0 set by hand on a machine without a GPU
NO_KERNELS = "the kernels need a GPU or Triton's interpreter (TRITON_INTERPRET=1)"
KERNELS_RUN = INTERPRETED or torch.cuda.is_available()
INTERPRETER_ONLY = (
    "these checks are of a CPU model, whose step runs the kernels only in Triton's "
    "interpreter (on where there is no GPU)"
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
