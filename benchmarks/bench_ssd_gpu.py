"""SSD on one GPU: `mamba2.ssd` (eager and torch.compile) against mamba_ssm's Triton kernel and other peers.

Run by `benchmarks/run_gpu.sh`. Needs a CUDA GPU, Triton, and mamba_ssm's Python sources on the path
(its Triton SSD kernels need no compiled extension: `run_gpu.sh` puts a stub `mamba_ssm/__init__.py` in
front of the source package so that the CUDA extensions are never imported).

Every variant computes the same function from the same inputs, `(x, dt, a, B, C) -> (Y, final_state)`
with `X = x * dt` and `A = dt * a` (the kernel discretizes inside, so ours does too, inside the timing):
- `kernel`: mamba_ssm's `mamba_chunk_scan_combined`;
- `minimal`: the paper's listing (mamba_ssm's `ssd_minimal_discrete`);
- `hf`: transformers' pure-PyTorch `mamba2_chunk_scan`;
- `ssd`: `mamba2.ssd(..., impl="auto")`, the front door (on a GPU with Triton: chapter 9's
  kernels; the results files written before them: `ssd_fast`);
- `fast`: `mamba2.ssd(..., impl="fast")`, chapter 8's tuned PyTorch (`ssd_fast`);
- `ssd_chunked`: `mamba2.ssd(..., impl="chunked")`, chapter 4's plain algorithm;
- `NAME_compiled`: `torch.compile(NAME, dynamic=False)`, compiled once per shape; with `--dynamic`,
  `torch.compile(NAME)` compiled once with the length of the inputs marked dynamic
  (`torch._dynamo.mark_dynamic`) and kept across shapes: `new_graphs` says whether a shape's first
  call compiled (a new batch size does; a new length should not), `first_call_s` its time.
(Results files written before the split into `ssd_chunked` and `ssd_fast` call the tuned code `chunked`.)
For each shape: a float64 reference (the paper's listing in float64), every variant's relative error
against it, then its median time per call (`triton.testing.do_bench`: what a caller waits, Python's
launch overhead included), the median time of replaying the call captured in a CUDA graph (the GPU's
own time: launch overhead gone), its peak memory above the inputs
(`max_memory_allocated` after `reset_peak_memory_stats`), and, for compiled variants, the first-call
compile time and the number of graphs and graph breaks, reported apart.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
import traceback

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

SHAPES = {
    "8x1k": (8, 1024),
    "8x4k": (8, 4096),
    "2x16k": (2, 16384),
    "1x64k": (1, 65536),
}
H, P, N, G, Q = 24, 64, 128, 1, 256  # mamba2-130m-shaped heads, chunk 256


# ----------------------------------------------------------------------------------------------
def env_info():
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        pr = torch.cuda.get_device_properties(0)
        info.update(
            gpu=pr.name,
            gpu_memory_gib=round(pr.total_memory / 2**30, 1),
            sm_count=pr.multi_processor_count,
            cuda=torch.version.cuda,
        )
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except Exception:
            pass
    try:
        info["commit"] = (
            os.environ.get("BENCH_COMMIT")
            or subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(__file__),
                timeout=10,
            ).stdout.strip()
        )
    except Exception:
        pass
    for mod in ("mamba_ssm", "transformers", "mamba2"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    return info


def spin_up(seconds=0.3):
    "Keep the GPU busy for a while, so that timing starts at working clocks, not at the idle ones after a compile."
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def sm_clock_mhz():
    try:
        return torch.cuda.clock_rate()
    except Exception:
        return None


def bench(fn, warmup=25, rep=100):
    "Median time in ms of fn() (CUDA events through triton.testing.do_bench), after spinning the GPU up."
    import triton.testing

    spin_up()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn, *args):
    "Median time of replaying `fn(*args)` captured in a CUDA graph: the GPU's own time, without Python's launch overhead."
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    ms = bench(graph.replay)
    del graph
    return ms


def save(res, path):
    "Rewrite the results file: a run that stops early keeps what it measured."
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def record(res, r, path):
    "Add one measurement `r` to the results, print it, save them; free the GPU memory it left cached."
    torch.cuda.empty_cache()
    res["results"].append(r)
    print(json.dumps(r), flush=True)
    save(res, path)


def cuda_profile(fn, *args, warmup=1, calls=5, rows=20, width=70):
    "The profiler's table of the CUDA kernels of `calls` calls of `fn(*args)`, after `warmup` calls, by total time."
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=rows, max_name_column_width=width
    )


def peak_mib(fn):
    "Peak memory allocated during fn() above what was allocated before it, in MiB."
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def ceilings():
    "Measured ceilings: device-to-device copy bandwidth and dense bf16 matmul rate."
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), 10, 50)
    bw = 2 * x.numel() / (t * 1e-3) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bb = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ bb, 10, 100)
    tf = 2 * 8192**3 / (t * 1e-3) / 1e12
    return {"copy_TBps": round(bw, 2), "bf16_matmul_TFLOPs": round(tf, 1)}


def roofline(b, l, h=H, p=P, n=N, g=G, Qn=Q, elem=2):
    "FLOPs of the chunked algorithm (dense blocks) and the fewest bytes: inputs read once, outputs written once."
    c = l // Qn
    flops = 2 * b * c * (g * Qn * Qn * n + h * Qn * Qn * p + 2 * h * Qn * p * n)
    byts = (
        elem * (2 * b * l * h * p + 2 * b * l * g * n)
        + 4 * b * l * h
        + 4 * 2 * b * h * p * n
    )
    return flops, byts


def make_inputs(b, l, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, l, H, P, device="cuda", dtype=dtype, generator=gen)
    dt = F.softplus(torch.randn(b, l, H, device="cuda", generator=gen) - 4)
    a = -torch.empty(H, device="cuda").uniform_(1, 16, generator=gen)
    B = torch.randn(b, l, G, N, device="cuda", dtype=dtype, generator=gen)
    C = torch.randn(b, l, G, N, device="cuda", dtype=dtype, generator=gen)
    return x, dt, a, B, C


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x1k,8x4k,2x16k,1x64k")
    ap.add_argument(
        "--variants",
        default="kernel,minimal,ssd,ssd_compiled",
        help="comma-separated; NAME@SHAPE+SHAPE runs NAME at those shapes only",
    )
    ap.add_argument("--out", default="bench_ssd_gpu.json")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument(
        "--dynamic",
        action="store_true",
        help="compile each _compiled variant once, the length marked dynamic, and "
        "keep it across shapes (default: dynamic=False, compiled again per shape)",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="variant to profile (kernel table) at the first shape",
    )
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64  # we count recompiles ourselves (below)
    info = env_info()
    res = {
        "env": info,
        "config": dict(h=H, p=P, n=N, g=G, chunk_size=Q, dtype="bfloat16"),
        "results": [],
    }
    if not args.no_ceilings:
        res["ceilings"] = ceilings()
        print("ceilings", res["ceilings"], flush=True)

    fns, compiled = {}, {}
    only = {
        v.split("@")[0]: v.split("@")[1].split("+")
        for v in args.variants.split(",")
        if "@" in v
    }
    variants = [v.split("@")[0] for v in args.variants.split(",")]
    if "kernel" in variants:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        fns["kernel"] = lambda x, dt, a, B, C: mamba_chunk_scan_combined(
            x, dt, a, B, C, chunk_size=Q, return_final_states=True
        )
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete

    def minimal(
        x, dt, a, B, C
    ):  # the paper's listing: one dtype for all, B and C per head
        A = (dt * a).to(x.dtype)
        return ssd_minimal_discrete(
            x * dt[..., None].to(x.dtype),
            A,
            B.expand(-1, -1, H, -1),
            C.expand(-1, -1, H, -1),
            Q,
        )

    fns["minimal"] = minimal
    import mamba2

    for name, impl in (("ssd", "auto"), ("fast", "fast"), ("ssd_chunked", "chunked")):

        def ours(x, dt, a, B, C, impl=impl):
            return mamba2.ssd(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, impl=impl)

        fns[name] = ours
    if (
        "hf" in variants
    ):  # transformers' pure-PyTorch SSD (its wrapper may route to mamba_ssm: unwrap it)
        try:
            from transformers.models.mamba2 import modeling_mamba2 as hfm

            hf_scan = getattr(
                hfm.mamba2_chunk_scan, "__wrapped__", hfm.mamba2_chunk_scan
            )
            fns["hf"] = lambda x, dt, a, B, C: hf_scan(
                x, dt, a, B, C, Q, return_final_states=True
            )
        except Exception as e:
            print("transformers' mamba2_chunk_scan not found:", e, flush=True)

    for shape in args.shapes.split(","):
        b, l = SHAPES[shape]
        x, dt, a, B, C = make_inputs(b, l, torch.bfloat16)
        # float64 reference: the paper's listing, exact arithmetic aside from float64 rounding
        Xd, Bd, Cd = (
            t.double()
            for t in (
                x * dt[..., None],
                B.expand(-1, -1, H, -1),
                C.expand(-1, -1, H, -1),
            )
        )
        Yref, Sref = ssd_minimal_discrete(Xd, (dt * a).double(), Bd, Cd, Q)
        del Xd, Bd, Cd
        torch.cuda.empty_cache()
        fl, by = roofline(b, l)
        print(
            f"== {shape}: b={b} l={l}  {fl / 1e9:.1f} GFLOP  {by / 1e9:.3f} GB",
            flush=True,
        )
        for v in variants:
            base = v.replace("_compiled", "")
            if base not in fns or shape not in only.get(v, [shape]):
                continue
            r = {
                "shape": shape,
                "b": b,
                "l": l,
                "variant": v,
                "gflop": fl / 1e9,
                "gbytes": by / 1e9,
            }
            try:
                fn = fns[base]
                if v.endswith("_compiled") and args.dynamic:
                    # compiled once, the length marked dynamic; kept across shapes
                    if v not in compiled:
                        compiled[v] = torch.compile(fn)
                    fn = compiled[v]
                    for t in (x, dt, B, C):
                        torch._dynamo.mark_dynamic(t, 1)
                    before = int(counters["stats"]["unique_graphs"])
                    t0 = time.perf_counter()
                    fn(x, dt, a, B, C)
                    torch.cuda.synchronize()
                    # the compilation, if this shape made a graph (new_graphs)
                    r["first_call_s"] = round(time.perf_counter() - t0, 2)
                    r["new_graphs"] = int(counters["stats"]["unique_graphs"]) - before
                    r["graphs"] = int(counters["stats"]["unique_graphs"])
                    r["graph_breaks"] = int(sum(counters["graph_break"].values()))
                elif v.endswith("_compiled"):
                    torch._dynamo.reset()
                    counters.clear()
                    fn = torch.compile(fn, dynamic=False)
                    t0 = time.perf_counter()
                    fn(x, dt, a, B, C)
                    torch.cuda.synchronize()
                    r["first_call_s"] = round(time.perf_counter() - t0, 2)
                    r["graphs"] = int(counters["stats"]["unique_graphs"])
                    r["graph_breaks"] = int(sum(counters["graph_break"].values()))
                elif v == "kernel":
                    t0 = time.perf_counter()
                    fn(x, dt, a, B, C)
                    torch.cuda.synchronize()
                    r["first_call_s"] = round(
                        time.perf_counter() - t0, 2
                    )  # Triton compile + autotune
                Y, S = fn(x, dt, a, B, C)
                r["rel_err_y"], r["rel_err_state"] = rel(Y, Yref), rel(S, Sref)
                del Y, S
                r["ms"] = bench(lambda: fn(x, dt, a, B, C))
                r["sm_clock_mhz"] = sm_clock_mhz()
                try:
                    r["graph_ms"] = graph_ms(fn, x, dt, a, B, C)
                except Exception as e:
                    r["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.synchronize()
                r["peak_mib"] = peak_mib(lambda: fn(x, dt, a, B, C))
                if v.endswith("_compiled"):
                    r["recompiles_after_warmup"] = (
                        int(counters["stats"]["unique_graphs"]) - r["graphs"]
                    )
            except torch.cuda.OutOfMemoryError as e:
                r["error"] = "OOM: " + str(e).split("\n")[0][:200]
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            record(res, r, args.out)
        if args.profile in fns and shape == args.shapes.split(",")[0]:
            table = cuda_profile(fns[args.profile], x, dt, a, B, C)
            res["profile"] = {
                "variant": args.profile,
                "shape": shape,
                "calls": 5,
                "table": table,
            }
            print(table, flush=True)
            save(res, args.out)
        x = dt = a = B = C = Yref = Sref = (
            None  # free the GPU memory before the next shape
        )
        torch.cuda.empty_cache()

    # the short table last
    kern = {
        r["shape"]: r for r in res["results"] if r["variant"] == "kernel" and "ms" in r
    }
    print(
        f"{'shape':7s} {'variant':18s} {'ms':>8s} {'x kern':>7s} {'graph':>7s} {'x kern':>7s} {'MiB':>8s} {'x kern':>7s} {'err_y':>8s} {'first s':>7s}"
    )
    for r in res["results"]:
        k = kern.get(r["shape"])
        if "ms" not in r:
            print(f"{r['shape']:7s} {r['variant']:18s} {r.get('error', '')[:60]}")
            continue
        gk, gr = (
            (k or {}).get("graph_ms", float("nan")),
            r.get("graph_ms", float("nan")),
        )
        print(
            f"{r['shape']:7s} {r['variant']:18s} {r['ms']:8.3f} {r['ms'] / k['ms'] if k else float('nan'):7.2f} {gr:7.3f} {gr / gk:7.2f} "
            f"{r['peak_mib']:8.0f} {r['peak_mib'] / k['peak_mib'] if k else float('nan'):7.2f} {r['rel_err_y']:8.1e} {r.get('first_call_s', 0):7.1f}"
        )


if __name__ == "__main__":
    main()
