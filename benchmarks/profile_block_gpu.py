"""Where the eager block's time goes: torch.profiler over the block's forward.

A mamba2-130m-shaped block (d_model 768, 24 heads of 64, d_state 128, one group, chunk 256),
random weights, eager, forward only under `torch.inference_mode()`, at each shape of
`--shapes` (default (8, 1k) and (8, 4k)). For each shape it prints and saves to `--out`:
- `kernels`: the top kernels by GPU time (`--device cuda`), or the top operators by self CPU
  time (`--device cpu`, a check of this script), per forward;
- `kernels_per_forward`: the kernels launched per forward (on a CPU: the operators that run no
  other operator, the ones that would be kernels on a GPU);
- `ops_per_forward`: the ATen operators that compute (views and allocations left out) per
  forward, counted at the dispatcher on the meta device, which takes a GPU's path (one pass):
  on any machine, about the kernels a GPU launches;
- `mib_written_per_forward`: what those operators write (their outputs' bytes), per forward;
- `gpu_ms_per_forward` (sum of the kernels' times) and `wall_ms_per_forward`.
Usage: `python benchmarks/profile_block_gpu.py --out benchmarks/results/profile_block_gpu.json`
(on a CPU: `--device cpu --dtype float32 --shapes 2x512`).
"""

import argparse
import collections
import json
import time

import torch
from bench_ssd_gpu import env_info
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import mamba2

# operators that launch no kernel: allocation without a fill, metadata
NO_WORK = {
    "empty",
    "empty_like",
    "new_empty",
    "empty_strided",
    "detach",
    "_unsafe_view",
}
NO_WORK |= {"promote_types", "result_type", "lift_fresh", "_local_scalar_dense"}


class CountOps(TorchDispatchMode):
    "Counts the ATen operators that compute something: views and allocations left out."

    def __init__(self):
        super().__init__()
        self.counts, self.bytes = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        view = any(
            r.alias_info is not None and not r.alias_info.is_write
            for r in func._schema.returns
        )
        out = func(*args, **(kwargs or {}))
        if not view and name not in NO_WORK:
            self.counts[name] += 1
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes[name] += t.numel() * t.element_size()
        return out


def count_ops(config, b, l, dtype) -> CountOps:
    """Operators per forward of a block at `(b, l)` and the bytes they write, on the meta
    device: no arithmetic, and the path a GPU takes (one pass, no CPU segments)."""
    torch.manual_seed(0)
    block = mamba2.Mamba2(config, device="meta", dtype=dtype)
    u = torch.empty(b, l, config.d_model, device="meta", dtype=dtype)
    with torch.no_grad(), CountOps() as counter:
        block(u)
    return counter


def kernel_events(prof, device):
    "The profiler's events that are kernels (CUDA), or operators that call no other (CPU)."
    events = prof.events()
    if device == "cuda":
        return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and not e.cpu_children
    ]


def event_us(e, device):
    "A kernel's GPU time, or an operator's CPU time, in microseconds."
    return e.time_range.elapsed_us()


def profile_shape(block, b, l, device, dtype, reps, top):
    u = torch.randn(
        b, l, block.config.d_model, device=device, dtype=dtype,
        generator=torch.Generator(device).manual_seed(0),
    )  # fmt: skip
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: allocator, cuBLAS handles, lazy inits
            block(u)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            block(u)
        sync()
        wall_ms = (time.perf_counter() - t0) / reps * 1e3
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device == "cuda" else []
        )
        with profile(activities=activities) as prof:
            for _ in range(reps):
                block(u)
            sync()
    events = kernel_events(prof, device)
    per_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        per_name[e.name][0] += event_us(e, device)
        per_name[e.name][1] += 1
    total_us = sum(t for t, _ in per_name.values())
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    ops = count_ops(block.config, b, l, dtype)
    return {
        "shape": f"{b}x{l}",
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "forwards_profiled": reps,
        "wall_ms_per_forward": round(wall_ms, 3),
        ("gpu_ms_per_forward" if device == "cuda" else "cpu_ms_per_forward"): round(
            total_us / reps / 1e3, 3
        ),
        "kernels_per_forward": len(events) / reps,
        "ops_per_forward": sum(ops.counts.values()),
        "ops": dict(ops.counts.most_common()),
        "mib_written_per_forward": round(sum(ops.bytes.values()) / 2**20, 1),
        "mib_written": {k: round(v / 2**20, 1) for k, v in ops.bytes.most_common()},
        "kernels": [
            {
                "name": name[:160],
                "ms_per_forward": round(t / reps / 1e3, 4),
                "share": round(t / max(total_us, 1e-9), 4),
                "calls_per_forward": n / reps,
            }
            for name, (t, n) in rows[:top]
        ],
    }


def show(r):
    time_key = "gpu_ms_per_forward" if r["device"] == "cuda" else "cpu_ms_per_forward"
    print(
        f"== block forward {r['shape']} {r['dtype']} on {r['device']}: "
        f"wall {r['wall_ms_per_forward']:.2f} ms, {time_key} {r[time_key]:.2f} ms, "
        f"{r['kernels_per_forward']:.0f} kernels, {r['ops_per_forward']} ops per forward, "
        f"{r['mib_written_per_forward']:.0f} MiB written"
    )
    for k in r["kernels"]:
        print(
            f"{k['ms_per_forward']:9.3f} ms {k['share']:6.1%} "
            f"{k['calls_per_forward']:5.1f}x  {k['name'][:90]}"
        )
    print("ops:", ", ".join(f"{n} {c}" for n, c in r["ops"].items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 (cuda), float32")
    ap.add_argument(
        "--shapes", default="8x1024,8x4096", help="(b)x(l), comma-separated"
    )
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--reps", type=int, default=5, help="forwards profiled per shape")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per shape")
    ap.add_argument("--out", default="profile_block_gpu.json")
    args = ap.parse_args()
    device = args.device
    dtype = getattr(
        torch, args.dtype or ("bfloat16" if device == "cuda" else "float32")
    )
    config = mamba2.Mamba2Config(
        d_model=args.d_model, d_state=128, headdim=64, ngroups=1, chunk_size=256
    )
    torch.manual_seed(0)
    block = mamba2.Mamba2(config, device=device, dtype=dtype).eval()
    res = {
        "env": env_info(),
        "config": {
            "d_model": config.d_model,
            "nheads": config.nheads,
            "headdim": config.headdim,
            "d_state": config.d_state,
            "ngroups": config.ngroups,
            "chunk_size": config.chunk_size,
            "impl": config.impl,
            "dtype": str(dtype).replace("torch.", ""),
        },
        "results": [],
    }
    for shape in args.shapes.split(","):
        b, l = map(int, shape.split("x"))
        try:
            r = profile_shape(block, b, l, device, dtype, args.reps, args.top)
            show(r)
        except Exception as e:  # keep the other shapes
            r = {"shape": shape, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(r, flush=True)
        res["results"].append(r)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
