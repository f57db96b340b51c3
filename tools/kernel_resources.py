"""Registers, spills and shared memory of chapter 9's forward kernels on an H100 or H200
(sm_90), compiled on any machine: no GPU is needed, only Triton with its own ptxas and
cuobjdump.

    python tools/kernel_resources.py [--block 64] [--cols 32] [--warps 4] [--stages 3]

At the 130M model's shape (24 heads of 64, d_state 128, chunks of 256), bfloat16, `dt`
given. What fits on a multiprocessor (65,536 registers, 228 KiB of shared memory) bounds
how many programs run at once; the GPU suite measures what that is worth. The numbers come
from the local Triton, which may compile differently from the GPU machine's.
"""

import argparse
import os
import re
import subprocess
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mamba2 import triton_ssd as k  # noqa: E402

b, l, h, p, n, Q = 8, 4096, 24, 64, 128, 256
SIZES = dict(l=l, h=h, r=h, p=p, n=n, Q=Q, n_chunks=l // Q, lo_at=b * h * l, pn=p * n)
# each tensor the kernels read through strides: its axes and shape, contiguous (the dots'
# are kernel 3's backward output, (k, t, b, h, l))
LAYOUTS = {
    "x y w": ("blhp", (b, l, h, p)),
    "b c": ("blgn", (b, l, 1, n)),
    "a d": ("blh", (b, l, h)),
    "o": ("ktbhl", (2, 1, b, h, l)),
}
STRIDES = {
    f"s{t}_{axis}": stride
    for names, (axes, shape) in LAYOUTS.items()
    for t in names.split()
    for axis, stride in zip(axes, torch.empty(shape, device="meta").stride())
}
HALF = ("X", "B", "C", "Y", "W", "entering")  # bfloat16; the other pointers float32


def resources(fn, constants: dict, warps: int, stages: int) -> str:
    "Compile `fn` for sm_90, as Triton specialises it at the shape above."
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = constants.get(name, SIZES.get(name, STRIDES.get(name)))
        if name in constants or value == 1:  # Triton makes 1 a constant too
            sig[name], consts[(i,)] = "constexpr", value
        elif value is None:  # a pointer, aligned to 16 bytes
            sig[name] = "*bf16" if name in HALF else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(fn, sig, consts, attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{fn.__name__}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run(
        [cuobjdump, "-res-usage", path], capture_output=True, text=True
    )
    regs, stack = (
        re.search(rf"{key}:(\d+)", usage.stdout)[1] for key in ("REG", "STACK")
    )
    shared = compiled.metadata.shared / 1024
    return f"{regs} registers, {stack} bytes spilled, {shared:.1f} KiB shared"


def main():
    ap = argparse.ArgumentParser()
    for knob, default in (("block", 64), ("cols", 32), ("warps", 4), ("stages", 3)):
        ap.add_argument(f"--{knob}", type=int, default=default)
    args = ap.parse_args()
    types = dict(ACC=tl.float32, DOT=tl.bfloat16, PRECISION="tf32")
    sums = dict(BLOCK_S=128, BLOCK_H=16, ACC=tl.float32, HAS_DT=True)
    print("kernel 1's running sums, 128 tokens by 16 heads, 4 warps:", end=" ")
    print(resources(k.chunk_sums_kernel, sums, 4, 1))
    states = dict(BLOCK_S=64, BLOCK_P=64, BLOCK_N=128, SPLIT_LAST=True, **types)
    print("kernel 1's states, blocks of 64, 4 warps, 2 stages:", end=" ")
    print(resources(k.chunk_states_kernel, states, 4, 2))
    outputs = dict(
        BLOCK_L=args.block, BLOCK_S=args.cols, BLOCK_P=64, BLOCK_N=128, HAS_DT=True,
        ROW_DT=False, STORE_Y=True, HAS_W=False, STATE_DOTS=False, PAIRS=False, **types,
    )  # fmt: skip
    print(
        f"kernel 3, blocks of {args.block} rows and {args.cols} columns, "
        f"{args.warps} warps, {args.stages} stages:",
        resources(k.chunk_outputs_kernel, outputs, args.warps, args.stages),
    )


if __name__ == "__main__":
    main()
