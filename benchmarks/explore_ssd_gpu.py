"""Exploration on one GPU: variants of the diagonal-block step of `ssd_chunked`, timed side by side at (8, 4k) bf16.

    PYTHONPATH=.:MAMBA_SSM_SOURCES python benchmarks/explore_ssd_gpu.py --out explore.json [--variants a,b,...]

Each variant is `ssd_variant` below with one set of flags; `kernel` is mamba_ssm's Triton kernel and `ours` the
exported `mamba2.ssd_chunked`. Every variant is checked against `ssd_chunked` in float64 (itself checked against
the scan by the tests) on the first sequence of the same inputs before it
is timed (`triton.testing.do_bench`, median), eager and with `torch.compile`, with and without `torch.no_grad()`,
and its peak memory above the inputs is recorded. The flags:
  lo        add the float32 remainder of the float64 cumulative sum to the segment sums (two passes);
  out       write the scores L * C B^T straight into a tensor of the input's dtype (one pass instead of two);
  budget    build L for at most this many numbers at a time (a loop over groups of chunks), None: all at once;
  mask      "clamp": exponents clamped to a floor (the floor above the diagonal), "inf": -inf above the diagonal.
"""
import argparse, math, sys, time, traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root, for mamba2
from mamba2 import ssd_chunked
from mamba2.chunked import chunk_inputs, pass_states
from mamba2.quadratic import split_heads, flush_tiny, outputs_from_state
from mamba2.scan import check_ssd_inputs
from bench_ssd_gpu import make_inputs, bench, peak_mib, rel, env_info, record, save, cuda_profile, Q


