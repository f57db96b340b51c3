"""Greedy decoding on one GPU: our step launched kernel by kernel, and replayed from a CUDA graph.

    python benchmarks/bench_decode_gpu.py [--batches 1,16] [--new 128] [--out FILE]

A mamba2-130m-shaped model with random weights (24 layers, d_model 768), bfloat16, a 64-token prompt,
`--new` new tokens; tokens/s of the whole `generate` call after a warm-up call, median of 3 runs.
"""

import argparse
import json
import statistics
import time

import torch

from mamba2 import Mamba2Config, Mamba2LMHeadModel


def tokens_per_s(model, ids, new, graph):
    model.generate(ids, 4, temperature=0, cuda_graph=graph)  # warm-up (and capture)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, new, temperature=0, cuda_graph=graph)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return ids.shape[0] * new / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(
        Mamba2Config(d_model=768, n_layer=24), device="cuda", dtype=torch.bfloat16
    ).eval()
    rows = []
    for b in map(int, args.batches.split(",")):
        ids = torch.randint(0, 50277, (b, 64), device="cuda")
        same = torch.equal(
            model.generate(ids, 32, temperature=0, cuda_graph=False),
            model.generate(ids, 32, temperature=0, cuda_graph=True),
        )
        row = dict(
            batch=b,
            eager_tok_s=round(tokens_per_s(model, ids, args.new, False), 1),
            graph_tok_s=round(tokens_per_s(model, ids, args.new, True), 1),
            same_greedy_tokens=same,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    print(json.dumps(env))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
