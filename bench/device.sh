#!/usr/bin/env bash
# Every GPU bench and check in one call of a lent GPU machine, most wanted first, each under its own time limit and
# all under one deadline, so that a stage that hangs or fails costs only itself. Logs and JSON go under $OUT.
#
#   bash bench/device.sh [SECONDS [STAGE...]]   # default 450 s and the stages train train_hf decode kernels
#                                                #   prefill gpu_check; also decode32, train_scan, quant
#
# The machine has jax with CUDA, torch and transformers; l4jax runs from this checkout (PYTHONPATH), nothing is
# installed. JAX does not preallocate, so that transformers' rows in the same process find the memory they need.
set -u
budget=${1:-450}
shift $(($# > 0 ? 1 : 0))
stages=${*:-train train_hf decode kernels prefill gpu_check}
py=${PYTHON:-python3}
out=${OUT:-/tmp/l4jax-device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2
start=$(date +%s)
log="$out/device.log"

stage() {  # stage NAME SECONDS COMMAND...: run under min(SECONDS, what is left of the budget)
    local name=$1 limit=$2; shift 2
    local left=$((budget - ($(date +%s) - start)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then echo "== $name: skipped, ${left}s left" | tee -a "$log"; return; fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    grep -v -e "^WARNING" -e "Warning" -e "^I0000" "$out/$name.log" | tail -n 40 >> "$log"
    echo "== $name: rc $rc in $(($(date +%s) - t0))s" | tee -a "$log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$py" -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} >> "$log" 2>&1

for s in $stages; do
    case $s in
        train) stage train 150 "$py" bench/train.py --no-hf ;;
        train_scan) stage train_scan 150 "$py" bench/train.py --no-hf --moe-impl scan ;;  # the MoE before mgpu
        train_hf) stage train_hf 60 "$py" bench/train.py --hf-only --steps 3 ;;  # own process: JAX keeps its pool
        decode) stage decode 150 "$py" bench/decode.py --kv-int8 ;;
        decode32) stage decode32 100 "$py" bench/decode.py --batch 32 ;;
        quant) stage quant 120 "$py" bench/decode.py --batch 1 32 --quantize int8 int4 fp8 --no-hf ;;
        kernels) stage kernels 80 "$py" bench/kernels.py --out "$out/kernels.json" ;;
        prefill) stage prefill 100 "$py" bench/decode.py --prompt 8192 --new 2 --batch 1 ;;
        gpu_check) stage gpu_check 150 "$py" bench/gpu_check.py --out "$out/gpu_check.json" ;;
        *) echo "unknown stage $s" | tee -a "$log" ;;
    esac
done

echo "== total $(($(date +%s) - start))s" >> "$log"
cat "$log"
