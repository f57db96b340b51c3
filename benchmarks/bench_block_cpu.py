"""Benchmark: the Mamba-2 block's forward pass against transformers' Mamba2Mixer on CPU.

    python benchmarks/bench_block_cpu.py            # writes benchmarks/results/block_cpu.json (or --out)
    python benchmarks/bench_block_cpu.py --quick    # L = 1024 only, one round (a smoke test)
    python benchmarks/bench_block_cpu.py --threads 2


A mamba2-130m-shaped layer (d_model 768, expand 2, 24 heads of 64, d_state 128, ngroups 1,
chunk_size 256), float32, batch 1, sequence lengths 1k, 4k and 16k, inference (`torch.no_grad`).
Both blocks get the same weights (transformers' mixer is built from a fixed seed, its weights are
randomised, and our block loads its state dict with strict=True) and the same input.

Method. Every measurement runs in a fresh Python process, so that one case's allocations cannot
hide or inflate another's:
- peak memory growth: the process's peak resident set size (`ru_maxrss`) after the first forward
  pass, minus its resident set size just before it. It counts everything the pass allocates and
  touches, the returned output included, whatever allocator serves it.
- time: after that first (warm-up) pass, the median of `repeats` timed passes.
For each length the two implementations alternate, `rounds` processes each, so a change of load on
the machine hits both; the reported time is the median over all their timed passes, the reported
memory the largest growth seen. Both run with the same number of torch threads (`--threads`,
default 1: on a small machine shared with other jobs, a single thread per process gives the most
repeatable timings; with more threads than free cores, both implementations slow down erratically).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(
    d_model=768, d_state=128, headdim=64, expand=2, ngroups=1, chunk_size=256, d_conv=4
)


def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(impl, L, repeats, threads):
    "Build one block, measure one length, print a JSON line."
    import torch

    torch.set_num_threads(threads)
    import transformers.utils.logging as hf_logging
    from transformers import Mamba2Config as HFConfig
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    hf_logging.set_verbosity_error()
    from mamba2 import Mamba2, Mamba2Config

    torch.manual_seed(0)
    c = Mamba2Config(**SHAPE)
    hf = HFConfig(
        hidden_size=c.d_model,
        expand=c.expand,
        num_heads=c.nheads,
        head_dim=c.headdim,
        state_size=c.d_state,
        n_groups=c.ngroups,
        conv_kernel=c.d_conv,
        chunk_size=c.chunk_size,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
        vocab_size=16,
    )
    block = Mamba2Mixer(hf, layer_idx=0).eval()
    with torch.no_grad():
        for p in block.parameters():  # the same (seeded) weights in both processes
            p.add_(torch.randn_like(p) * 0.02)
    if impl == "mamba2":
        ours = Mamba2(c).eval()
        ours.load_state_dict(block.state_dict(), strict=True)
        block = ours
    u = torch.randn(1, L, c.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = rss_bytes()
        t0 = time.perf_counter()
        y = block(u)
        first = time.perf_counter() - t0
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        checksum = y.double().abs().mean().item()
        del y
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            block(u)
            times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            dict(
                impl=impl,
                L=L,
                peak_growth_bytes=growth,
                first_s=first,
                times_s=times,
                checksum=checksum,
                threads=torch.get_num_threads(),
            )
        )
    )


def run_case(impl, L, repeats, threads):
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            impl,
            str(L),
            str(repeats),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment(threads):
    import torch
    import transformers

    cpu = next(
        (
            l.split(":", 1)[1].strip()
            for l in open("/proc/cpuinfo")
            if l.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        (
            int(l.split()[1]) * 1024
            for l in open("/proc/meminfo")
            if l.startswith("MemTotal")
        ),
        None,
    )
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=cpu,
        cpu_count=os.cpu_count(),
        memory_bytes=mem,
        torch_threads=threads,
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        platform=platform.platform(),
        git_commit=commit,
        load_average_at_start=os.getloadavg(),
    )


def main(
    quick=False, threads=1, out=ROOT / "benchmarks" / "results" / "block_cpu.json"
):
    lengths, rounds = ([1024], 1) if quick else ([1024, 4096, 16384], 2)
    result = dict(
        benchmark=__doc__.split("\n")[0],
        shape=SHAPE,
        dtype="float32",
        batch=1,
        mode="torch.no_grad",
        method="fresh process per case; time: median of timed passes after one warm-up pass; "
        "memory: peak RSS (ru_maxrss) minus RSS before the first pass, max over processes",
        environment=environment(threads),
        cases=[],
    )
    for L in lengths:
        repeats = 3 if L > 8192 else 5
        runs = {"mamba2": [], "transformers": []}
        for _ in range(rounds):
            for impl in runs:  # alternate the two, round after round
                runs[impl].append(run_case(impl, L, repeats, threads))
        summary = {}
        for impl, rs in runs.items():
            summary[impl] = dict(
                time_s=statistics.median(t for r in rs for t in r["times_s"]),
                peak_growth_mib=max(r["peak_growth_bytes"] for r in rs) / 2**20,
                all_times_s=[t for r in rs for t in r["times_s"]],
                all_peak_growth_mib=[r["peak_growth_bytes"] / 2**20 for r in rs],
            )
        ours, theirs = summary["mamba2"], summary["transformers"]
        same = (
            abs(runs["mamba2"][0]["checksum"] - runs["transformers"][0]["checksum"])
            / runs["transformers"][0]["checksum"]
        )
        case = dict(
            L=L,
            **{f"{k}": v for k, v in summary.items()},
            time_ratio=ours["time_s"] / theirs["time_s"],
            memory_ratio=ours["peak_growth_mib"] / theirs["peak_growth_mib"],
            output_checksum_rel_diff=same,
        )
        result["cases"].append(case)
        print(
            f"L={L:6d}: mamba2 {ours['time_s']:.3f} s, {ours['peak_growth_mib']:.0f} MiB | "
            f"transformers {theirs['time_s']:.3f} s, {theirs['peak_growth_mib']:.0f} MiB | "
            f"time ratio {case['time_ratio']:.2f}, memory ratio {case['memory_ratio']:.2f}",
            flush=True,
        )
    if not quick:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        ap = argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument(
            "--out",
            type=Path,
            default=ROOT / "benchmarks" / "results" / "block_cpu.json",
        )
        args = ap.parse_args()
        main(args.quick, args.threads, args.out)
