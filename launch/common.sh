# Shared by launch/gpu.sh and launch/tpu_vm.sh (sourced, not run). slurm.sbatch keeps its own
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
