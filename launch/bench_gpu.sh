#!/usr/bin/env bash
# Benchmark grid on one GPU in under 8 minutes: Pythia-1B and 2.8B DAA steps in bf16 with
# cuDNN attention at micro-batches from the memory planner (python -m daa_jax.plan, the card's
# memory), and sampling throughput. One JSON line per item (tokens/s, MFU, peak memory).
#
#   bash launch/bench_gpu.sh            # JSON lines to stdout and to $OUT/bench_gpu.jsonl
#   OUT=/tmp/b BUDGET_S=420 bash launch/bench_gpu.sh
#   SMOKE=1 bash launch/bench_gpu.sh    # the same grid on tiny models (checks the script, any host)
#
# Each item runs in its own process under `timeout`, so an OOM, a cuDNN refusal or a hang costs
# that item only (it is recorded as {"item": ..., "error": ...}); items whose turn comes after
# the budget is spent are skipped. A cuDNN failure that happens before the time-out (e.g. a
# head size cuDNN does not take) is retried once with --attention_impl xla.
# Needs a CUDA build of jax in the active environment (pip install -U "jax[cuda12]").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=launch/common.sh disable=SC1091  # checked on its own (tests/test_launch.py)
. launch/common.sh

OUT="${OUT:-/tmp/daa_bench_gpu}"
BUDGET_S="${BUDGET_S:-450}"   # wall-clock budget for the whole grid (< 8 min)
mkdir -p "$OUT/logs"
RESULTS="$OUT/bench_gpu.jsonl"
: > "$RESULTS"
# Let XLA take most of the card (the default preallocation is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
START=$(date +%s)
CUDNN_FAILED=""  # models whose cuDNN attention failed once (later items use xla)

if [[ "${SMOKE:-0}" == 1 ]]; then
  M1=tiny; M2=tiny2; M3=tiny4; ATTN="${ATTN:-xla}"; STEPS=2; SCALE=16; GPU_MIB=999999
else
  M1=1b; M2=2.8b; M3=6.9b; ATTN="${ATTN:-cudnn}"; STEPS=10; SCALE=1; GPU_MIB=0
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  fi
fi

# run_item NAME TIMEOUT_S ARGS...: one `python -m daa_jax.bench` process.
run_item() {
  local name="$1" limit="$2"; shift 2
  local now left rc t0 dt
  now=$(date +%s); left=$(( BUDGET_S - (now - START) ))
  if (( left < 30 )); then
    echo "{\"item\": \"$name\", \"error\": \"skipped: budget of ${BUDGET_S}s spent\"}" | tee -a "$RESULTS"
    return
  fi
  (( limit > left )) && limit=$left
  local model="" prev="" a
  for a in "$@"; do [[ "$prev" == --model ]] && model="$a"; prev="$a"; done
  if [[ " $CUDNN_FAILED " == *" $model "* && " $* " == *" --attention_impl cudnn "* ]]; then
    local swapped=("$@")  # cuDNN already refused this model: go straight to xla
    for a in "${!swapped[@]}"; do [[ "${swapped[$a]}" == cudnn ]] && swapped[a]=xla; done
    set -- "${swapped[@]}"; name="$name-xla"
  fi
  echo "== $name (timeout ${limit}s): $*" >&2
  t0=$(date +%s)
  # stdout: the bare JSON result line; stderr: the logs.
  timeout -k 10 "$limit" python -m daa_jax.bench --steps "$STEPS" --warmup 2 --out "$RESULTS" "$@" \
      > "$OUT/logs/$name.json" 2> "$OUT/logs/$name.log"
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    tail -1 "$OUT/logs/$name.json"
    return
  fi
  local why="rc=$rc"
  (( rc == 124 || rc == 137 )) && why="timeout after ${limit}s"
  grep -q -i "RESOURCE_EXHAUSTED\|out of memory" "$OUT/logs/$name.log" && why="$why (out of memory)"
  echo "{\"item\": \"$name\", \"error\": \"$why\", \"log\": \"$OUT/logs/$name.log\"}" | tee -a "$RESULTS"
  if [[ " $* " == *" --attention_impl cudnn "* ]] && (( rc != 124 && rc != 137 && dt < 90 )); then
    CUDNN_FAILED="$CUDNN_FAILED $model"
    local args=("$@")
    for i in "${!args[@]}"; do [[ "${args[$i]}" == cudnn ]] && args[i]=xla; done
    run_item "$name-xla" "$limit" "${args[@]}"
  fi
}

