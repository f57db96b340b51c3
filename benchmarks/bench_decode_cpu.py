"""Greedy decoding on CPU: mamba2's Mamba2LMHeadModel against transformers' Mamba2ForCausalLM, same weights, same run.

A mamba2-130m-shaped model (d_model 768, 24 layers, vocabulary 50288, d_state 128, headdim 64, expand 2) with random
weights, float32, batch 1: a 64-token prompt, then 64 new tokens, greedy. Each side's time is the whole `generate`
call (prompt and decoding); tokens/s = 64 / median time over the repeats, after a warm-up, the two sides
interleaved so that both see the same machine load. Both must produce the same tokens. Target: ours >= 1.5x.

    python benchmarks/bench_decode_cpu.py [--repeats 5] [--threads N] [--out benchmarks/results/decode_cpu.json]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import Mamba2Config as HFConfig
from transformers import Mamba2ForCausalLM

from mamba2.lm import Mamba2LMHeadModel

PROMPT_LEN, NEW_TOKENS = 64, 64


def cpu_name():
    try:
        return next(
            l.split(":", 1)[1].strip()
            for l in open("/proc/cpuinfo")
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "decode_cpu.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    config = HFConfig(
        vocab_size=50288,
        hidden_size=768,
        num_hidden_layers=24,
        state_size=128,
        head_dim=64,
        num_heads=24,
        n_groups=1,
        expand=2,
        chunk_size=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    theirs = Mamba2ForCausalLM(config).eval()
    theirs.generation_config.eos_token_id = None  # always 64 new tokens on both sides
    with (
        tempfile.TemporaryDirectory() as folder
    ):  # the same weights, through a real checkpoint
        theirs.save_pretrained(folder)
        ours = Mamba2LMHeadModel.from_pretrained(folder)
    prompt = torch.randint(
        1, 50277, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(prompt)

    runs = {
        "mamba2": lambda: ours.generate(prompt, NEW_TOKENS, temperature=0),
        "transformers": lambda: theirs.generate(
            prompt,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            attention_mask=mask,
        ),
    }
    outputs = {
        name: run() for name, run in runs.items()
    }  # warm-up, and the check that both agree
    assert outputs["mamba2"].shape == (1, PROMPT_LEN + NEW_TOKENS)
    same_tokens = torch.equal(outputs["mamba2"], outputs["transformers"])
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: both sides see the same load
        for name, run in runs.items():
            start = time.perf_counter()
            with torch.inference_mode():
                run()
            times[name].append(time.perf_counter() - start)
    tps = {name: NEW_TOKENS / statistics.median(t) for name, t in times.items()}
    ratio = tps["mamba2"] / tps["transformers"]
    result = {
        "benchmark": "greedy decoding, mamba2-130m-shaped random model, float32, batch 1, "
        f"{PROMPT_LEN}-token prompt + {NEW_TOKENS} new tokens, whole generate call",
        "tokens_per_s": {k: round(v, 2) for k, v in tps.items()},
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_mamba2_over_transformers": round(ratio, 3),
        "target_ratio": 1.5,
        "meets_target": ratio >= 1.5,
        "same_greedy_tokens": same_tokens,
        "hardware": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0],
            "machine": platform.machine(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "repeats": args.repeats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not same_tokens:
        sys.exit("the two models disagree on the greedy tokens")


if __name__ == "__main__":
    main()
