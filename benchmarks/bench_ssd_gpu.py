"""SSD on one GPU: `mamba2.ssd_chunked` (eager and torch.compile) against mamba_ssm's Triton kernel.

Run by `benchmarks/run_gpu.sh`. Needs a CUDA GPU, Triton, and mamba_ssm's Python sources on the path
(its Triton SSD kernels need no compiled extension: `run_gpu.sh` puts a stub `mamba_ssm/__init__.py` in
front of the source package so that the CUDA extensions are never imported).

Every variant computes the same function from the same inputs, `(x, dt, a, B, C) -> (Y, final_state)`
with `X = x * dt` and `A = dt * a` (the kernel discretizes inside, so ours does too, inside the timing).
For each shape: a float64 reference (the paper's listing in float64), every variant's relative error
against it, then its median time per call (`triton.testing.do_bench`: what a caller waits, Python's
launch overhead included), the median time of replaying the call captured in a CUDA graph (the GPU's
own time: launch overhead gone), its peak memory above the inputs
(`max_memory_allocated` after `reset_peak_memory_stats`), and, for compiled variants, the first-call
compile time and the number of graphs and graph breaks, reported apart.
"""
import argparse, datetime, json, math, os, platform, subprocess, time, traceback

import torch
import torch._dynamo
import torch.nn.functional as F

SHAPES = {"8x1k": (8, 1024), "8x4k": (8, 4096), "2x16k": (2, 16384), "1x64k": (1, 65536)}
H, P, N, G, Q = 24, 64, 128, 1, 256   # mamba2-130m-shaped heads, chunk 256


# ----------------------------------------------------------------------------------------------
# Prototype variants, measured here before the winners move into chapter 4's `ssd_chunked`.
def _chunk_cumsum(A):
    "Inclusive cumsum over the chunk axis -2 of A (b, c, Q, h) as a triangular matmul (Inductor-safe)."
    Qn = A.shape[-2]
    tri = torch.ones(Qn, Qn, device=A.device, dtype=A.dtype).tril()
    return torch.einsum("ls,bcsh->bclh", tri, A)


def ssd_proto(X, A, B, C, chunk_size, initial_states=None, pass_states="matmul"):
    "Chunked SSD, group-shared C B^T and states, float32 decays and states, bf16 matmul operands."
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    Qn, pad = chunk_size, -l % chunk_size
    if pad:   # pad after discretization: X = 0 and A = 0 leave outputs and the final state exact
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        A = F.pad(A, (0, 0, 0, pad))
    c, k = (l + pad) // Qn, h // g
    ft = torch.promote_types(X.dtype, torch.float32)     # decays and states in >= float32
    X = X.reshape(b, c, Qn, g, k, p)
    B, C = B.reshape(b, c, Qn, g, n), C.reshape(b, c, Qn, g, n)
    Acs = _chunk_cumsum(A.to(ft).reshape(b, c, Qn, h)).reshape(b, c, Qn, g, k)   # (b, c, Q, g, k)
    # 1. diagonal blocks: (L o C B^T) X, with C B^T shared by the k heads of a group
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)                                  # (b, c, g, Q, Q)
    At = Acs.permute(0, 1, 3, 4, 2)                                                 # (b, c, g, k, Q)
    seg = At[..., :, None] - At[..., None, :]                                       # (b, c, g, k, Q, Q)
    causal = torch.ones(Qn, Qn, dtype=torch.bool, device=X.device).tril()
    M = (torch.exp(seg.masked_fill(~causal, -math.inf)) * CB[:, :, :, None]).to(X.dtype)
    Y = torch.einsum("bcgkls,bcsgkp->bclgkp", M, X)
    # 2. each chunk's state, from B and the decay to the chunk's end
    Xd = (X * torch.exp(Acs[:, :, -1:] - Acs)[..., None]).to(X.dtype)
    S = torch.einsum("bcsgn,bcsgkp->bcgkpn", B, Xd).to(ft)                         # (b, c, g, k, p, n)
    # 3. pass states across chunks
    dec = torch.exp(Acs[:, :, -1])                                                   # (b, c, g, k)
    s0 = X.new_zeros(b, g, k, p, n, dtype=ft) if initial_states is None else initial_states.to(ft).reshape(b, g, k, p, n)
    if pass_states == "loop":
        starts = []
        for i in range(c):
            starts.append(s0)
            s0 = dec[:, i, ..., None, None] * s0 + S[:, i]
        starts, final = torch.stack(starts, 1), s0
    else:     # (c+1) x (c+1) decay matrix from the chunk totals: exact, quadratic in c
        tot = F.pad(Acs[:, :, -1], (0, 0, 0, 0, 1, 0)).cumsum(1)                     # (b, c+1, g, k)
        Ld = torch.exp((tot[:, :, None] - tot[:, None, :]).masked_fill(~torch.ones(c + 1, c + 1, dtype=torch.bool, device=X.device).tril()[..., None, None], -math.inf))
        allS = torch.cat([s0[:, None], S], 1)
        new = torch.einsum("bzcgk,bcgkpn->bzgkpn", Ld, allS)
        starts, final = new[:, :-1], new[:, -1]
    # 4. states to outputs through C, decayed from each chunk's start
    Yoff = torch.einsum("bclgn,bcgkpn->bclgkp", C, starts.to(X.dtype))
    Y = (Y.to(ft) + Yoff.to(ft) * torch.exp(Acs)[..., None]).to(X.dtype)
    return Y.reshape(b, c * Qn, h, p)[:, :l], final.reshape(b, h, p, n)


