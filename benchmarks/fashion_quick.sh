#!/usr/bin/env bash
# configs/fashion_mnist_quick.yaml from [10,10,10] and [4,4,4]: surgery (default and paper
# mode) next to the start topology trained plainly for the same 30 epochs (no generation:
# initial_epochs = max_epochs). One run at a time, one thread, so wall times compare.
# Logs and run folders in $OUT.
# SEEDS="0 1 2" repeats everything per seed (model init, policy choices, batch order).
set -u
OUT=${OUT:-benchmarks/out/fashion_quick}
SEEDS=${SEEDS:-0}
mkdir -p "$OUT"
run() {  # name config hidden [extra args]
  local name=$1 config=$2 hidden=$3; shift 3
  local start=$(date +%s.%N)
  OMP_NUM_THREADS=1 python train.py fit --config "$config" --model.hidden "$hidden" \
    --trainer.enable_progress_bar=false --trainer.logger=CSVLogger \
    --trainer.logger.save_dir="$OUT/$name" --export_dir "$OUT/$name" \
    --seed_everything="$seed" --model.seed="$seed" "$@" > "$OUT/$name.log" 2>&1
  local end=$(date +%s.%N)
  echo "$name wall_s=$(echo "$end - $start" | bc) $(grep -E '^(final topology|test accuracy)' "$OUT/$name.log" | tr '\n' ' ')"
}
for seed in $SEEDS; do
for hidden in "[10,10,10]" "[4,4,4]"; do
  tag=$(echo "$hidden" | tr -d '[]' | tr ',' '-')-seed$seed
  run "surgery-default-$tag" configs/fashion_mnist_quick.yaml "$hidden"
  run "surgery-paper-$tag" configs/fashion_mnist_quick_paper.yaml "$hidden"
  run "plain-$tag" configs/fashion_mnist_quick.yaml "$hidden" --model.surgery.initial_epochs=30
done
done
