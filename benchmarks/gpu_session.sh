#!/usr/bin/env bash
# The GPU measurements of the DALI, FFCV and benchmark issues, one phase per device call (each well inside the
# device tool's 10-minute limit). Run from the repository root on the GPU machine, after the DALI wheels are
# staged (../shared/gpu/stage-wheels.sh) and PYTHONPATH points at them:
#
#   bash benchmarks/gpu_session.sh tests    # every CUDA test here (CUDA graphs, DALI mixed decoder, sync checks)
#   bash benchmarks/gpu_session.sh loader   # DALI alone, decode once vs roi: the >= 8,000 img/s target
#   bash benchmarks/gpu_session.sh step     # ResNet-50 MoCo v2 step variants, each with --check-syncs
#   bash benchmarks/gpu_session.sh e2e      # loader + step with DALI, the stages table, train.py --loader dali
#
# Results go to benchmarks/results/gpu/; with $OUT set (the device tool), they are also packed into
# $OUT/PHASE.tgz, one file, since the tool brings back at most 8. EXTRA is appended to every benchmark command
# and TRAIN_EXTRA to train.py's (later flags win), e.g. EXTRA="--device cpu --arch resnet_mini_cifar ..." to
# smoke-test a phase on a CPU.
set -uo pipefail
phase=${1:?usage: benchmarks/gpu_session.sh tests|loader|step|e2e}
py=${PYTHON:-python3}
extra=${EXTRA:-}
train_extra=${TRAIN_EXTRA:-}
results=benchmarks/results/gpu
data=${DATA:-data/imagenet_like}
mkdir -p "$results"
export PYTHONUNBUFFERED=1

log() { echo "== $*" | tee -a "$results/$phase.log"; }
run() {  # run NAME CMD...: CMD's output into the phase log; a failure is logged, and the phase goes on
  local name=$1; shift
  log "$name: $*"
  "$@" 2>&1 | tee -a "$results/$phase.log" || log "$name FAILED (exit ${PIPESTATUS[0]})"
}
images() {  # the ImageNet-like JPEG folder, generated once per machine
  [ -d "$data" ] || run generate "$py" -m benchmarks.imagenet_like "$data" --images "${IMAGES:-10000}" --classes 100
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$results/$phase.gpu.csv" 2>&1 || true
case $phase in
  tests)
    run tests "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graph.py tests/test_gpu_augment.py \
      tests/test_dali_loader.py tests/test_step.py tests/test_moco_reference.py tests/test_benchmarks.py ;;
  loader)
    images
    # shellcheck disable=SC2086
    run dali_gpu "$py" -m benchmarks.dali_gpu --data "$data" --batch-size 256 --epochs 3 \
      --out "$results/dali_gpu.json" $extra ;;
  step)
    # name:flags; every run is the imagenet preset (ResNet-50, MLP, K 65536, 224 px, batch 256) on synthetic data
    for variant in "bf16:" "fp16:--precision fp16" "fp32:--precision fp32" "no-channels-last:--no-channels-last" \
                   "foreach-sgd:--no-fused-sgd" "concat-loss:--no-fused-loss" "cuda-graphs:--cuda-graphs" \
                   "compile:--compile" "batch128:--batch-size 128" "batch512:--batch-size 512"; do
      name=${variant%%:*}
      # shellcheck disable=SC2086
      run "step $name" "$py" -m benchmarks step --preset imagenet --backend synthetic --steps 30 --warmup 10 \
        --repeats 3 --check-syncs ${variant#*:} --json "$results/step_$name.json" $extra
    done ;;
  e2e)
    images
    # shellcheck disable=SC2086
    run e2e "$py" -m benchmarks e2e --preset imagenet --backend dali --data "$data" --steps 50 --warmup 10 \
      --repeats 3 --json "$results/e2e_dali.json" $extra
    # shellcheck disable=SC2086
    run stages "$py" -m benchmarks stages --preset imagenet --backend dali --data "$data" --steps 30 --warmup 10 \
      --repeats 3 --json "$results/stages_dali.json" --png "$results/stages_dali.png" $extra
    # shellcheck disable=SC2086
    run train "$py" train.py --preset imagenet --loader dali --data "$data" --epochs 1 --max-steps 200 \
      --knn-every 0 --out /tmp/moco_dali $train_extra ;;
  *) echo "unknown phase $phase (tests|loader|step|e2e)" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/$phase.tgz" -C benchmarks/results gpu
fi
