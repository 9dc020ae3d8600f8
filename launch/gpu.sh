#!/usr/bin/env bash
# One node with N GPUs: one process drives all of them (jax sees every visible GPU and the
# config's mesh spans them; no jax.distributed).
#
#   launch/gpu.sh --config configs/daa.py:size=1b --workdir runs/dpo_1b \
#       -- --config.hf_model=EleutherAI/pythia-1b
#
# Everything after `--` goes to daa_jax.main unchanged. `--dry-run` prints the environment
# and the command instead of running it. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config CONFIG --workdir DIR [options] [-- DAA_JAX_MAIN_FLAGS...]

  --config CONFIG      daa_jax config, e.g. configs/daa.py:size=1b
  --workdir DIR        the run directory (local, shared or gs://)
  --gpus LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: every GPU)
  --mesh SHAPE         --config.mesh, e.g. '(1,-1,1)' (FSDP over all GPUs); default: the
                       config's ((-1,1,1): data parallel)
  --fsdp               shorthand for --mesh '(1,-1,1)' (sizes whose weights + Adam state do not
                       fit one GPU)
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION: the share of each GPU's memory jax
                       preallocates (default 0.90; jax's own default is 0.75)
  --dry-run            print the command, run nothing
EOF
}

die() { echo "gpu.sh: $*" >&2; exit 2; }

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # quote

CONFIG="" WORKDIR="" GPUS="" MESH="" MEM_FRACTION="0.90" DRY_RUN=0
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --config) CONFIG="${2:?}"; shift 2 ;;
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --gpus) GPUS="${2:?}"; shift 2 ;;
    --mesh) MESH="${2:?}"; shift 2 ;;
    --fsdp) MESH="(1,-1,1)"; shift ;;
    --mem-fraction) MEM_FRACTION="${2:?}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (daa_jax.main flags go after --)" ;;
  esac
done
[[ -n $CONFIG && -n $WORKDIR ]] || { usage >&2; die "--config and --workdir are required"; }

env_vars=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
[[ -n $GPUS ]] && env_vars+=(CUDA_VISIBLE_DEVICES="$GPUS")
# One process, even inside a SLURM allocation with several tasks (see launch/slurm.sbatch).
cmd=("${PYTHON:-python}" -m daa_jax.main --config="$CONFIG" --workdir="$WORKDIR"
     --distributed=off)
[[ -n $MESH ]] && cmd+=(--config.mesh="$MESH")
cmd+=("${MAIN_FLAGS[@]}")

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ((DRY_RUN)); then
  quote env "${env_vars[@]}" "${cmd[@]}"
  exit 0
fi
echo "gpu.sh: $(quote env "${env_vars[@]}" "${cmd[@]}")" >&2
exec env "${env_vars[@]}" "${cmd[@]}"
