"""What eager `ssd_fast` cannot avoid on one GPU: the cost of each elementwise pass it needs, at (8, 4k).

Run by `benchmarks/run_gpu.sh` (PARTS=passes). Chapter 8 reads the results to bound eager PyTorch's GPU
time for the design of `ssd_fast` from below. Every pass is one PyTorch operation on tensors of the
suite's shapes (h=24, p=64, n=128, Q=256, bf16 inputs, decays float32, diagonal blocks of `ssd_fast`'s
default `block`, 64 tokens), timed alone as GPU time (the median replay of a CUDA graph of it), beside
the same run's GPU times of mamba_ssm's kernel and of eager `mamba2.ssd` (impl="auto": `ssd_fast`), and
the FLOPs of that call's matrix products, which chapter 8 converts at the measured bf16 rate.
"""

import argparse
import inspect
import json
import math

import torch
from bench_ssd_gpu import H, P, Q, ceilings, env_info, graph_ms, make_inputs
from torch.utils.flop_counter import FlopCounterMode

import mamba2
from mamba2.chunked import chunk_inputs
from mamba2.decays import chunk_cumsum
from mamba2.fast import mul_to, ssd_fast
from mamba2.quadratic import per_token, split_heads

BLOCK = (
    inspect.signature(ssd_fast).parameters["block"].default
)  # ssd_fast's eager block: 64


def passes(X, A, B, C, q=BLOCK):
    "The passes, each a zero-argument callable on tensors laid out as `ssd_fast` lays them out."
    Xc, Ac, *_ = chunk_inputs(X, A, B, C, Q)  # (b, c, Q, ...)
    Xc, S = split_heads(
        Xc, chunk_cumsum(Ac, dim=2).float(), 1
    )  # (b, c, Q, g, r, p), (b, c, g, r, Q)
    decay = per_token(torch.exp(S[..., -1:] - S))  # (b, c, Q, g, r, 1), float32
    Sb = S.unflatten(-1, (Q // q, q)).movedim(-2, 2).contiguous()  # (b, c, k, g, r, q)
    outer = lambda: (
        Sb[..., :, None] - Sb[..., None, :]
    )  # the decays' outer difference, float32
    L = outer()  # the per-head scores, before the passes below
    CB = torch.randn(
        L.shape[:4] + (1, q, q), device=X.device, dtype=X.dtype
    )  # shared by the heads of a group
    causal = torch.ones(q, q, dtype=torch.bool, device=X.device).tril()
    Xh = Xc.unflatten(2, (Q // q, q)).movedim(3, -2)  # (b, c, k, g, r, q, p) view
    permute = lambda: Xh.contiguous()  # X head-major, for the per-head products
    M, Xh_copy, Y = mul_to(L, CB, X.dtype), permute(), Xc.clone()
    return {
        "copy": lambda: Y.copy_(Xc),  # the plain pass: contiguous, one dtype
        "token": lambda: mul_to(
            Xc, decay, X.dtype, overwrite=True
        ),  # X times a float32 decay per token and head
        "token_bf16": lambda: (
            Xc * decay.to(X.dtype)
        ),  # the same with the decay rounded to bf16
        "accumulate": lambda: torch.addcmul(
            Y, Xc, decay
        ),  # the output plus a decayed term, in float32
        "permute": permute,
        "outer": outer,  # scores: the decays' outer difference
        "mask": lambda: L.masked_fill_(~causal, -math.inf),  # above the diagonal
        "exp": lambda: L.exp_(),
        "weight": lambda: mul_to(
            L, CB, X.dtype, overwrite=True
        ),  # times C B^T, rounded to bf16 once
        "product": lambda: M @ Xh_copy,  # the diagonal blocks' products
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="passes_gpu.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    x, dt, a, B, C = make_inputs(8, 4096, torch.bfloat16)
    X, A = x * dt[..., None].to(x.dtype), dt * a
    res = {
        "env": env_info(),
        "shape": dict(b=8, l=4096, h=H, p=P, chunk_size=Q, block=BLOCK),
        "ceilings": ceilings(),
    }
    res["us"] = {k: graph_ms(fn) * 1e3 for k, fn in passes(X, A, B, C).items()}
    with torch.no_grad():
        eager = lambda: mamba2.ssd(X, A, B, C, Q)  # impl="auto": ssd_fast
        res["us"]["eager"] = graph_ms(eager) * 1e3
        with FlopCounterMode(display=False) as flops:
            eager()
        res["eager_flops"] = flops.get_total_flops()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    res["us"]["kernel"] = (
        graph_ms(
            lambda: mamba_chunk_scan_combined(
                x, dt, a, B, C, chunk_size=Q, return_final_states=True
            )
        )
        * 1e3
    )
    json.dump(res, open(args.out, "w"), indent=1)
    print(json.dumps(res["us"], indent=1), res["eager_flops"], res["ceilings"])


if __name__ == "__main__":
    main()
