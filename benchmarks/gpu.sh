#!/usr/bin/env bash
# Every GPU benchmark in one go, JSON into benchmarks/results/ (or --out):
#   eval (bench_eval.py) at the pythia-70m and pythia-410m shapes (random weights), float32 and
#   bfloat16; the Hugging Face backend (tails, and forced full passes) at the pythia-70m shape;
#   the research log's 200 x 256 eval of a 6-SAE k grid (k 8..256, d_sae 32 x d_model) at both
#   shapes; the release benchmark (bench_release.py: 6 hooks x 6 TopK SAEs).
#
#   bash benchmarks/gpu.sh                      # on a GPU machine (cuda, torch's default threads)
#   bash benchmarks/gpu.sh --tiny --out DIR     # the same runs at a toy size on a CPU, in about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) TINY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--tiny] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"

if [ "$TINY" = 1 ]; then
  PREFIX=tiny
  RUN=(--device cpu --threads 1 --repeats 1 --warmup 0 --inline)
  SMALL=(--d-model 32 --n-layers 3 --n-heads 4 --vocab 256 --ctx 16 --d-sae 128)
  EVAL=(--n-batches 1 --batch-size 2 --k 4 --n-saes 2 --contenders limit project)
  GRID=(--n-batches 1 --batch-size 2 --k-grid 2 4 8 --n-saes 3 --contenders limit project)
  RELEASE=(--n-batches 1 --batch-size 2 --k-grid 2 4 --contenders limit project)
else
  PREFIX=gpu
  RUN=(--device cuda --threads 0)
  SMALL=()
  EVAL=()
  GRID=(--n-batches 25 --batch-size 8 --ctx 256 --n-saes 6 --k-grid 8 16 32 64 128 256 --repeats 1)
  RELEASE=(--repeats 3)
fi

for preset in pythia-70m pythia-410m; do
  for dtype in float32 bfloat16; do
    python benchmarks/bench_eval.py --preset "$preset" --dtype "$dtype" "${RUN[@]}" "${EVAL[@]}" "${SMALL[@]}" \
      --json "$OUT/$PREFIX-eval-$preset-$dtype.json"
  done
done
for backend in hf hf-full; do
  python benchmarks/bench_eval.py --preset pythia-70m --backend "$backend" "${RUN[@]}" "${EVAL[@]}" "${SMALL[@]}" \
    --json "$OUT/$PREFIX-eval-pythia-70m-$backend.json"
done
for preset in pythia-70m pythia-410m; do
  if [ "$TINY" = 1 ]; then D_SAE=(); elif [ "$preset" = pythia-70m ]; then D_SAE=(--d-sae 16384); else D_SAE=(--d-sae 32768); fi
  python benchmarks/bench_eval.py --preset "$preset" "${RUN[@]}" "${GRID[@]}" "${SMALL[@]}" "${D_SAE[@]}" \
    --json "$OUT/$PREFIX-eval-kgrid-$preset.json"
done
python benchmarks/bench_release.py --preset pythia-70m "${RUN[@]}" "${RELEASE[@]}" "${SMALL[@]}" \
  --json "$OUT/$PREFIX-release-pythia-70m.json"
echo "results in $OUT"