B() { echo $(( $1 / SCALE > 0 ? $1 / SCALE : 1 )); }
COMMON=(--dtype bfloat16 --ref_dtype bfloat16 --attention_impl "$ATTN" --optimizer rmsprop)
TLDR=(--prompt_len 384 --response_len 48)

# Micro-batches from the planner for this card (the formula for CUDA; 92% of the card, as
# XLA_PYTHON_CLIENT_MEM_FRACTION above). SMOKE: the fixed small ones.
PLAN=(--platform cuda --device_memory "$(( GPU_MIB * 92 / 100 ))MiB")
if [[ "${SMOKE:-0}" == 1 ]]; then
  P1=4; P2=2; P3=1
else
  P1=$(planned_pairs "$M1" 64 "${PLAN[@]}")
  P2=$(planned_pairs "$M2" 32 "${PLAN[@]}" --config.model.remat_policy=full --config.model.scan_layers=True)
  P3=$(planned_pairs "$M3" 8 "${PLAN[@]}" --config.model.remat_policy=full --config.model.scan_layers=True)
fi

# Most important first: items past the budget are skipped.
# Pythia-1B and 2.8B DPO steps, TL;DR shape (384 + 48 tokens), prompt-shared packing.
run_item 1b_train_packed_tldr       90 --model $M1 --what train --packing --pairs "$P1" "${TLDR[@]}" "${COMMON[@]}" --pack_multiple 64
# 2.8B: remat keeps 32 layers of activations within the card next to ~40 GB of state; the
# scanned layers compile in a fraction of the unrolled time.
run_item 2.8b_train_packed_tldr    120 --model $M2 --what train --packing --pairs "$P2" "${TLDR[@]}" "${COMMON[@]}" --remat_policy full --scan_layers --pack_multiple 64
# Pythia-6.9B with the paper's optimizer: float32 params, RMSprop state and gradients (~83 GB)
# plus the bfloat16 reference (~14 GB) need an H200-class card; full remat, scanned layers.
if (( GPU_MIB > 100000 )); then
  run_item 6.9b_train_fits         150 --model $M3 --what train --pairs "$P3" "${TLDR[@]}" "${COMMON[@]}" --remat_policy full --scan_layers --pack_multiple 64 --steps 3
else
  echo "{\"item\": \"6.9b_train_fits\", \"error\": \"skipped: ${GPU_MIB} MiB card; needs > 100 GB (H200)\"}" | tee -a "$RESULTS"
fi
# Sampling: prefill 384 + 128 sampled tokens with the KV cache.
run_item 1b_sample                  50 --model $M1 --what sample --pairs "$(B 64)" --prompt_len 384 --new_tokens 128 "${COMMON[@]}"
run_item 2.8b_sample                60 --model $M2 --what sample --pairs "$(B 32)" --prompt_len 384 --new_tokens 128 "${COMMON[@]}" --scan_layers
# 1B variants: two-row layout (packing off), cached reference, and the 128 + 128 shape.
run_item 1b_train_tworow_tldr       70 --model $M1 --what train --no-packing --pairs "$(B 32)" "${TLDR[@]}" "${COMMON[@]}" --remat_policy dots_with_no_batch_dims
run_item 1b_train_cached_packed     60 --model $M1 --what train_cached_ref --packing --pairs "$(B 64)" "${TLDR[@]}" "${COMMON[@]}" --pack_multiple 64
run_item 1b_train_packed_128_128    60 --model $M1 --what train --packing --pairs "$(B 32)" --prompt_len 128 --response_len 128 "${COMMON[@]}" --pack_multiple 64

echo "grid done in $(( $(date +%s) - START ))s; results: $RESULTS" >&2
