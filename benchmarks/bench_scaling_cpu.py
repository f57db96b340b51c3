"""Time and peak memory of the three SSD algorithms against the sequence length, on the CPU in float32.

`ssd_scan` (one token at a time), `ssd_quadratic` (the whole (l, l) matrix), `ssd` (the front door,
impl="auto": `ssd_fast`) and `ssd_chunked` (impl="chunked", chapter 4's plain algorithm), on
mamba2-130m-shaped heads (h=24, p=64, n=128, g=1, chunk 256) unless told otherwise; each length runs
the algorithms that fit (`--max-quadratic`, `--max-scan`). Peak memory is the growth of the process's
resident set during the call (VmHWM after resetting it); run with `MALLOC_MMAP_THRESHOLD_=65536` so
that freed tensors go back to the system at once (`run_cpu.sh` does). The ratio of the time (memory) at
the longest length to the shortest, over the ratio of the lengths, is 1 for linear scaling.
Usage: `python benchmarks/bench_scaling_cpu.py --lengths 1024,4096,16384 --out scaling_cpu.json`.
"""

import argparse
import json

import torch
from bench_model import peak_mib, timer
from bench_ssd_gpu import env_info


def inputs(l, h, p, n, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(1, l, h, generator=gen) - 4)
    X = torch.randn(1, l, h, p, generator=gen) * dt[..., None]
    A = dt * -torch.empty(h).uniform_(1, 16, generator=gen)
    B, C = (torch.randn(1, l, g, n, generator=gen) for _ in range(2))
    return X, A, B, C


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--heads", default="24,64,128,1", help="h,p,n,g")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--max-quadratic", type=int, default=4096)
    ap.add_argument("--max-scan", type=int, default=16384)
    ap.add_argument("--max-chunked", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="scaling_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import mamba2

    h, p, n, g = map(int, args.heads.split(","))
    algos = {
        "scan": mamba2.ssd_scan,
        "quadratic": mamba2.ssd_quadratic,
        "ssd": lambda *a: mamba2.ssd(*a, args.chunk_size, impl="auto"),
        "ssd_chunked": lambda *a: mamba2.ssd(*a, args.chunk_size, impl="chunked"),
    }
    longest = {
        "scan": args.max_scan,
        "quadratic": args.max_quadratic,
        "ssd_chunked": args.max_chunked,
    }
    t = timer("cpu")
    res = {
        "env": {**env_info(), "torch_threads": torch.get_num_threads()},
        "config": vars(args),
        "results": [],
    }
    with torch.inference_mode():
        for l in map(int, args.lengths.split(",")):
            X, A, B, C = inputs(l, h, p, n, g)
            for name, fn in algos.items():
                if l > longest.get(name, l):
                    continue
                r = {
                    "algo": name,
                    "l": l,
                    "s": t(lambda: fn(X, A, B, C), args.reps if name != "scan" else 1),
                    "peak_mib": peak_mib(lambda: fn(X, A, B, C), "cpu"),
                }
                res["results"].append(r)
                print(json.dumps(r), flush=True)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
    for name in algos:
        rs = [r for r in res["results"] if r["algo"] == name]
        if len(rs) > 1:
            lo, hi = rs[0], rs[-1]
            k = hi["l"] / lo["l"]
            print(
                f"{name:10s} l {lo['l']}->{hi['l']} (x{k:.0f}): time x{hi['s'] / lo['s']:.1f}, memory x{hi['peak_mib'] / max(lo['peak_mib'], 1e-9):.1f}"
            )


if __name__ == "__main__":
    main()
