"""The block on one GPU, eager, bf16, mamba2-130m-shaped: one pass over the whole sequence (no segments).

    python benchmarks/check_block_gpu.py [--shapes 1x65536,8x4096,8x1024] [--impls auto,chunked]

Prints the median time per call (CUDA events, after warm-up) and the peak memory of each shape.
"""

import argparse
import json
import statistics

import torch

from mamba2 import Mamba2, Mamba2Config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x65536,8x4096,8x1024")
    ap.add_argument("--impls", default="auto,chunked")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    results = []
    for impl in args.impls.split(","):
        torch.manual_seed(0)
        block = Mamba2(
            Mamba2Config(d_model=768, impl=impl), device="cuda", dtype=torch.bfloat16
        ).eval()
        for shape in args.shapes.split(","):
            b, l = map(int, shape.split("x"))
            u = torch.randn(b, l, 768, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                for _ in range(3):
                    block(u)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times = []
                for _ in range(args.reps):
                    start, end = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    start.record()
                    block(u)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            row = dict(
                impl=impl,
                shape=shape,
                ms=statistics.median(times),
                peak_mib=round(peak, 1),
            )
            print(json.dumps(row), flush=True)
            results.append(row)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