def ssd_variant(X, A, B, C, chunk_size, initial_states=None, lo=True, out=False, budget=None, mask="clamp"):
    b, l, h, p, g, n = check_ssd_inputs(X, A, B, C, initial_states)
    dtype = torch.promote_types(X.dtype, torch.float32)
    Xc, Ac, B, C = chunk_inputs(X, A.to(dtype), B, C, chunk_size)
    Xc, Ac = split_heads(Xc, Ac, g)                                     # (b, c, Q, g, r, p), (b, c, g, r, Q)
    nc, info = Xc.size(1), torch.finfo(dtype)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=X.device).tril()
    S = Ac.double() @ causal.double().T                                 # (b, c, g, r, Q)
    to_end, from_start = flush_tiny(torch.exp(S[..., -1:] - S).to(dtype)), flush_tiny(torch.exp(S).to(dtype))
    Xd = (Xc * to_end.movedim(-1, -3).unsqueeze(-1)).to(B.dtype)
    states = torch.einsum("...lgn,...lgrp->...grpn", B, Xd).to(dtype)
    s0 = Xc.new_zeros(b, h, p, n, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    entering, final = pass_states(states, from_start[..., -1], s0.unflatten(1, (g, -1)))
    Y = outputs_from_state(C, entering, from_start)                     # (b, c, Q, g, r, p), float32
    hi = S.to(dtype)
    rem = (S - hi).to(dtype)
    floor = torch.tensor(math.log(info.tiny / info.eps), dtype=dtype, device=X.device)
    ceiling = floor.where(~causal, torch.inf)
    step = nc if budget is None else max(1, budget // (b * h * chunk_size * chunk_size))
    for k in range(0, nc, step):
        part = slice(k, k + step)
        L = hi[:, part, ..., :, None] - hi[:, part, ..., None, :]
        if lo:
            L.add_(rem[:, part, ..., :, None]).sub_(rem[:, part, ..., None, :])
        L = L.clamp_(floor, ceiling).exp_() if mask == "clamp" else L.masked_fill_(~causal, -torch.inf).exp_()
        CB = torch.einsum("...lgn,...sgn->...gls", C[:, part], B[:, part]).tril_().unsqueeze(-3)
        if out:
            M = torch.mul(L, CB, out=torch.empty(L.shape, dtype=X.dtype, device=X.device))
        elif not torch.is_grad_enabled():
            M = L.mul_(CB).to(X.dtype)
        else:
            M = (L * CB).to(X.dtype)
        Y[:, part] += torch.einsum("...grls,...sgrp->...lgrp", M, Xc[:, part])
    return Y.flatten(1, 2)[:, :l].flatten(-3, -2).to(X.dtype), final.flatten(1, 2)


VARIANTS = {
    "v_lo": dict(lo=True), "v": dict(lo=False), "v_out": dict(lo=False, out=True),
    "v_out_inf": dict(lo=False, out=True, mask="inf"), "v_lo_out": dict(lo=True, out=True),
    "v_out_b25": dict(lo=False, out=True, budget=2**25), "v_out_b26": dict(lo=False, out=True, budget=2**26),
    "v_lo_out_b25": dict(lo=True, out=True, budget=2**25), "v_out_b24": dict(lo=False, out=True, budget=2**24),
    "v_out_b27": dict(lo=False, out=True, budget=2**27),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8,4096")
    ap.add_argument("--variants", default="kernel,ours," + ",".join(VARIANTS))
    ap.add_argument("--compiled", default="ours,v_out,v_out_b25,v_lo_out_b25")
    ap.add_argument("--profile", default="", help="variants to profile, eager (NAME) or compiled (NAME_compiled)")
    ap.add_argument("--no-grad-too", action="store_true", help="time eager variants under torch.no_grad() as well")
    ap.add_argument("--out", default="explore.json")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    b, l = map(int, args.shape.split(","))
    x, dt, a, B, C = make_inputs(b, l, torch.bfloat16)
    fns = {"ours": lambda x, dt, a, B, C: ssd_chunked(x * dt[..., None].to(x.dtype), dt * a, B, C, Q)}
    for name, kw in VARIANTS.items():
        fns[name] = (lambda kw: lambda x, dt, a, B, C: ssd_variant(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, **kw))(kw)
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        fns["kernel"] = lambda x, dt, a, B, C: mamba_chunk_scan_combined(x, dt, a, B, C, chunk_size=Q, return_final_states=True)
    except ImportError as e:
        print("no kernel:", e)
    # reference: our float64 chunked SSD (checked against the scan in the tests), on the first sequence only
    Yref, Sref = ssd_chunked((x * dt[..., None]).double()[:1], (dt * a).double()[:1], B.double()[:1], C.double()[:1], Q)
    res = {"env": env_info(), "shape": [b, l], "results": []}
    runs = [(v, False, False) for v in args.variants.split(",")]
    runs += [(v, False, True) for v in args.variants.split(",") if v != "kernel" and args.no_grad_too]
    runs += [(v, True, False) for v in args.compiled.split(",") if v]
    for v, compiled, no_grad in runs:
        if v not in fns:
            continue
        r = {"variant": v, "compiled": compiled, "no_grad": no_grad}
        try:
            fn = fns[v]
            if compiled:
                torch._dynamo.reset()
                fn = torch.compile(fn, dynamic=False)
            ctx = torch.no_grad if no_grad else torch.enable_grad
            with ctx():
                t0 = time.perf_counter(); Y, S = fn(x, dt, a, B, C); torch.cuda.synchronize()
                r["first_s"] = round(time.perf_counter() - t0, 2)
                r["err_y"], r["err_s"] = rel(Y[:1], Yref), rel(S[:1], Sref)
                del Y, S
                r["ms"] = bench(lambda: fn(x, dt, a, B, C))
                r["peak_mib"] = peak_mib(lambda: fn(x, dt, a, B, C))
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        record(res, r, args.out)
    for v in filter(None, args.profile.split(",")):       # NAME or NAME_compiled
        fn = fns[v.removesuffix("_compiled")]
        if v.endswith("_compiled"):
            torch._dynamo.reset()
            fn = torch.compile(fn, dynamic=False)
        with torch.no_grad():
            table = cuda_profile(fn, x, dt, a, B, C, warmup=3, rows=25, width=110)
        res.setdefault("profiles", {})[v] = table
        print(table, flush=True)
        save(res, args.out)
    k = next((r for r in res["results"] if r["variant"] == "kernel" and "ms" in r), None)
    print(f"{'variant':14s} {'comp':>5s} {'nograd':>6s} {'ms':>8s} {'x kern':>7s} {'MiB':>7s} {'x kern':>7s} {'err_y':>8s} {'err_s':>8s}")
    for r in res["results"]:
        if "ms" not in r:
            print(r["variant"], r["compiled"], r["no_grad"], r.get("error", "")[:80]); continue
        print(f"{r['variant']:14s} {r['compiled']!s:>5s} {r['no_grad']!s:>6s} {r['ms']:8.3f} {r['ms'] / k['ms'] if k else 0:7.2f} "
              f"{r['peak_mib']:7.0f} {r['peak_mib'] / k['peak_mib'] if k else 0:7.2f} {r['err_y']:8.1e} {r['err_s']:8.1e}")


if __name__ == "__main__":
    main()
