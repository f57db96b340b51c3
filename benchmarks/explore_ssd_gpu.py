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
The `blk*` variants are `ssd_blocks` below, the prototype of chapter 4's blocks inside the chunks, e.g.
    --variants kernel,ours,blk64,blk32,blk128 --compiled ours,blk64,blk256,blk256_g2 --profile blk64
The `r2_*` variants are `ssd_rows2` below, the prototype of chapter 4's compiled path (blocks of rows, the output
written in one pass), e.g.  --variants kernel --compiled ours,r2_128,r2_128_pad,r2_128_hm --profile r2_128_compiled
"""
import argparse, math, sys, time, traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repository root, for mamba2
from mamba2 import ssd_chunked
from mamba2.chunked import chunk_inputs, pass_states
from mamba2.quadratic import split_heads, mul_to, flush_tiny, outputs_from_state
from mamba2.scan import check_ssd_inputs
from bench_ssd_gpu import make_inputs, bench, graph_ms, peak_mib, rel, env_info, record, save, cuda_profile, Q


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


# Blocks inside the chunks (the prototype of chapter 4's diagonal_blocks / earlier_blocks), with its own flags:
#   block     tokens per diagonal block (chunk_size: whole chunks);  groups  the diagonal scores in that many pieces;
#   tm        decay vectors laid out token-major, (b, c, Q, g, r), instead of (b, c, g, r, Q).
def segment_decays(S, dtype, exact):
    q, info = S.size(-1), torch.finfo(dtype)
    causal = torch.ones(q, q, dtype=torch.bool, device=S.device).tril()
    hi = S.to(dtype)
    L = hi[..., :, None] - hi[..., None, :]
    if exact:
        lo = (S - hi).to(dtype)
        L.add_(lo[..., :, None]).sub_(lo[..., None, :])
    floor = torch.full((q, q), math.log(info.tiny / info.eps), dtype=dtype, device=S.device)
    return L.clamp_(floor, floor.masked_fill(causal, torch.inf)).exp_()


def ssd_blocks(X, A, B, C, chunk_size, initial_states=None, block=64, groups=1, tm=False):
    "Sub-blocks of `block` tokens inside each chunk; elementwise passes fused where `out=` allows (no autograd through those)."
    b, l, h, p, g, n = check_ssd_inputs(X, A, B, C, initial_states)
    dtype = torch.promote_types(X.dtype, torch.float32)
    exact = X.dtype not in (torch.float16, torch.bfloat16)
    fuse = not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (X, A, B, C, initial_states)))
    Xc, Ac, B, C = chunk_inputs(X, A.to(dtype), B, C, chunk_size)
    Xc, Ac = split_heads(Xc, Ac, g)                                           # (b, c, Q, g, r, p), (b, c, g, r, Q)
    Qn = chunk_size
    q = block if Qn % block == 0 else Qn
    k, nc = Qn // q, Xc.size(1)
    causal = torch.ones(Qn, Qn, dtype=torch.bool, device=X.device).tril()
    if tm:       # token-major decays: (b, c, Q, g, r) contiguous, broadcast over p only
        St = causal.double() @ Ac.movedim(-1, 2).double().flatten(-2)       # (b, c, Q, h)
        St = St.unflatten(-1, (g, -1))                                      # (b, c, Q, g, r)
        S = St.movedim(2, -1)                                               # (b, c, g, r, Q) view
        tok = lambda v: v.movedim(-1, 2).unsqueeze(-1)                      # a view of a token-major tensor
        expd = lambda z: torch.exp(z.movedim(-1, 2)).movedim(2, -1)          # computed token-major, viewed back
    else:
        S = Ac.double() @ causal.double().T                                  # (b, c, g, r, Q)
        tok = lambda v: v.movedim(-1, -3).unsqueeze(-1)                      # (b, c, g, r, Q) -> (b, c, Q, g, r, 1)
        expd = torch.exp
    from_start, to_end = flush_tiny(expd(S).to(dtype)), flush_tiny(expd(S[..., -1:] - S).to(dtype))
    states = torch.einsum("...lgn,...lgrp->...grpn", B, mul_to(Xc, tok(to_end), X.dtype, fuse)).to(dtype)
    s0 = Xc.new_zeros(b, h, p, n, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    entering, final_state = pass_states(states, from_start[..., -1], s0.unflatten(1, (g, -1)))
    del states
    Zs = torch.einsum("bclgn,bcgrpn->bclgrp", C, entering.to(X.dtype))      # (b, c, Q, g, r, p): C S, not yet decayed
    del entering
    Sb = S.unflatten(-1, (k, q))
    Sloc = (Sb - F.pad(Sb[..., :-1, -1], (1, 0))[..., None]).movedim(-2, 2)  # (b, c, k, g, r, q)
    Xb, Bb, Cb = (t.unflatten(2, (k, q)) for t in (Xc, B, C))
    Yd = []
    step = -(-nc // groups)
    for j in range(0, nc, step):
        part = slice(j, j + step)
        L = segment_decays(Sloc[:, part], dtype, exact)
        CB = torch.einsum("...lgn,...sgn->...gls", Cb[:, part], Bb[:, part]).tril_()
        M = mul_to(L, CB.unsqueeze(-3), X.dtype, fuse)
        del L
        Yd.append(torch.einsum("...grls,...sgrp->...lgrp", M, Xb[:, part]).flatten(2, 3))
        del M
    Yd = Yd[0] if len(Yd) == 1 else torch.cat(Yd, 1)
    Y = torch.addcmul(Yd, Zs, tok(from_start))                                # float32
    del Yd, Zs
    for i in range(1, k):
        e, rows = i * q, slice(i * q, (i + 1) * q)
        w = flush_tiny(expd(S[..., e - 1:e] - S[..., :e]).to(dtype))
        Xs = mul_to(Xc[:, :, :e], tok(w), X.dtype, fuse)
        CB = torch.einsum("bclgn,bcsgn->bcgls", C[:, :, rows], B[:, :, :e])
        Yi = torch.einsum("bcgls,bcsgrp->bclgrp", CB, Xs)
        u = expd(S[..., rows] - S[..., e - 1:e]).to(dtype)
        Y[:, :, rows].addcmul_(Yi, tok(u))
    return Y.flatten(1, 2)[:, :l].flatten(-3, -2).to(X.dtype), final_state.flatten(1, 2)


# ssd_rows2's flags:  block  tokens per block of rows;  mask  "inf" or "clamp" (as chapter 4) for the scores;
#   tm        per-token decays from a token-major cumulative sum (False: the head-major one, viewed per token);
#   assemble  "cat": each block of rows finished and concatenated; "assign": written into an empty output;
#             "pad": all diagonal blocks in one product, the earlier blocks added as zero-padded terms;
#   e16       the entering states stored in C's dtype as they are passed.
def pass_states_half(states, chunk_decay, initial_states, dtype):
    "pass_states, each entering state stored in `dtype` as it is made (float32 arithmetic)."
    state, entering = initial_states, []
    for c in range(states.size(1)):
        entering.append(state.to(dtype))
        state = torch.addcmul(states[:, c], chunk_decay[:, c, :, :, None, None], state)
    return torch.stack(entering, 1), state


def ssd_rows2(X, A, B, C, chunk_size, initial_states=None, block=128, mask="inf", tm=True, assemble="cat", e16=False):
    "Row blocks, compile-minded: scores masked with -inf, per-token decays from a token-major cumulative sum (tm)."
    b, l, h, p, g, n = check_ssd_inputs(X, A, B, C, initial_states)
    dtype = torch.promote_types(X.dtype, torch.float32)
    Xc, Ac, B, C = chunk_inputs(X, A.to(dtype), B, C, chunk_size)      # (b, c, Q, h, p), (b, c, Q, h)
    Qn, r = Xc.size(2), h // g
    tri = torch.ones(Qn, Qn, dtype=torch.float64, device=X.device).tril()
    S_hm = (Ac.transpose(-1, -2).double() @ tri.T).to(dtype).unflatten(2, (g, r))      # (b, c, g, r, Q)
    S_tm = (tri @ Ac.double()).to(dtype) if tm else S_hm.flatten(2, 3).transpose(-1, -2)   # (b, c, Q, h); hm: a view
    tok = lambda v: v.unflatten(-1, (g, r)).unsqueeze(-1)                               # (b, c, Q, h) -> (b, c, Q, g, r, 1)
    Xc = Xc.unflatten(-2, (g, r))                                                       # (b, c, Q, g, r, p)
    from_start, to_end = torch.exp(S_tm), torch.exp(S_tm[:, :, -1:] - S_tm)
    Xd = (Xc * tok(to_end)).to(X.dtype)
    states = torch.einsum("...lgn,...lgrp->...grpn", B, Xd).to(dtype)
    s0 = Xc.new_zeros(b, h, p, n, dtype=dtype) if initial_states is None else initial_states.to(dtype)
    if e16:
        entering, final_state = pass_states_half(states, from_start[:, :, -1].unflatten(-1, (g, r)), s0.unflatten(1, (g, -1)), C.dtype)
    else:
        entering, final_state = pass_states(states, from_start[:, :, -1].unflatten(-1, (g, r)), s0.unflatten(1, (g, -1)))
    C_state = torch.einsum("...lgn,...grpn->...lgrp", C, entering.to(C.dtype))
    q = block if Qn % block == 0 else Qn
    if assemble == "pad":
        k = Qn // q
        causal = torch.ones(q, q, dtype=torch.bool, device=X.device).tril()
        Sd = S_hm.unflatten(-1, (k, q)).movedim(-2, 2)                                  # (b, c, k, g, r, q)
        L = (Sd[..., :, None] - Sd[..., None, :]).masked_fill(~causal, -math.inf).exp()
        Cb, Bb, Xb = (t.unflatten(2, (k, q)) for t in (C, B, Xc))
        CB = torch.einsum("...lgn,...sgn->...gls", Cb, Bb)                               # (b, c, k, g, q, q)
        M = (L * CB.unsqueeze(-3)).to(X.dtype)
        Y = torch.einsum("...grls,...sgrp->...lgrp", M, Xb).flatten(2, 3).float() + C_state * tok(from_start)
        for e in range(q, Qn, q):
            rw = slice(e, e + q)
            Xw = (Xc[:, :, :e] * tok(torch.exp(S_tm[:, :, e - 1:e] - S_tm[:, :, :e]))).to(X.dtype)
            CBe = torch.einsum("...lgn,...sgn->...gls", C[:, :, rw], B[:, :, :e])
            Ye = torch.einsum("...gls,...sgrp->...lgrp", CBe, Xw) * tok(torch.exp(S_tm[:, :, rw] - S_tm[:, :, e - 1:e]))
            Y = Y + F.pad(Ye, (0, 0, 0, 0, 0, 0, e, Qn - e - q))
        Y = Y.to(X.dtype)
        return Y.flatten(1, 2)[:, :l].flatten(-3, -2), final_state.flatten(1, 2)
    causal = torch.ones(q, q, dtype=torch.bool, device=X.device).tril()
    info = torch.finfo(dtype)
    floor = torch.full((q, q), math.log(info.tiny / info.eps), dtype=dtype, device=X.device)
    rows = []
    for e in range(0, Qn, q):
        rw = slice(e, e + q)
        Sd = S_hm[..., rw]
        d = Sd[..., :, None] - Sd[..., None, :]
        L = d.masked_fill(~causal, -math.inf).exp() if mask == "inf" else d.clamp(floor, floor.masked_fill(causal, math.inf)).exp()
        CB = torch.einsum("...lgn,...sgn->...gls", C[:, :, rw], B[:, :, rw])
        if mask != "inf":
            CB = CB.tril()
        M = (L * CB.unsqueeze(-3)).to(X.dtype)
        Yr = torch.einsum("...grls,...sgrp->...lgrp", M, Xc[:, :, rw]).float() + C_state[:, :, rw] * tok(from_start[:, :, rw])
        if e:
            Xw = (Xc[:, :, :e] * tok(torch.exp(S_tm[:, :, e - 1:e] - S_tm[:, :, :e]))).to(X.dtype)
            CBe = torch.einsum("...lgn,...sgn->...gls", C[:, :, rw], B[:, :, :e])
            Yr = Yr + torch.einsum("...gls,...sgrp->...lgrp", CBe, Xw) * tok(torch.exp(S_tm[:, :, rw] - S_tm[:, :, e - 1:e]))
        rows.append(Yr.to(X.dtype))
    if assemble == "assign":
        Y = torch.empty_like(Xc)
        for i, Yr in enumerate(rows):
            Y[:, :, i * q:(i + 1) * q] = Yr
    else:
        Y = torch.cat(rows, 2) if len(rows) > 1 else rows[0]
    return Y.flatten(1, 2)[:, :l].flatten(-3, -2), final_state.flatten(1, 2)


R2_VARIANTS = {"r2_128": dict(block=128), "r2_64": dict(block=64), "r2_256": dict(block=256),
               "r2_128_hm": dict(block=128, tm=False), "r2_128_clamp": dict(block=128, mask="clamp"),
               "r2_256_hm": dict(block=256, tm=False), "r2_128_pad": dict(block=128, assemble="pad"),
               "r2_128_assign": dict(block=128, assemble="assign"), "r2_128_e16": dict(block=128, e16=True),
               "r2_128_pad_e16": dict(block=128, assemble="pad", e16=True), "r2_64_pad": dict(block=64, assemble="pad")}


BLOCK_VARIANTS = {"blk64": dict(block=64), "blk32": dict(block=32), "blk128": dict(block=128),
            "blk64_g2": dict(block=64, groups=2), "blk256": dict(block=256), "blk256_g4": dict(block=256, groups=4),
            "blk64_tm": dict(block=64, tm=True), "blk32_tm": dict(block=32, tm=True), "blk256_g2": dict(block=256, groups=2),
            "blk256_tm": dict(block=256, tm=True), "blk256_g2_tm": dict(block=256, groups=2, tm=True)}


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
    for name, kw in R2_VARIANTS.items():
        fns[name] = (lambda kw: lambda x, dt, a, B, C: ssd_rows2(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, **kw))(kw)
    for name, kw in BLOCK_VARIANTS.items():
        fns[name] = (lambda kw: lambda x, dt, a, B, C: ssd_blocks(x * dt[..., None].to(x.dtype), dt * a, B, C, Q, **kw))(kw)
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
                try:
                    r["graph_ms"] = graph_ms(fn, x, dt, a, B, C)
                except Exception as e:
                    r["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
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
