#!/usr/bin/env bash
# The GPU measurements, in one script (run on a CUDA node from the repo root):
# SLIP_VITB16 and CLIP_VITB16 train steps at batch 128 with amp_bf16, with and without --compile, against the
# baseline (the model's fast paths off); exact accumulation (4 x 64) against one batch of 256 and the memory of the
# once-per-step head and loss at large accumulated batches; the SLIP input pipeline with 16 workers; then the
# cheaper SimCLR views (--ssl-view-size, --ssl-mask-ratio and a combination) interleaved against CLIP at the same size;
# the training stall per checkpoint save of SLIP_VITB16, written in the training thread vs in the background.
# Then --decode-device cuda (nvJPEG) against the worker paths: host CPU and GPU time per sample, and end to end.
set -euo pipefail
PY=${PYTHON:-python}
# First, as it fits a short slot: the steady-state training stall per background save of SLIP_VITB16 (1953 MB; goal
# <= 0.1 s): host buffers reserved before the first step, the copies enqueued on a side stream (issue 25).
timeout 90 $PY bench_save.py --model SLIP_VITB16 --device cuda --modes async --saves 3 || echo "bench_save: exit $?"
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
# --- --decode-device (issue 18): the workers send JPEG bytes and drawn crops; nvJPEG decodes the batch and the GPU
# makes the views. Host CPU seconds per sample of every path (host_cpu_s_per_sample, the original's beside them) and
# GPU ms per 256 samples (device_ms_per_256; the decode, crop and resize alone: decode_views_ms_per_sample), then
# end-to-end SLIP_VITB16 training samples/s with each path at 8 and 16 workers: the last progress line of the second epoch (persistent workers, steady state) on the fixture.
$PY bench.py data --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl --model SLIP_VITB16 \
  --workers 16 --num-samples 4000 --make-fixture --compare --device-augment --decode-device cuda --device cuda
for workers in 8 16; do
  for decode in worker cuda; do
    out=/tmp/slip_e2e_${decode}_${workers}
    rm -rf "$out"
    rate=$($PY main.py --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl \
      --model SLIP_VITB16 --batch-size 128 --precision amp_bf16 --epochs 2 --warmup-epochs 0 --workers $workers \
      --decode-device $decode --eval-dataset none --print-freq 5 --output-dir "$out" 2>&1 |
      grep -o '[0-9.]* samples/s  data [0-9]*%' | tail -1)
    echo "SLIP_VITB16 end to end, batch 128, --decode-device $decode, $workers workers: $rate"
  done
done
# --- end of --decode-device
