#!/usr/bin/env bash
# The CPU suite (float32), one command: bash benchmarks/run_cpu.sh [OUTDIR]   (from the repository root; default benchmarks/results)
#
# Writes what chapter 8 reads: scaling_cpu.json (ssd_scan, ssd_quadratic, mamba2.ssd and ssd_chunked: time and memory
# against length), block_cpu.json (chapter 5's benchmark: the mamba2-130m-shaped block against transformers' Mamba2Mixer
# at l = 1k, 4k, 16k), decode_cpu.json (chapter 7's: greedy decoding against transformers' generate), model_cpu.json
# (our step time against the position); logs and plots beside them. Other work on the machine skews times: run it on an
# idle machine, with the package installed (pip install -e .).
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Times are taken with glibc's default allocator, the one users run with. Only the scaling benchmark, which is about
# how peak memory grows, runs with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go back to the system at once, so the
# resident-set peaks are the tensors'); forcing every block over 64 KiB through mmap also makes each new tensor
# page-fault, which slows down code with many medium-sized temporaries (ours) far more than code with a few huge ones.
PY=${PYTHON:-python}

MALLOC_MMAP_THRESHOLD_=65536 $PY benchmarks/bench_scaling_cpu.py --lengths 1024,2048,4096,8192,16384 --max-scan 2048 \
  --out "$OUT/scaling_cpu.json" 2>&1 | tee "$OUT/scaling_cpu.log"
$PY benchmarks/bench_block_cpu.py --out "$OUT/block_cpu.json" 2>&1 | tee "$OUT/block_cpu.log"
$PY benchmarks/bench_decode_cpu.py --out "$OUT/decode_cpu.json" 2>&1 | tee "$OUT/decode_cpu.log"
# our step time against the position, after prompts of 1k and 16k tokens (4 layers of the mamba2-130m shape: the
# per-token step of each layer is what must not grow with the position, and 24 layers of 16k-token prefill take long)
$PY benchmarks/bench_model.py --device cpu --dtype float32 --parts step --n-layer 4 --step-positions 1024,16384 \
  --reps 5 --out "$OUT/model_cpu.json" 2>&1 | tee "$OUT/model_cpu.log"
$PY benchmarks/plot.py "$OUT" 2>&1 | tail -3 || true
