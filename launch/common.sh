# Shared by launch/gpu.sh, launch/tpu_vm.sh and the bench scripts (sourced, not run). slurm.sbatch keeps its own
# copy: sbatch runs a spooled copy of the script, away from this directory.

# Shell-quotes its arguments (only where needed, so printed commands stay readable).
quote() {
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$a")
    else
      out+=("'${a//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# planned_pairs MODEL CAP PLAN_ARGS...: micro-batch for a one-device benchmark from the memory
# planner (python -m daa_jax.plan, the DAA step with a live bfloat16 reference at bench's TL;DR
# shape): the largest power of two <= its max_micro_batch, at most CAP. Prints CAP (and a
# warning on stderr) when the planner gives no answer.
planned_pairs() {
  local model="$1" cap="$2" max p=1
  shift 2
  max=$(python -m daa_jax.plan --config "configs/daa.py:size=$model,precision=bf16" \
      --mesh 1,1,1 --programs daa_live_packed --config.train.batch_size=1 \
      --config.train.grad_accum=1 --prompt_len 384 --response_len 48 "$@" 2>/dev/null \
    | tail -1 | python -c 'import json, sys; print(json.load(sys.stdin)["max_micro_batch"])' \
    2>/dev/null)
  if ! [[ "$max" =~ ^[0-9]+$ ]] || (( max < 1 )); then
    echo "planner: no micro-batch for $model ($*); using $cap" >&2
    echo "$cap"
    return
  fi
  while (( p * 2 <= max && p * 2 <= cap )); do p=$(( p * 2 )); done
  echo "planner: $model max micro-batch $max -> $p pairs" >&2
  echo "$p"
}
