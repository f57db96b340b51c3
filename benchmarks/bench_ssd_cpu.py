"""CPU benchmark of `mamba2.ssd` against transformers' pure-PyTorch chunked scan.

What is measured
    The SSD core at Mamba-2-130m's shape: b=1, h=24, p=64, n=128, g=1, chunk_size Q=256, float32,
    for l = 1024, 4096, 16384 (or --lengths). Two implementations of the same computation on the
    same inputs (raw x, dt = softplus(randn - 4), a = -U(1, 16), B, C from seed 0):
      * mamba2:       mamba2.ssd(x * dt, dt * a, B, C, 256), the front door (impl="auto": ssd_fast),
                      discretization included;
      * mamba2_chunked: the same with impl="chunked", chapter 4's plain ssd_chunked;
      * transformers: transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan(x, dt, a, B, C, 256,
                      return_final_states=True), the pure-PyTorch path that Mamba2Mixer falls back to
                      when mamba_ssm's kernels are missing (it discretizes inside). It is called, not copied.
    All return outputs and the final state. Before timing, the run checks that ours agree with
    transformers' on a length that is not a multiple of Q, with an initial state (relative errors go
    into the JSON).

How
    Every (implementation, length) case runs in a fresh subprocess, so that one case's allocations
    cannot hide another's. In it: build the inputs, one warm-up call, then
      * time: the median of --repeats calls (wall clock, time.perf_counter), with glibc's default
        allocator, as users run;
      * peak memory: glibc is told to return every block over 1 MiB to the OS when freed
        (mallopt M_MMAP_THRESHOLD) and to trim its heap; Linux's high-water mark of resident memory is
        reset (`5` into /proc/self/clear_refs); the call runs; peak memory = VmHWM - VmRSS before the
        call: the extra resident memory the call needed at its peak, inputs excluded. (This setting
        makes every new tensor over 1 MiB page-fault, so no time is taken under it.)
    Growth ratios are against the shortest length (linear growth: ratio = length ratio); speedups are
    transformers' time (memory) over ours, same length, same run. The JSON records the machine,
    versions, thread count, load average, and every raw number. Not part of the CPU suite (no chapter
    reads its results): run it on its own.

Usage
    python benchmarks/bench_ssd_cpu.py --out OUTDIR          # all cases, writes OUTDIR/ssd_cpu_*.json
    python benchmarks/bench_ssd_cpu.py --threads 1 --repeats 5 --lengths 1024 4096
    python benchmarks/bench_ssd_cpu.py --lengths 1024 --repeats 1 --out /tmp   # a quick check
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(b=1, h=24, p=64, n=128, g=1)
CHUNK = 256
OURS = {
    "mamba2": "auto",
    "mamba2_chunked": "chunked",
}  # our implementations: name -> impl
IMPLS = (*OURS, "transformers")


def inputs(l, seed=0, initial_states=False):
    "Raw inputs in transformers' convention: x (b, l, h, p), dt (b, l, h), a (h,), B, C (b, l, g, n)."
    b, h, p, n, g = (SHAPE[k] for k in "bhpng")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 4)
    a = -torch.empty(h).uniform_(1, 16, generator=gen)
    B, C = (torch.randn(b, l, g, n, generator=gen) for _ in range(2))
    s0 = torch.randn(b, h, p, n, generator=gen) if initial_states else None
    return x, dt, a, B, C, s0


def runner(impl):
    "A function of the raw inputs returning (Y, final_state), for each implementation."
    if impl in OURS:
        from mamba2 import ssd

        return lambda x, dt, a, B, C, s0=None: ssd(
            x * dt[..., None], dt * a, B, C, CHUNK, s0, impl=OURS[impl]
        )
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return lambda x, dt, a, B, C, s0=None: mamba2_chunk_scan(
        x, dt, a, B, C, CHUNK, initial_states=s0, return_final_states=True
    )


def mib(key):
    return (
        int(
            re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(
                1
            )
        )
        / 1024
    )


def run_case(impl, l, repeats):
    "One case, in this (fresh) process: the median time of `repeats` calls, then the peak memory of one call."
    f, args = runner(impl), inputs(l)[:5]
    f(*args)  # warm-up
    times = []
    for _ in range(repeats):  # glibc's default allocator, as users run
        t = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, fixed
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = mib("VmRSS")
    f(*args)
    peak = mib("VmHWM") - before
    return {
        "impl": impl,
        "l": l,
        "seconds": statistics.median(times),
        "all_seconds": times,
        "peak_mib": peak,
    }


def agreement(l=1000):
    "Relative max errors of ours against transformers', on a partial last chunk, with an initial state."
    args = inputs(l, seed=1, initial_states=True)
    Yt, st = runner("transformers")(*args)
    rel = lambda u, v: ((u - v).abs().max() / v.abs().max()).item()
    out = {"l": l}
    for impl in OURS:
        Y, s = runner(impl)(*args)
        out[impl] = {"output_rel_err": rel(Y, Yt), "final_state_rel_err": rel(s, st)}
    return out


def machine():
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    import transformers

    return {
        "cpu": cpu.group(1) if cpu else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        ),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument(
        "--case", nargs=2, metavar=("IMPL", "L"), help=argparse.SUPPRESS
    )  # internal: one subprocess
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.repeats)))
        return
    for dtype in (
        torch.float32,
        torch.float64,
    ):  # the first multi-threaded exp of a process can be inaccurate (tests/conftest.py)
        torch.exp(torch.randn(1 << 20, dtype=dtype))
    load_before, cases = os.getloadavg(), []
    for l in args.lengths:
        for impl in IMPLS:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    impl,
                    str(l),
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            cases.append(json.loads(out.stdout.strip().splitlines()[-1]))
            c = cases[-1]
            print(
                f"{impl:>14}  l={l:6d}  {c['seconds'] * 1e3:9.1f} ms  peak +{c['peak_mib']:8.1f} MiB",
                flush=True,
            )
    res = {(c["impl"], c["l"]): c for c in cases}
    l0 = args.lengths[0]
    summary = {
        impl: {
            str(l): {
                "length_ratio": l / l0,
                "time_ratio": res[impl, l]["seconds"] / res[impl, l0]["seconds"],
                "memory_ratio": res[impl, l]["peak_mib"] / res[impl, l0]["peak_mib"],
            }
            for l in args.lengths
        }
        for impl in IMPLS
    }
    speedup = {
        impl: {
            str(l): {
                "time": res["transformers", l]["seconds"] / res[impl, l]["seconds"],
                "peak_memory": res["transformers", l]["peak_mib"]
                / res[impl, l]["peak_mib"],
            }
            for l in args.lengths
        }
        for impl in OURS
    }
    report = {
        "benchmark": "mamba2.ssd (impl auto and chunked) vs transformers mamba2_chunk_scan (pure PyTorch), "
        "CPU float32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": machine(),
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "shape": SHAPE | {"chunk_size": CHUNK, "dtype": "float32"},
        "repeats": args.repeats,
        "agreement": agreement(),
        "cases": cases,
        "growth_vs_shortest": summary,
        "transformers_over_mamba2": speedup,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ssd_cpu_{report['date'][:10]}_t{args.threads}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    for impl in OURS:
        for l in args.lengths:
            s, m = summary[impl][str(l)], speedup[impl][str(l)]
            print(
                f"l={l:6d}: {impl} time x{s['time_ratio']:.2f}, memory x{s['memory_ratio']:.2f} for length "
                f"x{s['length_ratio']:.0f}; transformers / {impl}: time {m['time']:.2f}x, peak memory "
                f"{m['peak_memory']:.2f}x"
            )
    print("agreement:", report["agreement"], "\nwrote", path)


if __name__ == "__main__":
    main()
