"""Reproduces the fault that kept chapter 9's kernels out of compiled code until they became
custom operators (see chapter 9, "Under torch.compile"): a bfloat16 block compiled by Inductor,
with its SSD behind a graph break, returns wrong values, although the SSD's own output is right.
Runs on a CPU in seconds.

    python benchmarks/repro_compile_break.py

Prints the relative error of the compiled block against the eager one for each backend: about
1e-2 or less is bfloat16 rounding; about 1 is the fault (seen with Inductor, torch 2.13 CPU and
torch 2.11 on an H200; aot_eager is right). The SSD here is `ssd_fast` (PyTorch) behind
`torch.compiler.disable`, standing in for a kernel launcher that Dynamo cannot trace.
"""

import sys

import torch

import mamba2.ssd  # noqa: F401  (the module, for its IMPLEMENTATIONS)
from mamba2 import Mamba2, Mamba2Config
from mamba2.fast import ssd_fast

front = sys.modules["mamba2.ssd"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    torch.manual_seed(0)
    cfg = Mamba2Config(
        d_model=64, d_state=16, headdim=16, chunk_size=32, impl="chunked"
    )
    block = Mamba2(cfg, dtype=torch.bfloat16)
    u = torch.randn(2, 100, 64, dtype=torch.bfloat16)
    # the SSD behind a graph break, as an untraceable kernel would be
    front.IMPLEMENTATIONS["chunked"] = torch.compiler.disable(ssd_fast)
    with torch.no_grad():
        eager = block(u)
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            compiled = torch.compile(block, dynamic=True, backend=backend)(u)
            print(
                f"{backend:10s} relative error against eager {rel(compiled, eager):.1e}"
            )


if __name__ == "__main__":
    main()
