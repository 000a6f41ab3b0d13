#!/usr/bin/env bash
# The GPU measurements, in one script (run on a CUDA node from the repo root):
# SLIP_VITB16 and CLIP_VITB16 train steps at batch 128 with amp_bf16, with and without --compile, against the
# baseline (the model's fast paths off); exact accumulation (4 x 64) against one batch of 256 and the memory of the
# once-per-step head and loss at large accumulated batches; the SLIP input pipeline with 16 workers; then the
# cheaper SimCLR views (--ssl-view-size, --ssl-mask-ratio and a combination) interleaved against CLIP at the same size;
# the training stall per checkpoint save of SLIP_VITB16, written in the training thread vs in the background.
set -euo pipefail
PY=${PYTHON:-python}
for model in CLIP_VITB16 SLIP_VITB16; do
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 --compare
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 --compile
done
$PY bench.py train --model SLIP_VITB16 --batch-size 64 --update-freq 4 --compare-accum --precision amp_bf16 \
  --device cuda --steps 10 --warmup 3
$PY bench.py head --model SLIP_VITB16 --head-batches 8192,16384,32768 --precision amp_bf16 --device cuda
$PY bench.py data --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl --model SLIP_VITB16 \
  --workers 16 --num-samples 4000 --make-fixture --compare --device-augment --device cuda
VARIANTS='default;ssl-view-size=112;ssl-view-size=160;ssl-mask-ratio=0.5;ssl-mask-ratio=0.75;ssl-view-size=160,ssl-mask-ratio=0.5'
for model in SLIP_VITS16 SLIP_VITB16; do
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 \
    --count-flops --clip-reference --variants "$VARIANTS"
done
$PY bench_save.py --model SLIP_VITB16 --device cuda --saves 3
