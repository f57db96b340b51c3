"""Chapter 9's Triton kernels against mamba_ssm's on one GPU, the same inputs, one run.

    python benchmarks/bench_kernels_gpu.py [--out FILE] [--sweep]

mamba2-130m-shaped heads (24 heads of 64, d_state 128, one group, chunk 256), bfloat16. Each
variant computes `(x, dt, a, B, C) -> (Y, final_state)` with `X = x dt`, `A = dt a`:
- `kernel`: mamba_ssm's `mamba_chunk_scan_combined` (five Triton kernels; it discretises inside);
- `triton`: chapter 9's `ssd_triton(x, dt a, B, C, 256, dt=dt)`: `dt` multiplied in the kernels;
- `front_door`: `mamba2.ssd(x dt, dt a, B, C, 256)` (impl "auto": the same kernels), `x dt` made
  and rounded to bfloat16 first, as the contract `ssd(X, A, B, C)` takes it.
For each: the relative error against chapter 4's `ssd_chunked` in float64, the median time of a
call (`triton.testing.do_bench`), the peak memory above the inputs, and the first call's time
(Triton's compilation). At (8, 4k) also forward + backward (gradients of x, dt, B, C: time,
the same call replayed from a CUDA graph, the CPU's time to issue it) and each kernel's own
time (also at (1, 64k)); `--sweep` times tile sizes (the state passing at every shape).
mamba_ssm comes from its source package (`run_gpu.sh` puts it on the path; no compiled
extension is needed).
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
import time

import torch
import triton
from bench_ssd_gpu import SHAPES, G, H, N, P, Q, graph_ms, make_inputs, peak_mib, rel
from triton.testing import do_bench

import mamba2
from mamba2 import ssd, ssd_chunked
from mamba2.triton_ssd import chunk_outputs, chunk_states, pass_states, ssd_triton


def forget_tuning():
    """mamba_ssm's kernels autotune at their first call and keep that choice for every
    later shape: forget it, so that each shape gets its own."""
    import sys

    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if name.startswith("mamba_ssm"):
            for obj in vars(module).values():
                if isinstance(obj, Autotuner):
                    obj.cache.clear()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="kernels_gpu.json")
    ap.add_argument("--shapes", default="8x1k,8x4k,2x16k,1x64k")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    # the device's copy of the tree may carry a stale .git: MAMBA2_COMMIT says which
    commit = (
        os.environ.get("MAMBA2_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    )
    res = {
        "env": {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "mamba_ssm": __import__("mamba_ssm").__version__,
            "mamba2_commit": commit or "unknown",
        },
        "config": dict(h=H, p=P, n=N, g=G, chunk_size=Q, dtype="bfloat16"),
        "forward": [],
    }
    fns = {
        "kernel": lambda x, dt, a, B, C: mamba_chunk_scan_combined(
            x, dt, a, B, C, chunk_size=Q, return_final_states=True
        ),
        "triton": lambda x, dt, a, B, C: ssd_triton(x, dt * a, B, C, Q, dt=dt),
        "front_door": lambda x, dt, a, B, C: ssd(
            x * dt[..., None].to(x.dtype), dt * a, B, C, Q
        ),
    }
    for shape in args.shapes.split(","):
        b, l = SHAPES[shape]
        forget_tuning()
        x, dt, a, B, C = make_inputs(b, l, torch.bfloat16)
        ref = ssd_chunked(*(t.double() for t in (x * dt[..., None], dt * a, B, C)), Q)
        X, A = x, dt * a
        for name, fn in fns.items():
            r = {"shape": shape, "variant": name, "mamba_ssm_tuned_on": shape}
            t0 = time.perf_counter()
            Y, S = fn(x, dt, a, B, C)
            torch.cuda.synchronize()
            r["first_call_s"] = round(time.perf_counter() - t0, 2)
            r["rel_err_y"], r["rel_err_state"] = rel(Y, ref[0]), rel(S, ref[1])
            del Y, S
            r["ms"] = do_bench(lambda: fn(x, dt, a, B, C), warmup=25, rep=200)
            r["peak_mib"] = round(peak_mib(lambda: fn(x, dt, a, B, C)), 1)
            res["forward"].append(r)
            print(json.dumps(r), flush=True)
        del ref
        torch.cuda.empty_cache()
        if shape in ("8x4k", "1x64k"):
            st, sums, tot = chunk_states(X, A, B, Q, dt)
            entering, _ = pass_states(st, tot, None, X.dtype)
            res.setdefault("kernels_ms_by_shape", {})[shape] = {
                "chunk_states": do_bench(lambda: chunk_states(X, A, B, Q, dt)),
                "pass_states": do_bench(lambda: pass_states(st, tot, None, X.dtype)),
                "chunk_outputs": do_bench(
                    lambda: chunk_outputs(X, B, C, entering, sums, Q, dt)
                ),
            }
            print("kernels", shape, res["kernels_ms_by_shape"][shape], flush=True)
            if shape == "8x4k":  # the chapter's table
                res["kernels_ms"] = res["kernels_ms_by_shape"][shape]
            del st, sums, tot, entering
        if shape == "8x4k":
            res["backward"] = backward(fns, x, dt, a, B, C)
        if args.sweep:
            res.setdefault("sweep", []).extend(sweep(X, A, B, C, dt, shape))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{'shape':6s} {'variant':15s} {'ms':>7s} {'x kernel':>8s} {'MiB':>7s} "
          f"{'x kernel':>8s} {'err y':>8s} {'first s':>7s}")  # fmt: skip
    kern = {r["shape"]: r for r in res["forward"] if r["variant"] == "kernel"}
    for r in res["forward"]:
        k = kern[r["shape"]]
        print(
            f"{r['shape']:6s} {r['variant']:15s} {r['ms']:7.3f} {r['ms'] / k['ms']:8.2f} "
            f"{r['peak_mib']:7.0f} {r['peak_mib'] / max(k['peak_mib'], 1e-9):8.2f} "
            f"{r['rel_err_y']:8.1e} {r['first_call_s']:7.1f}"
        )


def backward(fns, x, dt, a, B, C):
    """Forward + backward at one shape: time, peak memory above the inputs, and the
    gradients' errors against autograd through `ssd_chunked` in float64."""
    dY = torch.randn_like(x)
    ref = [t.detach().double().requires_grad_() for t in (x, dt, B, C)]
    xx, dd, BB, CC = ref
    Y, S = ssd_chunked(xx * dd[..., None], dd * a.double(), BB, CC, Q)
    torch.autograd.backward((Y, S), (dY.double(), torch.zeros_like(S)))
    ref = [t.grad for t in ref]
    del Y, S
    out = {}
    for name in ("kernel", "triton", "front_door"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, dt, B, C)]

        def step(keep=False):
            xx, dd, BB, CC = leaves
            Y, S = fns[name](xx, dd, a, BB, CC)
            torch.autograd.backward((Y, S), (dY, torch.zeros_like(S)))
            grads = [t.grad for t in leaves]
            for t in leaves:
                t.grad = None
            return grads if keep else None

        grads = step(keep=True)
        errors = {k: rel(g, r) for k, g, r in zip(("x", "dt", "B", "C"), grads, ref)}
        del grads
        out[name] = {
            "ms": do_bench(step, warmup=5, rep=50),
            "graph_ms": replayed_ms(step),
            "cpu_ms": cpu_ms(step),
            "peak_mib": round(peak_mib(step), 1),
            "rel_err_grad": errors,
        }
        print("fwd+bwd", name, out[name], flush=True)
    return out


