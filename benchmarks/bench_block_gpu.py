"""The Mamba-2 block on one GPU: ours beside mamba_ssm's `Mamba2` layer, the same weights, one run.

    python benchmarks/bench_block_gpu.py [--out FILE] [--shapes 8x1k,8x4k,1x64k]

Layer 0 of a mamba2-130m-shaped model (d_model 768, 24 heads of 64, d_state 128, one group, chunk
256), bfloat16, random weights made by mamba_ssm and loaded into ours (`bench_decode_gpu.py` builds
both). mamba_ssm's layer runs without `causal_conv1d` (absent: nn.Conv1d) and with
`use_mem_eff_path=False`, as in the issue's measurements. For each shape: forward time (median of
`triton.testing.do_bench`) and peak memory above the inputs for mamba_ssm, ours eager (`impl`
"auto": chapter 9's kernels on CUDA) and ours compiled once for every length
(`torch.compile(block, dynamic=True)`: the first call's time apart, then a second length under
`fail_on_recompile`); forward + backward at (8, 4k); ours against theirs as a relative error.
"""

import argparse
import json
import time

import torch
from bench_decode_gpu import env_info, import_mamba_ssm
from bench_kernels_gpu import forget_tuning
from bench_ssd_gpu import SHAPES, peak_mib, rel
from triton.testing import do_bench

import mamba2
from mamba2 import Mamba2


def build():
    "Layer 0 of each model, the same weights."
    import bench_decode_gpu as dec

    dec.N_LAYER = 1
    ours, theirs, why = dec.build_models(torch.bfloat16)
    assert theirs is not None, why
    mine = next(m for m in ours.modules() if isinstance(m, Mamba2))
    other = next(
        m for m in theirs.modules() if type(m).__name__ == "Mamba2" and m is not mine
    )
    return mine.train(), other.train()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="block_gpu.json")
    ap.add_argument("--shapes", default="8x1k,8x4k,1x64k")
    ap.add_argument("--backward", default="8x4k")
    args = ap.parse_args()
    import_mamba_ssm()
    ours, theirs = build()
    # one graph for every length; the SSD in it is chapter 9's kernels, a custom operator
    compiled = torch.compile(ours, dynamic=True)
    res = {"env": env_info(), "forward": [], "backward": []}
    res["env"]["mamba2_file"] = mamba2.__file__
    for shape in args.shapes.split(","):
        b, l = SHAPES[shape]
        forget_tuning()  # mamba_ssm's kernels: tuned for this shape
        u = torch.randn(b, l, 768, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = theirs(u)
            for name, fn in (
                ("mamba_ssm", theirs),
                ("eager", ours),
                ("compiled", compiled),
            ):
                r = {"shape": shape, "variant": name}
                t0 = time.perf_counter()
                y = fn(u)
                torch.cuda.synchronize()
                r["first_call_s"] = round(time.perf_counter() - t0, 2)
                r["rel_err_vs_mamba_ssm"] = rel(y, ref)
                del y
                r["ms"] = do_bench(lambda: fn(u), warmup=10, rep=100)
                r["peak_mib"] = round(peak_mib(lambda: fn(u)), 1)
                if name == "compiled":  # another length: no new graph
                    with torch.compiler.set_stance("fail_on_recompile"):
                        try:
                            # a new tensor: a slice's strides are another guard, and
                            # at batch 1 .contiguous() and .clone() keep them
                            fn(
                                torch.randn(
                                    b, l - 37, 768, device="cuda", dtype=u.dtype
                                )
                            )
                            r["second_length_recompiled"] = False
                        except Exception as e:
                            r["second_length_recompiled"] = (
                                f"{type(e).__name__}: {str(e)[:400]}"
                            )
                res["forward"].append(r)
                print(json.dumps(r), flush=True)
        if shape in args.backward.split(","):
            dy = torch.randn_like(u)
            for name, fn in (
                ("mamba_ssm", theirs),
                ("eager", ours),
                ("compiled", compiled),
            ):
                leaf = u.detach().clone().requires_grad_()

                def step():
                    fn(leaf).backward(dy)
                    leaf.grad = None
                    for p in (theirs if name == "mamba_ssm" else ours).parameters():
                        p.grad = None

                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                r = {"shape": shape, "variant": name}
                r["first_call_s"] = round(time.perf_counter() - t0, 2)
                r["ms"] = do_bench(step, warmup=5, rep=50)
                r["peak_mib"] = round(peak_mib(step), 1)
                res["backward"].append(r)
                print("fwd+bwd", json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    for part in ("forward", "backward"):
        base = {r["shape"]: r for r in res[part] if r["variant"] == "mamba_ssm"}
        for r in res[part]:
            k = base[r["shape"]]
            print(
                f"{part:8s} {r['shape']:6s} {r['variant']:9s} {r['ms']:8.3f} ms "
                f"{r['ms'] / k['ms']:5.2f}x  {r['peak_mib']:8.0f} MiB "
                f"{r['peak_mib'] / max(k['peak_mib'], 1e-9):5.2f}x  "
                f"first {r['first_call_s']:.1f} s"
            )


if __name__ == "__main__":
    main()