def ssd_candidate(X, A, B, C, chunk_size, initial_states=None, f32_operands=False, passing="loop", segsum="diff"):
    """The candidate for chapter 4: matmul operands in the input dtype, decays and states in float32, a
    contiguous (b, c, g, r, Q) decay layout, L from differences of the in-chunk cumsum (one full-size
    allocation, exponentiated in place), group-shared C B^T, B X and C S products. The flags undo one
    optimisation each, for the ablation: `f32_operands`, `passing="matrix"`, `segsum="masked_cumsum"`."""
    b, l, h, p = X.shape
    g, n = B.shape[2:]
    Qn, pad = chunk_size, -l % chunk_size
    ft = torch.promote_types(X.dtype, torch.float32)
    dt = ft if f32_operands else X.dtype
    c, r = (l + pad) // Qn, h // g
    X, B, C = (F.pad(t.to(dt), (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
    X, B, C = X.view(b, c, Qn, g, r, p), B.view(b, c, Qn, g, n), C.view(b, c, Qn, g, n)
    A = F.pad(A.to(ft), (0, 0, 0, pad)).view(b, c, Qn, g, r).permute(0, 1, 3, 4, 2).contiguous()  # (b, c, g, r, Q)
    causal = torch.ones(Qn, Qn, dtype=torch.bool, device=X.device).tril()
    if segsum == "diff":
        Acs = A @ causal.to(ft).T                                                     # in-chunk cumsum as a matmul
        L = (Acs[..., :, None] - Acs[..., None, :]).masked_fill_(~causal, -math.inf).exp_()
    else:
        Ae = A[..., None].expand(*A.shape, Qn).masked_fill(~causal.tril(-1), 0)
        L = Ae.cumsum(-2).masked_fill_(~causal, -math.inf).exp_()
        Acs = A.cumsum(-1)
    # 1. diagonal blocks
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)                                     # (b, c, g, Q, Q)
    Y = torch.einsum("bcgrls,bcsgrp->bclgrp", (L * CB[:, :, :, None]).to(dt), X)
    # 2. chunk states
    to_end = torch.exp(Acs[..., -1:] - Acs).permute(0, 1, 4, 2, 3)[..., None]       # (b, c, Q, g, r, 1)
    S = torch.einsum("bclgn,bclgrp->bcgrpn", B, (X * to_end).to(dt)).to(ft)
    # 3. pass states
    s = X.new_zeros(b, g, r, p, n, dtype=ft) if initial_states is None else initial_states.to(ft).reshape(b, g, r, p, n)
    chunk_decay = torch.exp(Acs[..., -1])                                              # (b, c, g, r)
    if passing == "loop":
        entering = []
        for i in range(c):
            entering.append(s)
            s = chunk_decay[:, i, :, :, None, None] * s + S[:, i]
        entering = torch.stack(entering, 1)
    else:
        tot = F.pad(Acs[..., -1], (0, 0, 0, 0, 1, 0)).cumsum(1)                      # (b, c+1, g, r)
        D = torch.exp((tot[:, :, None] - tot[:, None, :]).masked_fill(~torch.ones(c + 1, c + 1, dtype=torch.bool, device=X.device).tril()[..., None, None], -math.inf))
        new = torch.einsum("bzcgr,bcgrpn->bzgrpn", D, torch.cat([s[:, None], S], 1))
        entering, s = new[:, :-1], new[:, -1]
    # 4. states to outputs
    from_start = torch.exp(Acs).permute(0, 1, 4, 2, 3)[..., None]                    # (b, c, Q, g, r, 1)
    Yoff = torch.einsum("bclgn,bcgrpn->bclgrp", C, entering.to(dt))
    Y = torch.addcmul(Y.to(ft), Yoff.to(ft), from_start)
    return Y.reshape(b, c * Qn, h, p)[:, :l].to(X.dtype if not f32_operands else Y.dtype), s.reshape(b, h, p, n)


# ----------------------------------------------------------------------------------------------
def env_info():
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "cpu_count": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        pr = torch.cuda.get_device_properties(0)
        info.update(gpu=pr.name, gpu_memory_gib=round(pr.total_memory / 2**30, 1), sm_count=pr.multi_processor_count,
                    cuda=torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            pass
    try:
        info["commit"] = os.environ.get("BENCH_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
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
    with torch.cuda.stream(side):                  # warm-up off the default stream, as capture requires
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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=width)


def peak_mib(fn):
    "Peak memory allocated during fn() above what was allocated before it, in MiB."
    torch.cuda.synchronize(); torch.cuda.empty_cache()
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
    del x, y, a, bb
    return {"copy_TBps": round(bw, 2), "bf16_matmul_TFLOPs": round(tf, 1)}


def roofline(b, l, h=H, p=P, n=N, g=G, Qn=Q, elem=2):
    "FLOPs of the chunked algorithm (dense blocks) and the fewest bytes: inputs read once, outputs written once."
    c = l // Qn
    flops = 2 * b * c * (g * Qn * Qn * n + h * Qn * Qn * p + 2 * h * Qn * p * n)
    byts = elem * (2 * b * l * h * p + 2 * b * l * g * n) + 4 * b * l * h + 4 * 2 * b * h * p * n
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
    ap.add_argument("--variants", default="kernel,minimal,chunked,chunked_compiled",
                    help="comma-separated; NAME@SHAPE+SHAPE runs NAME at those shapes only")
    ap.add_argument("--out", default="bench_ssd_gpu.json")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--profile", default="", help="variant to profile (kernel table) at the first shape")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64   # we count recompiles ourselves (below)
    info = env_info()
    res = {"env": info, "config": dict(h=H, p=P, n=N, g=G, chunk_size=Q, dtype="bfloat16"), "results": []}
    if not args.no_ceilings:
        res["ceilings"] = ceilings()
        print("ceilings", res["ceilings"], flush=True)

    fns = {}
    only = {v.split("@")[0]: v.split("@")[1].split("+") for v in args.variants.split(",") if "@" in v}
    variants = [v.split("@")[0] for v in args.variants.split(",")]
    if "kernel" in variants:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        fns["kernel"] = lambda x, dt, a, B, C: mamba_chunk_scan_combined(x, dt, a, B, C, chunk_size=Q, return_final_states=True)
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    def minimal(x, dt, a, B, C):   # the paper's listing: one dtype for all, B and C per head
        A = (dt * a).to(x.dtype)
        return ssd_minimal_discrete(x * dt[..., None].to(x.dtype), A, B.expand(-1, -1, H, -1), C.expand(-1, -1, H, -1), Q)
    fns["minimal"] = minimal
    try:
        from mamba2 import ssd_chunked
        def chunked(x, dt, a, B, C):
            return ssd_chunked(x * dt[..., None].to(x.dtype), dt * a, B, C, Q)
        fns["chunked"] = chunked
    except ImportError:
        print("mamba2.ssd_chunked not found: skipping", flush=True)
    try:   # the next version of ssd_chunked, measured before it is committed (a copy of mamba2 named mamba2_next)
        from mamba2_next import ssd_chunked as next_chunked
        fns["next"] = lambda x, dt, a, B, C: next_chunked(x * dt[..., None].to(x.dtype), dt * a, B, C, Q)
    except ImportError:
        pass
    def proto(x, dt, a, B, C):
        return ssd_proto(x * dt[..., None].to(x.dtype), dt * a, B, C, Q)
    def proto_loop(x, dt, a, B, C):
        return ssd_proto(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, pass_states="loop")
    fns["proto"], fns["proto_loop"] = proto, proto_loop
    def cand(**kw):
        return lambda x, dt, a, B, C: ssd_candidate(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, **kw)
    fns["cand"], fns["cand_f32"] = cand(), cand(f32_operands=True)
    fns["cand_matrix"], fns["cand_stable"] = cand(passing="matrix"), cand(segsum="masked_cumsum")
    if "hf" in variants:   # transformers' pure-PyTorch SSD (its wrapper may route to mamba_ssm: unwrap it)
        try:
            from transformers.models.mamba2 import modeling_mamba2 as hfm
            hf_scan = getattr(hfm.mamba2_chunk_scan, "__wrapped__", hfm.mamba2_chunk_scan)
            fns["hf"] = lambda x, dt, a, B, C: hf_scan(x, dt, a, B, C, Q, return_final_states=True)
        except Exception as e:
            print("transformers' mamba2_chunk_scan not found:", e, flush=True)

    for shape in args.shapes.split(","):
        b, l = SHAPES[shape]
        x, dt, a, B, C = make_inputs(b, l, torch.bfloat16)
        # float64 reference: the paper's listing, exact arithmetic aside from float64 rounding
        Xd, Bd, Cd = (t.double() for t in (x * dt[..., None], B.expand(-1, -1, H, -1), C.expand(-1, -1, H, -1)))
        Yref, Sref = ssd_minimal_discrete(Xd, (dt * a).double(), Bd, Cd, Q)
        del Xd, Bd, Cd
        torch.cuda.empty_cache()
        fl, by = roofline(b, l)
        print(f"== {shape}: b={b} l={l}  {fl/1e9:.1f} GFLOP  {by/1e9:.3f} GB", flush=True)
        for v in variants:
            base = v.replace("_compiled", "")
            if base not in fns or shape not in only.get(v, [shape]):
                continue
            r = {"shape": shape, "b": b, "l": l, "variant": v, "gflop": fl / 1e9, "gbytes": by / 1e9}
            try:
                fn = fns[base]
                if v.endswith("_compiled"):
                    torch._dynamo.reset()
                    from torch._dynamo.utils import counters
                    counters.clear()
                    fn = torch.compile(fn, dynamic=False)
                    t0 = time.perf_counter(); fn(x, dt, a, B, C); torch.cuda.synchronize()
                    r["first_call_s"] = round(time.perf_counter() - t0, 2)
                    r["graphs"] = int(counters["stats"]["unique_graphs"])
                    r["graph_breaks"] = int(sum(counters["graph_break"].values()))
                elif v == "kernel":
                    t0 = time.perf_counter(); fn(x, dt, a, B, C); torch.cuda.synchronize()
                    r["first_call_s"] = round(time.perf_counter() - t0, 2)   # Triton compile + autotune
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
                    r["recompiles_after_warmup"] = int(counters["stats"]["unique_graphs"]) - r["graphs"]
            except torch.cuda.OutOfMemoryError as e:
                r["error"] = "OOM: " + str(e).split("\n")[0][:200]
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            record(res, r, args.out)
        if args.profile in fns and shape == args.shapes.split(",")[0]:
            table = cuda_profile(fns[args.profile], x, dt, a, B, C)
            res["profile"] = {"variant": args.profile, "shape": shape, "calls": 5, "table": table}
            print(table, flush=True)
            save(res, args.out)
        del x, dt, a, B, C, Yref, Sref
        torch.cuda.empty_cache()

    # the short table last
    kern = {r["shape"]: r for r in res["results"] if r["variant"] == "kernel" and "ms" in r}
    print(f"{'shape':7s} {'variant':18s} {'ms':>8s} {'x kern':>7s} {'graph':>7s} {'x kern':>7s} {'MiB':>8s} {'x kern':>7s} {'err_y':>8s} {'first s':>7s}")
    for r in res["results"]:
        k = kern.get(r["shape"])
        if "ms" not in r:
            print(f"{r['shape']:7s} {r['variant']:18s} {r.get('error','')[:60]}")
            continue
        gk, gr = (k or {}).get("graph_ms", float("nan")), r.get("graph_ms", float("nan"))
        print(f"{r['shape']:7s} {r['variant']:18s} {r['ms']:8.3f} {r['ms']/k['ms'] if k else float('nan'):7.2f} {gr:7.3f} {gr / gk:7.2f} "
              f"{r['peak_mib']:8.0f} {r['peak_mib']/k['peak_mib'] if k else float('nan'):7.2f} {r['rel_err_y']:8.1e} {r.get('first_call_s', 0):7.1f}")


if __name__ == "__main__":
    main()
