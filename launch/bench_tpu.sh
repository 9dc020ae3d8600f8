#!/usr/bin/env bash
# Benchmark grid on one TPU chip (run on the TPU VM, after `pip install -e ".[tpu]"`): DAA steps
# of Pythia-410M and 1B in bf16 at micro-batches from the memory planner, which compiles the
# step for this chip with the TPU compiler (python -m daa_jax.plan --platform tpu --mesh 1,1,1),
# and sampling. One JSON line per item (tokens/s, MFU, peak memory), also in
# $OUT/bench_tpu.jsonl; a failed item is {"item": ..., "error": ...}.
#
#   bash launch/bench_tpu.sh
#   OUT=/tmp/b BUDGET_S=600 bash launch/bench_tpu.sh
#   SMOKE=1 bash launch/bench_tpu.sh    # tiny models, fixed micro-batches (any host)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=launch/common.sh disable=SC1091  # checked on its own (tests/test_launch.py)
. launch/common.sh

OUT="${OUT:-/tmp/daa_bench_tpu}"
BUDGET_S="${BUDGET_S:-600}"
mkdir -p "$OUT/logs"
RESULTS="$OUT/bench_tpu.jsonl"
: > "$RESULTS"
START=$(date +%s)

if [[ "${SMOKE:-0}" == 1 ]]; then
  M1=tiny; M2=tiny2; STEPS=2; P1=4; P2=2
else
  M1=410m; M2=1b; STEPS=10
  P1=$(planned_pairs "$M1" 64 --platform tpu)
  P2=$(planned_pairs "$M2" 32 --platform tpu --config.model.remat_policy=full \
      --config.model.scan_layers=True)
fi

# run_item NAME TIMEOUT_S ARGS...: one `python -m daa_jax.bench` process under `timeout`.
run_item() {
  local name="$1" limit="$2" now left rc
  shift 2
  now=$(date +%s); left=$(( BUDGET_S - (now - START) ))
  if (( left < 30 )); then
    echo "{\"item\": \"$name\", \"error\": \"skipped: budget of ${BUDGET_S}s spent\"}" | tee -a "$RESULTS"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (timeout ${limit}s): $*" >&2
  timeout -k 10 "$limit" python -m daa_jax.bench --steps "$STEPS" --warmup 2 --out "$RESULTS" "$@" \
      > "$OUT/logs/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    grep '^RESULT_JSON ' "$OUT/logs/$name.log" | tail -1 | sed 's/^RESULT_JSON //'
    return
  fi
  local why="rc=$rc"
  (( rc == 124 || rc == 137 )) && why="timeout after ${limit}s"
  grep -q -i "RESOURCE_EXHAUSTED\|out of memory" "$OUT/logs/$name.log" && why="$why (out of memory)"
  echo "{\"item\": \"$name\", \"error\": \"$why\", \"log\": \"$OUT/logs/$name.log\"}" | tee -a "$RESULTS"
}

COMMON=(--dtype bfloat16 --ref_dtype bfloat16 --attention_impl xla --optimizer rmsprop)
TLDR=(--prompt_len 384 --response_len 48)
run_item 410m_train_packed_tldr 150 --model $M1 --what train --packing --pairs "$P1" "${TLDR[@]}" "${COMMON[@]}" --pack_multiple 128
run_item 1b_train_packed_tldr   240 --model $M2 --what train --packing --pairs "$P2" "${TLDR[@]}" "${COMMON[@]}" --remat_policy full --scan_layers --pack_multiple 128
run_item 1b_train_cached_packed 150 --model $M2 --what train_cached_ref --packing --pairs "$P2" "${TLDR[@]}" "${COMMON[@]}" --remat_policy full --scan_layers --pack_multiple 128
run_item 1b_sample              120 --model $M2 --what sample --pairs "$P2" --prompt_len 384 --new_tokens 128 "${COMMON[@]}" --scan_layers
echo "grid done in $(( $(date +%s) - START ))s; results: $RESULTS" >&2
