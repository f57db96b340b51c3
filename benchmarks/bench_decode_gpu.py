"""Greedy decoding on one GPU: ours (plain step; CUDA graph of the plain step; CUDA graph of chapter 10's
Triton kernels) beside mamba_ssm's `generate` (cg=False, cg=True).

    PARTS=decode bash benchmarks/run_gpu.sh [OUTDIR]      # the GPU suite's way: mamba_ssm's source on the path
    python benchmarks/bench_decode_gpu.py [--batches 1,16] [--new 128] [--repeats 3] [--sweep] [--out FILE]

A mamba2-130m-shaped model (d_model 768, 24 layers, vocabulary 50277 padded to 50288, d_state 128, headdim 64),
bfloat16, random weights: mamba_ssm's `MambaLMHeadModel` is built and initialised by mamba_ssm, saved in its
format (config.json, pytorch_model.bin) and loaded by ours with `from_pretrained`, so both run the same weights.
A 64-token prompt, then `--new` new tokens, greedy, no EOS; both sides pick from the first 50277 logits only.
Time of the whole `generate` call (prompt included), after a warm-up call (which also captures the graphs),
the variants interleaved so that they see the same machine; tokens/s = batch * new / median time.
`ours_graph` replays the plain step (chapter 7, `kernels=False`); `ours_kernels` replays chapter 10's fused step
(`generate`'s default on a GPU with Triton), from another handle on the same model so that each keeps its graph.
Also: the kernels one step launches (torch.profiler), plain and fused, and the time of one step launched kernel
by kernel and replayed from the graph, for both; and the prompt's time alone (64 and 100 tokens), the forward
pass launched op by op against `GraphedStep.prefill` (whole 64-token pieces from a graph, the rest a step each). Without mamba_ssm importable, ours alone is measured and the
reason is recorded; without Triton, the fused variant is left out and the reason recorded.
`--sweep`: the fused step's time with kernel A's tiles of 4-64 rows and 2, 4 or 8 warps, at each batch and 64
(`kernel_a_sweep`).
"""

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

import mamba2
from mamba2 import Mamba2Config, Mamba2LMHeadModel, generation, graphs
from mamba2.graphs import GraphedStep
from mamba2.ssd import has_triton

D_MODEL, N_LAYER, VOCAB, PAD, PROMPT = 768, 24, 50277, 16, 64


