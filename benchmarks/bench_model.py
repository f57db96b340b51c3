"""The block, the language model and decoding: `mamba2` against transformers' Mamba-2, same weights.

One transformers `Mamba2ForCausalLM` with random weights (mamba2-130m-shaped unless told otherwise) is
saved with `save_pretrained` and loaded by `Mamba2LMHeadModel.from_pretrained`, so both sides hold the
same numbers. Measured, each in one process and one run:
Ours is `mamba2` with `Mamba2Config.impl` set by `--impls` (default `auto`, the front door's choice:
`ssd_fast`; `chunked`: chapter 4's plain `ssd_chunked`), one model per implementation, named `mamba2`
(auto) and `mamba2_IMPL` (the others).
- `block`: layer 0's mixer forward, `u: (b, l, d_model)`, ours (eager, and compiled on CUDA) against
  transformers' `Mamba2Mixer`; median time and peak memory above the inputs. Compiled once for
  every length (`torch.compile(block)`, the length of `u` marked dynamic): each shape records its
  first call's time (`first_call_s`: the compilation when `new_graphs` is 1) apart from the steady
  state (`s`), and the first compiled shape is also called at a second, odd length under
  `set_stance("fail_on_recompile")` (`second_length_recompiled`: False when no graph was made);
- `lm`: the whole model's forward to logits;
- `decode`: greedy decoding, tokens per second, ours `generate(temperature=0)` against transformers'
  `generate(do_sample=False)`, and whether the tokens agree;
- `step`: our per-token step time after prefills of different lengths.
transformers must run its own PyTorch path: keep mamba_ssm off the Python path of this process.
Usage: `python benchmarks/bench_model.py --device cuda --dtype bfloat16 --out results.json`.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch
from bench_ssd_gpu import env_info
from torch._dynamo.utils import counters

import mamba2

STEP_ROUNDS = 5  # rounds of step timings, each position once per round


def timer(device):
    "A function `t(fn, reps)` returning the median seconds of `fn()` after one warm-up call."

    def t(fn, reps=5, warmup=1):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            if device == "cuda":
                s, e = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        t.last = ts
        return statistics.median(ts)

    return t


def peak_mib(fn, device):
    "Peak memory during `fn()` above what was in use before, in MiB (CUDA allocator, or the process's RSS on CPU)."
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets the high-water mark VmHWM
        f.write("5")
    base = _status("VmRSS")
    fn()
    return (_status("VmHWM") - base) / 1024


def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def second_length(m, u, device):
    """Call the compiled `m` at a second, odd length (`l - 1` tokens of `u`), where a
    new compilation would raise; what happened, for the results file."""
    v = u[:, 1:].clone()
    torch._dynamo.mark_dynamic(v, 1)
    r = {"second_length": v.size(1)}
    t0 = time.perf_counter()
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            m(v)
        device == "cuda" and torch.cuda.synchronize()
        r["second_length_recompiled"] = False
    except RuntimeError as e:
        if "recompile" not in str(e):
            raise
        r["second_length_recompiled"] = True
    r["second_length_first_call_s"] = round(time.perf_counter() - t0, 2)
    return r


def build(args, device, dtype):
    "transformers' model and ours (one per implementation in --impls) with the same random weights."
    from transformers import Mamba2Config as HFConfig
    from transformers import Mamba2ForCausalLM

    cfg = HFConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_hidden_layers=args.n_layer,
        state_size=128,
        expand=2,
        head_dim=64,
        num_heads=2 * args.d_model // 64,
        n_groups=1,
        chunk_size=256,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        residual_in_fp32=True,
        tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
        rms_norm=True,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = {}
        for impl in args.impls.split(","):
            model = mamba2.Mamba2LMHeadModel.from_pretrained(
                d, device=device, dtype=dtype
            )
            model.config.impl = impl  # shared by every block of the model
            ours["mamba2" if impl == "auto" else f"mamba2_{impl}"] = model
    hf = hf.to(device=device, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None
    return hf, ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50288)
    ap.add_argument(
        "--block", default="1x4096,1x16384", help="(b)x(l) shapes for the block forward"
    )
    ap.add_argument(
        "--lm", default="1x4096", help="(b)x(l) shapes for the model forward"
    )
    ap.add_argument("--decode", default="1x64x256", help="(b)x(prompt)x(new tokens)")
    ap.add_argument("--step-positions", default="1024,16384")
    ap.add_argument(
        "--compile", action="store_true", help="also time our block under torch.compile"
    )
    ap.add_argument(
        "--compile-cpu",
        action="store_true",
        help="with --compile: compile on a CPU too (a test of this script)",
    )
    ap.add_argument(
        "--compile-max-l",
        type=int,
        default=4096,
        help="compile only up to this length (compile time)",
    )
    ap.add_argument("--parts", default="block,lm,decode,step")
    ap.add_argument(
        "--impls",
        default="auto",
        help="Mamba2Config.impl of our model(s), e.g. auto,chunked",
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--max-transformers-l",
        type=int,
        default=1 << 30,
        help="skip transformers' block beyond this length (its PyTorch path needs memory ~ l * chunk * heads * state)",
    )
    ap.add_argument("--out", default="bench_model.json")
    args = ap.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    t = timer(dev)
    res = {"env": env_info(), "config": vars(args), "results": []}
    hf, ours_all = build(args, dev, dtype)
    ours = list(ours_all.values())[
        0
    ]  # the first implementation: compiled, and the step
    res["env"]["impls"] = args.impls
    parts = args.parts.split(",")

    def save(r):
        res["results"].append(r)
        print(json.dumps(r), flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    with torch.inference_mode():
        if "block" in parts:
            theirs = hf.backbone.layers[0].mixer
            variants = {
                name: m.backbone.layers[0].mixer for name, m in ours_all.items()
            } | {"transformers": theirs}
            if args.compile and (dev == "cuda" or args.compile_cpu):
                # compiled once: the length of u is marked dynamic (below)
                variants[list(ours_all)[0] + "_compiled"] = torch.compile(
                    ours.backbone.layers[0].mixer
                )
            second_length_checked = False
            for shape in args.block.split(","):
                b, l = map(int, shape.split("x"))
                u = torch.randn(
                    b,
                    l,
                    args.d_model,
                    device=dev,
                    dtype=dtype,
                    generator=torch.Generator(dev).manual_seed(1),
                )
                ref = theirs(u) if l <= args.max_transformers_l else None
                for name, m in variants.items():
                    if name.endswith("_compiled") and l > args.compile_max_l:
                        continue
                    r = {"part": "block", "shape": shape, "variant": name}
                    if ref is None and name == "transformers":
                        r["error"] = (
                            f"skipped: l > --max-transformers-l {args.max_transformers_l}"
                        )
                        save(r)
                        continue
                    try:
                        compiled = name.endswith("_compiled")
                        if compiled:  # one graph for every length
                            torch._dynamo.mark_dynamic(u, 1)
                            graphs = counters["stats"]["unique_graphs"]
                        t0 = time.perf_counter()
                        y = m(u)
                        dev == "cuda" and torch.cuda.synchronize()
                        # compiled: the compilation, if this call made a graph
                        r["first_call_s"] = round(time.perf_counter() - t0, 2)
                        if compiled:
                            r["new_graphs"] = (
                                counters["stats"]["unique_graphs"] - graphs
                            )
                            r["graphs_total"] = counters["stats"]["unique_graphs"]
                            r["graph_breaks"] = sum(counters["graph_break"].values())
                        if ref is not None:
                            r["rel_err_vs_transformers"] = rel(y, ref)
                        del y
                        r["s"] = t(lambda: m(u), args.reps)
                        r["peak_mib"] = peak_mib(lambda: m(u), dev)
                        if compiled and not second_length_checked:
                            r.update(second_length(m, u, dev))
                            second_length_checked = True
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    save(r)
                del ref, u
        if "lm" in parts:
            for shape in args.lm.split(","):
                b, l = map(int, shape.split("x"))
                ids = torch.randint(
                    0,
                    args.vocab,
                    (b, l),
                    device=dev,
                    generator=torch.Generator(dev).manual_seed(2),
                )
                ref = hf(ids).logits
                fns = {name: (lambda m=m: m(ids)) for name, m in ours_all.items()} | {
                    "transformers": lambda: hf(ids).logits
                }
                for name, fn in fns.items():
                    r = {"part": "lm", "shape": shape, "variant": name}
                    try:
                        r["rel_err_vs_transformers"] = rel(fn(), ref)
                        r["s"] = t(fn, args.reps)
                        r["peak_mib"] = peak_mib(fn, dev)
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    save(r)
                del ref
        if "decode" in parts:
            for shape in args.decode.split(","):
                b, lp, new = map(int, shape.split("x"))
                ids = torch.randint(
                    0,
                    args.vocab,
                    (b, lp),
                    device=dev,
                    generator=torch.Generator(dev).manual_seed(3),
                )
                outs = {}
                gens = {
                    name: (lambda m=m: m.generate(ids, new, temperature=0))
                    for name, m in ours_all.items()
                }
                gens["transformers"] = lambda: hf.generate(
                    ids, max_new_tokens=new, min_new_tokens=new, do_sample=False
                )
                for name, fn in gens.items():
                    r = {"part": "decode", "shape": shape, "variant": name}
                    try:
                        outs[name] = fn()
                        s = t(fn, max(1, args.reps // 2))
                        r.update(s=s, tokens_per_s=b * new / s, min_s=min(t.last))
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    save(r)
                mine = [k for k in outs if k != "transformers"]
                if mine and "transformers" in outs:
                    same = (
                        (outs[mine[0]][:, lp:] == outs["transformers"][:, lp:])
                        .float()
                        .mean()
                        .item()
                    )
                    save(
                        {
                            "part": "decode",
                            "shape": shape,
                            "variant": "agreement",
                            "same_token_fraction": same,
                        }
                    )
        if (
            "step" in parts
        ):  # prefill every position first, then time them in turn, round after round: drift hits all alike
            caches = {}
            for pos in map(int, args.step_positions.split(",")):
                ids = torch.randint(
                    0,
                    args.vocab,
                    (1, pos),
                    device=dev,
                    generator=torch.Generator(dev).manual_seed(4),
                )
                caches[pos] = (ids[:, -1], ours.allocate_cache(1))
                ours.hidden_states(ids, caches[pos][1])
            rounds = {pos: [] for pos in caches}
            for _ in range(STEP_ROUNDS):
                for pos, (tok, cache) in caches.items():
                    rounds[pos].append(
                        t(lambda: ours.step(tok, cache), args.reps, warmup=3)
                    )
            for pos, ts in rounds.items():
                save(
                    {
                        "part": "step",
                        "position": pos,
                        "variant": list(ours_all)[0],
                        "s": statistics.median(ts),
                        "min_s": min(ts),
                        "rounds_s": ts,
                    }
                )
    print(json.dumps(res["results"]))


if __name__ == "__main__":
    main()