def replayed_ms(step):
    "`bench_ssd_gpu.graph_ms`, or None where `step` cannot be captured in a CUDA graph."
    try:
        return graph_ms(step)
    except RuntimeError as e:  # recorded, not fatal
        print("graph capture failed:", type(e).__name__, str(e)[:100], flush=True)
        return None


def cpu_ms(step, n=20):
    "The CPU's time to issue one call of `step` (the GPU runs behind)."
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    issued = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return 1e3 * issued


def sweep(X, A, B, C, dt, shape):
    """Tile sizes, warps and stages of the kernels at one shape: all three at (8, 4k),
    the state passing alone elsewhere (its programs are few at one long sequence)."""
    rows = []
    if shape == "8x4k":
        for block, warps, stages in itertools.product((32, 64), (2, 4), (1, 2, 3)):
            ms = do_bench(
                lambda: chunk_states(
                    X, A, B, Q, dt, block=block, warps=warps, stages=stages
                )
            )
            rows.append(
                dict(kernel="chunk_states", block=block, warps=warps, stages=stages,
                     ms=ms, shape=shape)
            )  # fmt: skip
    st, sums, tot = chunk_states(X, A, B, Q, dt)
    for block, warps in itertools.product((64, 128, 256, 512), (1, 2, 4)):
        ms = do_bench(
            lambda: pass_states(st, tot, None, X.dtype, block=block, warps=warps)
        )
        rows.append(
            dict(kernel="pass_states", block=block, warps=warps, ms=ms, shape=shape)
        )
    if shape != "8x4k":
        return rows
    st, _ = pass_states(st, tot, None, X.dtype)
    knobs = itertools.product((64, 128), (16, 32, 64), (4, 8), (2, 3, 4))
    for block, cols, warps, stages in knobs:
        if cols > block:
            continue
        try:
            ms = do_bench(
                lambda: chunk_outputs(
                    X,
                    B,
                    C,
                    st,
                    sums,
                    Q,
                    dt,
                    block=block,
                    cols=cols,
                    warps=warps,
                    stages=stages,
                )  # fmt: skip
            )
        except Exception as e:  # out of shared memory or registers
            ms = f"{type(e).__name__}"
        rows.append(
            dict(kernel="chunk_outputs", block=block, cols=cols, warps=warps,
                 stages=stages, ms=ms, shape=shape)
        )  # fmt: skip
    for r in rows:
        print("sweep", r, flush=True)
    return rows


if __name__ == "__main__":
    assert mamba2 and torch.cuda.is_available()
    main()
