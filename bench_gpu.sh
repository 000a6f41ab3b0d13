#!/usr/bin/env bash
# The GPU measurements in one script, for a short GPU slot (run from the repo root on a CUDA node):
#
#   bash bench_gpu.sh OUT_DIR [STEP_REGEX]
#
# Every step is bounded by `timeout`; its output goes to OUT_DIR/<step>.log and its JSON lines (the benchmarks'
# rows, tagged with the step's name) plus one line of exit status and seconds to OUT_DIR/results.jsonl. The steps run
# most valuable first, and a step that would not end within the budget (BENCH_GPU_BUDGET_S, default 480 s: the
# whole script within 8 minutes) is skipped and says so in results.jsonl; STEP_REGEX runs only the steps whose names
# match (a second slot: `bash bench_gpu.sh out2 'b128|input|decode'`; BENCH_GPU_BUDGET_S=3600 runs everything).
#
# In order: the training stall per background checkpoint save of SLIP_VITB16 (issue 25, goal <= 0.1 s); CLIP_VITB16
# and SLIP_VITB16 train steps at batch 256 with amp_bf16, eager and --compile (first_step_s: the compilation; mfu on
# the FLOPs the step executes, mfu_nominal on the model's nominal FLOPs: 77 text tokens, full last ViT block), with
# torch.profiler's top 15 operators of the compiled CLIP step; exact accumulation (4 x 64 against one batch of 256);
# the same steps at batch 128; the GPU input path (issue 24: pixels per JPEG kind against libjpeg, the decoder's race
# with the step, the CUDA tests, the --decode-device cuda pipeline, synthetic and end-to-end training); then the
# earlier measurements (fast paths against the baseline, head memory, the cheaper SimCLR views, saves sync vs async).
set -uo pipefail
OUT=${1:?usage: bash bench_gpu.sh OUT_DIR [STEP_REGEX]}
ONLY=${2:-.}
BUDGET=${BENCH_GPU_BUDGET_S:-480}
PY=${PYTHON:-python}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
START=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ $name =~ $ONLY ]] || return 0
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < limit)); then
    echo "{\"step\": \"$name\", \"skipped\": \"$left s of the budget left, the step may take $limit s\"}" >>"$RESULTS"
    echo "$name: skipped ($left s left)"
    return 0
  fi
  local t0 rc=0
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  grep '^{"' "$OUT/$name.log" | sed "s/^{/{\"step\": \"$name\", /" >>"$RESULTS" || true
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >>"$RESULTS"
  echo "$name: exit $rc in $(($(date +%s) - t0)) s"
}

TRAIN=(bench.py train --precision amp_bf16 --device cuda --steps 10 --warmup 3)
FIXTURE=(--dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl --model SLIP_VITB16)

# --- issue 25: the steady-state stall per background save (host buffers reserved, copies on a side stream)
step save_async 60 $PY bench_save.py --model SLIP_VITB16 --device cuda --modes async --saves 3
# --- issue 23: the step, eager and compiled, at batch 256; the compiled CLIP step's profile
step clip_b256_eager 45 $PY "${TRAIN[@]}" --model CLIP_VITB16 --batch-size 256
step clip_b256_compiled 110 $PY "${TRAIN[@]}" --model CLIP_VITB16 --batch-size 256 --compile --torch-profile 15
step slip_b256_eager 50 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 256
step slip_b256_compiled 120 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 256 --compile
step attention_layout_b256 40 $PY bench.py attention --model SLIP_VITB16 --batch-size 256 --device cuda --steps 20
step accum_4x64_vs_256 60 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 64 --update-freq 4 --compare-accum
step clip_b128_eager 40 $PY "${TRAIN[@]}" --model CLIP_VITB16 --batch-size 128
step clip_b128_compiled 100 $PY "${TRAIN[@]}" --model CLIP_VITB16 --batch-size 128 --compile
step clip_b128_cuda_graphs 110 $PY "${TRAIN[@]}" --model CLIP_VITB16 --batch-size 128 --compile \
    --compile-mode reduce-overhead
step slip_b128_eager 45 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 128
step slip_b128_compiled 110 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 128 --compile
# --- issue 24: the GPU input path. nvImageCodec (libjpeg's chroma) when its wheel was carried to the machine
WHEEL=$(ls shared/wheels/nvidia_nvimgcodec_cu1*.whl 2>/dev/null | head -1 || true)
if [[ -n $WHEEL ]]; then
  step input_nvimgcodec_install 60 $PY -m pip install --no-deps "$WHEEL"
fi
step input_kinds 60 $PY bench_input.py kinds
step input_race 60 $PY bench_input.py race --tries 200
step input_cuda_tests 120 $PY -m pytest -q tests/test_train_data.py tests/test_batch_views.py
step input_decode_cuda 150 $PY bench.py data "${FIXTURE[@]}" --workers 16 --num-samples 1024 --make-fixture \
  --decode-device cuda --device cuda
step input_train_synthetic 60 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 128
for decode in worker cuda; do
  step "input_end_to_end_$decode" 240 bash -c "rm -rf /tmp/slip_e2e_$decode && $PY main.py ${FIXTURE[*]} \
    --batch-size 128 --precision amp_bf16 --epochs 2 --warmup-epochs 0 --workers 16 --decode-device $decode \
    --eval-dataset none --print-freq 5 --output-dir /tmp/slip_e2e_$decode 2>&1 | grep 'samples/s' | tail -3"
done
# --- earlier measurements: fast paths against the baseline, head memory, SimCLR views, the whole data pipeline
step fast_vs_baseline_slip 90 $PY "${TRAIN[@]}" --model SLIP_VITB16 --batch-size 128 --compare
step head_memory 120 $PY bench.py head --model SLIP_VITB16 --head-batches 8192,16384,32768 --precision amp_bf16 \
  --device cuda
VARIANTS='default;ssl-view-size=112;ssl-view-size=160;ssl-mask-ratio=0.5;ssl-mask-ratio=0.75;ssl-view-size=160,ssl-mask-ratio=0.5'
for model in SLIP_VITS16 SLIP_VITB16; do
  step "views_$model" 240 $PY "${TRAIN[@]}" --model $model --batch-size 128 --count-flops --clip-reference \
    --variants "$VARIANTS"
done
step data_compare 300 $PY bench.py data "${FIXTURE[@]}" --workers 16 --num-samples 4000 --make-fixture --compare \
  --device-augment --decode-device cuda --device cuda
step save_sync_vs_async 150 $PY bench_save.py --model SLIP_VITB16 --device cuda --saves 3
echo "results: $RESULTS"
