#!/usr/bin/env bash
# The GPU suite, one command: bash benchmarks/run_gpu.sh [OUTDIR]   (from the repository root; default benchmarks/results)
#
# Needs a CUDA GPU with PyTorch, Triton, transformers and einops, and mamba_ssm's source package for its Triton
# SSD kernels (no CUDA build: only its Python and Triton sources are used). Get the source package once with
#   pip download --no-deps --no-binary :all: --no-build-isolation mamba_ssm -d DIR
# and point MAMBA_SSM_SDIST at the .tar.gz (default: the first mamba_ssm-*.tar.gz in ./sdist or ../sdist).
# Writes what chapter 8 reads: ssd_gpu.json (SSD: the peers and mamba2.ssd at all shapes, the measured ceilings, a
# profile of eager mamba2.ssd), passes_gpu.json (the elementwise passes of eager ssd_fast), model_gpu.json (block, LM
# forward, decoding, step); logs and plots beside them. mamba2 is imported from this checkout (PYTHONPATH).
set -uo pipefail
OUT=${1:-benchmarks/results}
PARTS=${PARTS:-ssd,model,passes,kernels,profile,decode}    # which parts to run (comma-separated): all by default
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
REPO=$(pwd)
SDIST=${MAMBA_SSM_SDIST:-$(ls sdist/mamba_ssm-*.tar.gz ../sdist/mamba_ssm-*.tar.gz 2>/dev/null | head -1)}
if [ -z "$SDIST" ] || [ ! -f "$SDIST" ]; then
  echo "mamba_ssm's source package not found: set MAMBA_SSM_SDIST (see the top of this script)" >&2; exit 2
fi
# mamba_ssm's package __init__ imports CUDA extensions that are not built: replace it by a stub that only names
# the version; its ops/triton modules import nothing compiled.
MS=$(mktemp -d)
tar xzf "$SDIST" -C "$MS"
MSDIR=$(ls -d "$MS"/mamba_ssm-*)
VERSION=$(basename "$MSDIR" | sed 's/^mamba_ssm-//')
echo "__version__ = \"$VERSION\"  # stub written by run_gpu.sh" > "$MSDIR/mamba_ssm/__init__.py"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu_env.txt"

# 1. SSD against the kernel at every shape: the front door (mamba2.ssd, impl="auto": chapter 9's kernels on a GPU) and
#    chapter 8's ssd_fast (impl="fast"), eager and compiled once for every length; at (8, 4k) also chapter 4's plain
#    ssd_chunked; a profile of eager ssd_fast. transformers' PyTorch SSD needs about 100 GiB at (8, 4k): add hf@8x4k to
#    VARIANTS to run it (ssd_gpu_cold.json holds a run). VARIANTS overrides the list (see bench_ssd_gpu.py).
A=8x4k
VARIANTS=${VARIANTS:-"kernel,minimal,ssd,ssd_compiled,fast,fast_compiled,ssd_chunked@$A"}
if [[ ",$PARTS," == *",ssd,"* ]]; then
  PYTHONPATH="$REPO:$MSDIR" python3 benchmarks/bench_ssd_gpu.py --out "$OUT/ssd_gpu.json" --shapes 8x4k,8x1k,2x16k,1x64k \
    --variants "$VARIANTS" --profile "${PROFILE:-fast}" --dynamic 2>&1 | tee "$OUT/ssd_gpu.log"
fi
# 2. the cost of each elementwise pass eager ssd_fast needs, at (8, 4k), beside the kernel (chapter 8's floor for eager)
if [[ ",$PARTS," == *",passes,"* ]]; then
  PYTHONPATH="$REPO:$MSDIR" python3 benchmarks/bench_passes_gpu.py --out "$OUT/passes_gpu.json" 2>&1 | tee "$OUT/passes_gpu.log"
fi
# 3. the block, the model, decoding: transformers without mamba_ssm on the path, so it runs its own PyTorch code
if [[ ",$PARTS," == *",model,"* ]]; then
  PYTHONPATH="$REPO" python3 benchmarks/bench_model.py --device cuda --dtype bfloat16 --compile --out "$OUT/model_gpu.json" \
    --impls "${IMPLS:-auto}" 2>&1 | tee "$OUT/model_gpu.log"
fi
# 4. decoding (PARTS=decode): ours, plain and replayed from a CUDA graph, beside mamba_ssm's
#    generate with cg=False and cg=True, the same weights in both, batch 1 and 16
if [[ ",$PARTS," == *",decode,"* ]]; then
  PYTHONPATH="$REPO:$MSDIR" python3 benchmarks/bench_decode_gpu.py --sweep --out "$OUT/decode_gpu.json" 2>&1 | tee "$OUT/decode_gpu.log"
fi
# 5. chapter 9's Triton kernels beside mamba_ssm's (PARTS=kernels): forward at every shape, forward + backward at
#    (8, 4k), each kernel's time and a sweep of tile sizes
if [[ ",$PARTS," == *",kernels,"* ]]; then
  PYTHONPATH="$REPO:$MSDIR" python3 benchmarks/bench_kernels_gpu.py --out "$OUT/kernels_gpu.json" --sweep 2>&1 | tee "$OUT/kernels_gpu.log"
fi
# 6. where the eager block's time goes (PARTS=profile): kernels by GPU time, launches and bytes per forward
if [[ ",$PARTS," == *",profile,"* ]]; then
  PYTHONPATH="$REPO" python3 benchmarks/profile_block_gpu.py --out "$OUT/profile_block_gpu.json" 2>&1 | tee "$OUT/profile_block_gpu.log"
fi
rm -rf "$MS"
python3 benchmarks/plot.py "$OUT" 2>&1 | tail -3 || true
