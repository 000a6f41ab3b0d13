#!/usr/bin/env bash
# The GPU measurements of the performance issue, in one script (run on a CUDA node from the repo root):
# SLIP_VITB16 and CLIP_VITB16 train steps at batch 128 with amp_bf16, with and without --compile, against the
# baseline (every fast path off); then the SLIP input pipeline with 16 workers on YFCC-layout zips; then the cheaper
# SimCLR views (--ssl-view-size, --ssl-mask-ratio and a combination) interleaved against CLIP at the same size.
set -euo pipefail
PY=${PYTHON:-python}
for model in CLIP_VITB16 SLIP_VITB16; do
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 --compare
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 --compile
done
$PY bench.py data --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl --model SLIP_VITB16 \
  --workers 16 --num-samples 4000 --make-fixture --compare --device-augment --device cuda
VARIANTS='default;ssl-view-size=112;ssl-view-size=160;ssl-mask-ratio=0.5;ssl-mask-ratio=0.75;ssl-view-size=160,ssl-mask-ratio=0.5'
for model in SLIP_VITS16 SLIP_VITB16; do
  $PY bench.py train --model $model --batch-size 128 --precision amp_bf16 --device cuda --steps 20 --warmup 5 \
    --count-flops --clip-reference --variants "$VARIANTS"
done
