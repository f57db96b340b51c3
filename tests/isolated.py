"""A check in a Python process of its own, for what cannot be undone in this one."""

import subprocess
import sys


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
