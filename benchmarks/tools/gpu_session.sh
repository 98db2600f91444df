#!/usr/bin/env bash
# The measurements only a GPU machine can make, in phases that each take under ten minutes on one H100/H200
# class GPU. Run from the repository root:
#
#   bash benchmarks/tools/gpu_session.sh cuda       # needs torch and torchvision only: the CUDA tests, ResNet-50
#                                                   # step variants, the profile with the torch loader,
#                                                   # train.py --loader synthetic and --loader torch
#   bash benchmarks/tools/gpu_session.sh dali       # needs DALI: its tests, the loader alone (decode strategies,
#                                                   # hardware-decoder share), the profile with DALI
#   bash benchmarks/tools/gpu_session.sh dali-e2e   # needs DALI: end to end, the stages table, train.py --loader dali
#
# Results go to benchmarks/results/gpu/ with a log per phase; a failed command is logged and the phase goes on.
# EXTRA is appended to every benchmark command and TRAIN_EXTRA to train.py's (later flags win), e.g.
# EXTRA="--device cpu --arch resnet_mini_cifar --batch-size 16 --image-size 32" to try a phase on a CPU.
set -uo pipefail
phase=${1:?usage: benchmarks/tools/gpu_session.sh cuda|dali|dali-e2e}
py=${PYTHON:-python3}
extra=${EXTRA:-}
train_extra=${TRAIN_EXTRA:-}
results=benchmarks/results/gpu
data=${DATA:-data/imagenet_like}
mkdir -p "$results"
export PYTHONUNBUFFERED=1

log() { echo "== $*" | tee -a "$results/$phase.log"; }
run() {  # run NAME CMD...: CMD's output into the phase log
  local name=$1; shift
  log "$name: $*"
  "$@" 2>&1 | tee -a "$results/$phase.log" || log "$name FAILED (exit ${PIPESTATUS[0]})"
}
images() {  # the ImageNet-like JPEG folder, generated once per machine
  [ -d "$data" ] || run generate "$py" -m benchmarks.tools.imagenet_like "$data" --images "${IMAGES:-10000}" \
    --classes 100
}
bench() {  # bench NAME SUITE FLAGS...: one suite into $results/NAME.json
  local name=$1 suite=$2; shift 2
  # shellcheck disable=SC2086
  run "$name" "$py" -m benchmarks "$suite" --preset imagenet "$@" --json "$results/$name.json" $extra
}
train() {  # train NAME FLAGS...: 200 steps of train.py
  local name=$1; shift
  # shellcheck disable=SC2086
  run "$name" "$py" train.py --preset imagenet --epochs 1 --max-steps 200 --knn-every 0 --out "/tmp/moco_$name" \
    "$@" $train_extra
  rm -rf "/tmp/moco_$name"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$results/$phase.gpu.csv" 2>&1 || true
case $phase in
  cuda)
    run tests "$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graph.py tests/test_step.py \
      tests/test_moco_reference.py tests/test_gpu_augment.py tests/test_step_variants.py
    # name:flags, each the imagenet preset (ResNet-50, MLP, K 65536, 224 px, batch 256) on synthetic batches
    for variant in "bf16:" "fp16:--precision fp16" "fp32:--precision fp32" "cuda-graphs:--cuda-graphs" \
                   "no-channels-last:--no-channels-last" "foreach-sgd:--no-fused-sgd" "concat-loss:--no-fused-loss" \
                   "compile:--compile" "no-shuffle:--shuffle none"; do
      # shellcheck disable=SC2086
      bench "step_${variant%%:*}" step --backend synthetic --steps 20 --warmup 10 --repeats 3 --check-syncs --check-copies \
        ${variant#*:}
    done
    images
    bench profile_torch profile --data "$data" --backend torch --steps 20 --warmup 5 --repeats 2 \
      --png "$results/profile_torch.png"
    train train_synthetic --loader synthetic
    train train_torch --loader torch --data "$data" ;;
  dali)
    run tests "$py" -m pytest -q -rs -p no:cacheprovider tests/test_dali_loader.py tests/test_loader_edges.py
    images
    for variant in "once:" "roi:--loader-option decode=roi" "hw30:--loader-option hw_decoder_load=0.3" \
                   "hw90:--loader-option hw_decoder_load=0.9"; do
      # shellcheck disable=SC2086
      bench "loader_dali_${variant%%:*}" loader --backend dali --data "$data" --steps 30 --warmup 10 --repeats 3 \
        ${variant#*:}
    done
    bench profile_dali profile --data "$data" --backend dali --steps 20 --warmup 5 --repeats 2 \
      --png "$results/profile_dali.png" ;;
  dali-e2e)
    images
    bench e2e_dali e2e --backend dali --data "$data" --steps 50 --warmup 10 --repeats 3
    bench stages_dali stages --backend dali --data "$data" --steps 30 --warmup 10 --repeats 3 \
      --png "$results/stages_dali.png"
    train train_dali --loader dali --data "$data" ;;
  *) echo "unknown phase $phase (cuda|dali|dali-e2e)" >&2; exit 2 ;;
esac