def run_text(*cmd):
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def env_info():
    "The machine, the versions, the commit and the date, as the other GPU benchmarks write them."
    props = torch.cuda.get_device_properties(0)
    info = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        python=platform.python_version(),
        torch=torch.__version__,
        host=platform.node(),
        cpu_count=os.cpu_count(),
        gpu=props.name,
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        sm_count=props.multi_processor_count,
        cuda=torch.version.cuda,
        driver=run_text(
            "nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"
        ),
        commit=os.environ.get("BENCH_COMMIT")
        or os.environ.get("MAMBA2_COMMIT")
        or run_text("git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"),
        mamba2=mamba2.__version__,
    )
    for name in ("triton", "transformers", "mamba_ssm"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            pass
    return info


def import_mamba_ssm():
    """mamba_ssm's MambaLMHeadModel and MambaConfig from its source package, without its compiled extensions.

    run_gpu.sh unpacks the source and stubs its package __init__. mixer_seq_simple.py also imports the Mamba-1
    module, whose selective_scan_interface.py imports the compiled `selective_scan_cuda` at its top; Mamba-2
    never calls it, so an empty module stands in for it here (sys.modules). `causal_conv1d` is imported under
    try by mamba_ssm itself: absent, its Mamba-2 step rolls the convolution state with PyTorch operations and
    its prompt pass uses nn.Conv1d. The layer is built with use_mem_eff_path=False (the fused path needs
    causal_conv1d; generate does not take it anyway, since it passes an inference cache)."""
    sys.modules.setdefault(
        "selective_scan_cuda", types.ModuleType("selective_scan_cuda")
    )
    import mamba_ssm
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    return mamba_ssm, MambaConfig, MambaLMHeadModel


def build_models(dtype):
    "(ours, theirs or None, why theirs is None): the same random weights on both sides."
    torch.manual_seed(0)
    try:
        mamba_ssm, MambaConfig, MambaLMHeadModel = import_mamba_ssm()
    except Exception as e:
        why = f"mamba_ssm not importable: {type(e).__name__}: {e}"
        config = Mamba2Config(
            d_model=D_MODEL,
            n_layer=N_LAYER,
            vocab_size=VOCAB,
            pad_vocab_size_multiple=PAD,
        )
        return Mamba2LMHeadModel(config, device="cuda", dtype=dtype).eval(), None, why
    config = MambaConfig(
        d_model=D_MODEL,
        n_layer=N_LAYER,
        vocab_size=VOCAB,
        pad_vocab_size_multiple=PAD,
        ssm_cfg={"layer": "Mamba2", "use_mem_eff_path": False},
    )
    theirs = MambaLMHeadModel(config, device="cuda", dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as folder:  # mamba_ssm's format, read by ours
        Path(folder, "config.json").write_text(json.dumps(dataclasses.asdict(config)))
        torch.save(theirs.state_dict(), Path(folder, "pytorch_model.bin"))
        ours = Mamba2LMHeadModel.from_pretrained(folder, device="cuda", dtype=dtype)
    mine, sd = ours.state_dict(), theirs.state_dict()
    same = set(mine) == set(sd) and all(torch.equal(v, sd[k]) for k, v in mine.items())
    assert same, "the weights did not arrive unchanged"
    return ours.eval(), theirs, None


@contextmanager
def plain_graph():
    "Inside, generate's CUDA graphs capture the plain step (chapter 7): kernels=False."
    generation.graphed_step = partial(graphs.graphed_step, kernels=False)
    try:
        yield
    finally:
        generation.graphed_step = graphs.graphed_step


def plain_graph_generate(model, ids, new):
    with plain_graph():
        return model.generate(ids, new, temperature=0, cuda_graph=True)


def variants(ours, theirs, new):
    "name -> a function of the prompt that generates `new` tokens greedily."
    out = {
        "ours_eager": lambda ids: ours.generate(
            ids, new, temperature=0, cuda_graph=False
        ),
        "ours_graph": lambda ids: plain_graph_generate(ours, ids, new),
    }
    if has_triton():
        # another handle on the same modules and weights: graphed_step keeps one graph a
        # model, so the two graphed variants, interleaved, would otherwise recapture
        fused = copy.copy(ours)
        out["ours_kernels"] = lambda ids: fused.generate(
            ids, new, temperature=0, cuda_graph=True
        )
    if theirs is not None:
        for name, cg in (("mamba_ssm", False), ("mamba_ssm_cg", True)):
            out[name] = lambda ids, cg=cg: theirs.generate(
                ids, ids.shape[1] + new, top_k=1, vocab_size=VOCAB, cg=cg
            )
    return out


def timed(f, ids):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = f(ids)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def count_kernels(step):
    "Kernels and copies that one call of `step` runs on the GPU (torch.profiler)."
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    on_gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = sum(not e.name.startswith(("Memcpy", "Memset")) for e in on_gpu)
    return kernels, len(on_gpu) - kernels


def ms_per_call(step, steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


@torch.inference_mode()
def step_costs(model, batch, kernels=False, steps=50):
    """Kernels one step launches (profiler), and ms a step: launched one by one, and
    replayed from the graph. `kernels`: chapter 10's fused step, else the plain one."""
    cache, token = (
        model.allocate_cache(batch),
        torch.zeros(batch, dtype=torch.long, device="cuda"),
    )
    if kernels:
        from mamba2 import triton_step

        step = partial(triton_step.next_logits, model, token, cache)
    else:
        step = partial(model.next_logits, token, cache)
    for _ in range(3):  # warm-up (and, for the kernels, their compilation)
        step()
    n_kernels, copies = count_kernels(step)
    eager = ms_per_call(step, steps)
    graphed = GraphedStep(model, batch, kernels=kernels)
    assert graphed.kernels == kernels
    graphed(token)
    replay = ms_per_call(lambda: graphed(token), steps)
    return dict(kernels=n_kernels, copies=copies, eager_ms=eager, graph_ms=replay)


@torch.inference_mode()
def prefill_costs(model, batch, lengths=(PROMPT, PROMPT + 36), calls=10):
    """ms to bring a prompt into the cache and give its last logits: the forward pass
    launched op by op (as without graphs), and `GraphedStep.prefill` (whole pieces
    from a graph of the forward pass, the rest a replayed step each); and how far
    apart their logits are (relative, bfloat16)."""
    graphed, out = GraphedStep(model, batch), {}
    for length in lengths:
        ids = torch.randint(1, VOCAB, (batch, length), device="cuda")

        def eager():
            cache = model.allocate_cache(batch)
            return model.lm_head(model.hidden_states(ids, cache)[:, -1])

        want, got = eager(), graphed.prefill(model, ids).clone()  # warm-up, capture
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        out[str(length)] = dict(
            eager_ms=round(ms_per_call(eager, calls), 3),
            graph_ms=round(ms_per_call(lambda: graphed.prefill(model, ids), calls), 3),
            rel_err_logits=round(err, 5),
        )
    return out


@torch.inference_mode()
def kernel_a_sweep(model, batches, heights=(4, 8, 16, 32, 64), warps=(2, 4, 8)):
    """The fused step's time (ms, its graph replayed; triton.testing.do_bench, best of
    two) with kernel A's tiles of each height and warps, and as the launcher picks them
    ("picked"): the whole step, so that the states come from memory as in decoding."""
    from triton.testing import do_bench

    from mamba2 import triton_step

    picked, out = triton_step.ssm_step, {}
    try:
        for b in batches:
            rows = []
            for tile in [None] + [(h, w) for h in heights for w in warps]:
                forced = dict(zip(("block_p", "warps"), tile or ()))
                triton_step.ssm_step = partial(picked, **forced)
                graphed = GraphedStep(model, b, kernels=True)
                ms = min(do_bench(graphed.graph.replay, rep=150) for _ in range(2))
                named = forced or dict(block_p="picked", warps="picked")
                rows.append(dict(named, step_ms=round(ms, 4)))
            out[str(b)] = sorted(rows, key=lambda r: r["step_ms"])
    finally:
        triton_step.ssm_step = picked
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true", help="kernel A's tiles and warps")
    args = ap.parse_args()
    dtype = torch.bfloat16
    ours, theirs, why = build_models(dtype)
    print(
        "mamba_ssm:", why or "imported, the same weights loaded into ours", flush=True
    )
    res = dict(
        env=env_info(),
        config=dict(
            d_model=D_MODEL,
            n_layer=N_LAYER,
            vocab_size=VOCAB,
            padded_vocab=ours.lm_head.weight.shape[0],
            dtype="bfloat16",
            prompt=PROMPT,
            new=args.new,
            repeats=args.repeats,
            greedy=True,
            weights="random, mamba_ssm's init, the same on both sides"
            if theirs is not None
            else "random",
        ),
        mamba_ssm_error=why,
        step={},
        results=[],
    )
    batches = list(map(int, args.batches.split(",")))
    costs = {b: step_costs(ours, b) for b in batches}
    res["step"] = dict(
        kernels_per_step=costs[min(costs)]["kernels"],
        copies_per_step=costs[min(costs)]["copies"],
        eager_step_ms={str(b): round(c["eager_ms"], 3) for b, c in costs.items()},
        graph_step_ms={str(b): round(c["graph_ms"], 3) for b, c in costs.items()},
    )
    res["triton_error"] = None if has_triton() else "Triton not installed"
    if has_triton():  # chapter 10's fused step
        fused = {b: step_costs(ours, b, kernels=True) for b in batches}
        res["step"].update(
            fused_kernels_per_step=fused[min(fused)]["kernels"],
            fused_copies_per_step=fused[min(fused)]["copies"],
            fused_eager_step_ms={
                str(b): round(c["eager_ms"], 3) for b, c in fused.items()
            },
            fused_graph_step_ms={
                str(b): round(c["graph_ms"], 3) for b, c in fused.items()
            },
        )
    print(json.dumps(res["step"]), flush=True)
    if args.sweep and has_triton():
        res["kernel_a_sweep"] = kernel_a_sweep(ours, sorted({*batches, 64}))
        print("kernel_a_sweep", json.dumps(res["kernel_a_sweep"]), flush=True)
    res["prefill"] = {str(b): prefill_costs(ours, b) for b in batches}
    print("prefill", json.dumps(res["prefill"]), flush=True)
    for b in batches:
        ids = torch.randint(1, VOCAB, (b, PROMPT), device="cuda", generator=None)
        fs = variants(ours, theirs, args.new)
        outs = {
            name: f(ids) for name, f in fs.items()
        }  # warm-up: compile, autotune, capture
        times = {name: [] for name in fs}
        for _ in range(args.repeats):  # interleaved
            for name, f in fs.items():
                t, outs[name] = timed(f, ids)
                times[name].append(t)
        row = dict(batch=b)
        for name in fs:
            row[name] = round(b * args.new / statistics.median(times[name]), 1)
            row[name + "_times_s"] = [round(t, 4) for t in times[name]]
        row["same_tokens"] = torch.equal(outs["ours_eager"], outs["ours_graph"])
        if "ours_kernels" in fs:  # bfloat16: a rounding tipped may change a later token
            e, k = outs["ours_eager"][:, PROMPT:], outs["ours_kernels"][:, PROMPT:]
            row["kernels_same_tokens"] = torch.equal(e, k)
            row["kernels_tokens_agreeing_with_eager_before_first_difference"] = (
                round((e == k).cumprod(1).sum(1).float().mean().item(), 1)
                if e.shape == k.shape
                else None
            )
            row["kernels_over_graph"] = round(
                row["ours_kernels"] / row["ours_graph"], 2
            )
        if theirs is not None:
            a, c = outs["ours_graph"][:, PROMPT:], outs["mamba_ssm_cg"][:, PROMPT:]
            row["shape_ok"] = a.shape == c.shape
            agree = (a == c).cumprod(1).sum(1).float() if a.shape == c.shape else None
            row["tokens_agreeing_with_mamba_ssm_before_first_difference"] = (
                None if agree is None else round(agree.mean().item(), 1)
            )
            row["graph_over_mamba_ssm_cg"] = round(
                row["ours_graph"] / row["mamba_ssm_cg"], 2
            )
            if "ours_kernels" in fs:
                row["kernels_over_mamba_ssm_cg"] = round(
                    row["ours_kernels"] / row["mamba_ssm_cg"], 2
                )
        print(
            json.dumps({k: v for k, v in row.items() if not k.endswith("_s")}),
            flush=True,
        )
        res["results"].append(row)
    print(json.dumps(res["env"]))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
