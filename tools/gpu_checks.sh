#!/usr/bin/env bash
# The benchmark on one CUDA GPU at batch 64: fp32 and bf16, eager, channels-last and torch.compile.
# Each configuration writes $OUT/<name>.json (the benchmark's JSON) and $OUT/<name>.log (stderr),
# and is cut off by its own time limit, so the whole script ends within about 8 minutes even if
# a configuration hangs or fails; a failed one leaves its log and no JSON, and the others still run.
#
#     OUT=/some/dir bash tools/gpu_checks.sh
set -u
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

BATCH=64
FAILED=0

run() {  # run NAME SECONDS BENCHMARK-ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if timeout -k 10 "$limit" python -m tools.benchmark --device cuda --batch "$BATCH" "$@" \
        > "$OUT/$name.json.part" 2> "$OUT/$name.log"; then
        mv "$OUT/$name.json.part" "$OUT/$name.json"
    else
        echo "   failed or timed out (exit $?), see $OUT/$name.log"
        rm -f "$OUT/$name.json.part"
        FAILED=1
    fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
# The loader is measured once, beside the eager fp32 run; the others skip it.
run fp32                   75 --amp none
run fp32_channels_last     50 --amp none --channels-last --loader-batches 0
run bf16                   50 --amp bf16 --loader-batches 0
run bf16_channels_last     50 --amp bf16 --channels-last --loader-batches 0
run bf16_compile          120 --amp bf16 --compile --loader-batches 0
run fp32_compile          120 --amp none --compile --loader-batches 0
exit $FAILED
