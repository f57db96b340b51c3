"""Plots of the suites' results: `python benchmarks/plot.py [DIR]` reads DIR/*.json (default benchmarks/results)
and writes DIR/ssd_gpu.png and DIR/scaling_cpu.png for the files it finds."""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ssd_gpu(res, ax_t, ax_m):
    "Time and peak memory of each variant at each shape; the roofline floor as a dashed line."
    shapes = list(dict.fromkeys(r["shape"] for r in res["results"]))
    ceil = res.get("ceilings", {"copy_TBps": 4.2, "bf16_matmul_TFLOPs": 714})
    floor = {
        r["shape"]: max(
            r["gflop"] / ceil["bf16_matmul_TFLOPs"], r["gbytes"] / ceil["copy_TBps"]
        )
        for r in res["results"]
    }
    for v in dict.fromkeys(r["variant"] for r in res["results"]):
        rs = {r["shape"]: r for r in res["results"] if r["variant"] == v and "ms" in r}
        if (
            len(rs) < 2
        ):  # the ablation's variants, measured at one shape: in the chapter's table instead
            continue
        xs = [i for i, s in enumerate(shapes) if s in rs]
        ax_t.plot(xs, [rs[shapes[i]]["ms"] for i in xs], "o-", label=v)
        ax_m.plot(xs, [rs[shapes[i]]["peak_mib"] for i in xs], "o-", label=v)
    ax_t.plot(
        range(len(shapes)),
        [floor[s] for s in shapes],
        "k--",
        marker="_",
        ms=20,
        label="roofline floor",
    )
    for ax, lab in (
        (ax_t, "median time (ms)"),
        (ax_m, "peak memory above inputs (MiB)"),
    ):
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_ylabel(lab)
        ax.set_xlabel("(b, l)")
    ax_t.legend(fontsize=7)
    env = res["env"]
    ax_t.set_title(
        f"SSD, bf16, {env.get('gpu', '?')}, {env['date_utc'][:10]}", fontsize=9
    )


def scaling_cpu(res, ax_t, ax_m):
    "Log-log time and memory against length for each algorithm, with a slope-1 guide."
    for a in dict.fromkeys(r["algo"] for r in res["results"]):
        rs = [r for r in res["results"] if r["algo"] == a]
        ax_t.loglog([r["l"] for r in rs], [r["s"] for r in rs], "o-", label=a)
        ax_m.loglog(
            [r["l"] for r in rs], [max(r["peak_mib"], 1e-3) for r in rs], "o-", label=a
        )
    for ax, lab in ((ax_t, "median time (s)"), (ax_m, "peak memory growth (MiB)")):
        ax.set_xlabel("sequence length l")
        ax.set_ylabel(lab)
    ax_t.legend()
    ax_t.set_title(
        f"SSD on the CPU, float32, {res['env']['date_utc'][:10]}", fontsize=9
    )


def main(folder):
    folder = Path(folder)
    for name, draw in (("ssd_gpu", ssd_gpu), ("scaling_cpu", scaling_cpu)):
        f = folder / f"{name}.json"
        if f.exists():
            fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
            draw(json.loads(f.read_text()), a, b)
            fig.tight_layout()
            fig.savefig(folder / f"{name}.png", dpi=110)
            plt.close(fig)
            print("wrote", folder / f"{name}.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
