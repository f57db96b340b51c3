#!/usr/bin/env bash
# The CPU suite (float32), one command: bash benchmarks/run_cpu.sh [OUTDIR]   (from the repository root; default benchmarks/results)
#
# Writes scaling_cpu.json (scan / quadratic / chunked: time and memory against length), block_cpu.json (chapter 5's
# benchmark: the mamba2-130m-shaped block against transformers' Mamba2Mixer at l = 1k, 4k, 16k), model_cpu.json
# (greedy decoding against transformers' generate, step time against position), the logs of the chapters' other
# CPU benchmarks when they exist; then plots with plot.py. Other work on the machine skews times: run it on an idle machine.
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
# Times are taken with glibc's default allocator, the one users run with. Only the scaling benchmark, which is about
# how peak memory grows, runs with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go back to the system at once, so the
# resident-set peaks are the tensors'); forcing every block over 64 KiB through mmap also makes each new tensor
# page-fault, which slows down code with many medium-sized temporaries (ours) far more than code with a few huge ones.
PY=${PYTHON:-python}

MALLOC_MMAP_THRESHOLD_=65536 $PY benchmarks/bench_scaling_cpu.py --lengths 1024,2048,4096,8192,16384 --max-scan 2048 --out "$OUT/scaling_cpu.json" \
  2>&1 | tee "$OUT/scaling_cpu.log"
# the chapters' own benchmarks: the block against transformers' Mamba2Mixer (chapter 5, writes block_cpu.json),
# chunked SSD against transformers' way (chapter 4), decoding against transformers' generate (chapter 7)
for b in bench_block_cpu bench_ssd_cpu bench_decode_cpu; do
  [ -f "benchmarks/$b.py" ] && $PY "benchmarks/$b.py" 2>&1 | tee "$OUT/$b.log"
done
# our step time against the position, after prompts of 1k and 16k tokens (4 layers of the mamba2-130m shape: the
# per-token step of each layer is what must not grow with the position, and 24 layers of 16k-token prefill take long)
$PY benchmarks/bench_model.py --device cpu --dtype float32 --parts step --n-layer 4 --step-positions 1024,16384 \
  --reps 5 --out "$OUT/model_cpu.json" 2>&1 | tee "$OUT/model_cpu.log"
$PY benchmarks/plot.py "$OUT" 2>&1 | tail -3 || true
