#!/usr/bin/env bash
# Runs one daa_jax job on a Cloud TPU VM or pod slice: create the VM, put this checkout (or a
# git clone) on every worker, install, run `python3 -m daa_jax.main` on all workers at once,
# stream the logs, fetch the results, delete the VM.
#
#   launch/tpu_vm.sh --name daa-v4-32 --zone us-central2-b --accelerator v4-32 \
#       --config configs/daa.py:size=1b,objective=ipo,beta=0.05 --workdir gs://BUCKET/runs/ipo \
#       -- --config.hf_model=EleutherAI/pythia-1b
#
# Everything after `--` goes to daa_jax.main unchanged. `--dry-run` prints every command
# (one per line, shell-quoted) and runs none. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator TYPE --config CONFIG
                        --workdir gs://BUCKET/RUN [options] [-- DAA_JAX_MAIN_FLAGS...]

  --name NAME          TPU VM name (created, then deleted at the end)
  --zone ZONE          e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator TYPE   e.g. v4-8, v4-32, v5litepod-8, v6e-8
  --config CONFIG      daa_jax config, e.g. configs/daa.py:size=1b
  --workdir DIR        the run directory; gs:// (every worker writes checkpoints there)
  --version V          TPU runtime (default: tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
                       v6e: v2-alpha-tpuv6e)
  --project P          GCP project (default: gcloud's)
  --spot               Spot VM (cheaper, preemptible at any time; a preempted run resumes
                       from its last checkpoint when started again with the same --workdir)
  --preemptible        legacy preemptible VM
  --repo URL [--ref R] git clone URL (at ref R) on every worker instead of copying this checkout
  --setup CMD          a shell command run on every worker after the install, e.g. to copy the
                       data: 'gcloud storage cp -r gs://BUCKET/tldr ~/tldr'
  --results DIR        where to fetch metrics.jsonl, config.json and the worker-0 log
                       (default: results/NAME)
  --reuse              the VM exists already: skip `create`
  --keep               do not delete the VM at the end (also on failure)
  --dry-run            print the commands, run nothing
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

NAME="" ZONE="" ACCELERATOR="" CONFIG="" WORKDIR="" VERSION="tpu-ubuntu2204-base"
PROJECT="" PRICING="" REPO_URL="" REF="" SETUP="" RESULTS="" REUSE=0 KEEP=0 DRY_RUN=0
MAIN_FLAGS=()
while (($#)); do
  case "$1" in
    --name) NAME="${2:?}"; shift 2 ;;
    --zone) ZONE="${2:?}"; shift 2 ;;
    --accelerator) ACCELERATOR="${2:?}"; shift 2 ;;
    --config) CONFIG="${2:?}"; shift 2 ;;
    --workdir) WORKDIR="${2:?}"; shift 2 ;;
    --version) VERSION="${2:?}"; shift 2 ;;
    --project) PROJECT="${2:?}"; shift 2 ;;
    --spot) PRICING="--spot"; shift ;;
    --preemptible) PRICING="--preemptible"; shift ;;
    --repo) REPO_URL="${2:?}"; shift 2 ;;
    --ref) REF="${2:?}"; shift 2 ;;
    --setup) SETUP="${2:?}"; shift 2 ;;
    --results) RESULTS="${2:?}"; shift 2 ;;
    --reuse) REUSE=1; shift ;;
    --keep) KEEP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; MAIN_FLAGS=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (daa_jax.main flags go after --)" ;;
  esac
done
[[ -n $NAME && -n $ZONE && -n $ACCELERATOR && -n $CONFIG && -n $WORKDIR ]] ||
  { usage >&2; die "--name, --zone, --accelerator, --config and --workdir are required"; }
[[ $WORKDIR == gs://* ]] ||
  die "--workdir=$WORKDIR: use gs://BUCKET/PATH; all workers write the checkpoints there" \
    "and the VM's disk is deleted with it"
[[ -z $REF || -n $REPO_URL ]] || die "--ref needs --repo"
RESULTS="${RESULTS:-results/$NAME}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="daa_jax"         # on every worker, relative to the home directory
REMOTE_LOG="daa_jax_run.log"

# shellcheck source=common.sh
source "$HERE/launch/common.sh"  # quote

run() {
  if ((DRY_RUN)); then quote "$@"; else "$@"; fi
}

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone="$ZONE")
[[ -n $PROJECT ]] && LOCATION+=(--project="$PROJECT")

on_all_workers() {  # COMMAND: run on every worker at once; gcloud streams their output.
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${LOCATION[@]}" --worker=all \
    --ssh-flag=-oServerAliveInterval=60 --command "$1"
}

# shellcheck disable=SC2317  # reached through `trap cleanup EXIT`
cleanup() {
  local status=$?
  if ((KEEP)); then
    echo "tpu_vm.sh: keeping $NAME (delete: ${GCLOUD_TPU[*]} delete $NAME --zone=$ZONE --quiet)" >&2
  else
    run "${GCLOUD_TPU[@]}" delete "$NAME" "${LOCATION[@]}" --quiet || true
  fi
  exit "$status"
}

# 1. The VM.
if ((!REUSE)); then
  create=("${GCLOUD_TPU[@]}" create "$NAME" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR"
          --version="$VERSION")
  [[ -n $PRICING ]] && create+=("$PRICING")
  run "${create[@]}"
fi
trap cleanup EXIT

# 2. The code, on every worker.
if [[ -n $REPO_URL ]]; then
  fetch_code="rm -rf $REMOTE_DIR && git clone $(quote "$REPO_URL") $REMOTE_DIR"
  [[ -n $REF ]] && fetch_code+=" && git -C $REMOTE_DIR checkout $(quote "$REF")"
  on_all_workers "$fetch_code"
else
  # This checkout as it is (tracked and untracked files, minus .gitignore'd ones).
  tarball="${TMPDIR:-/tmp}/daa_jax_src_$NAME.tar.gz"
  if ((DRY_RUN)); then
    echo "git -C $(quote "$HERE") ls-files -z --cached --others --exclude-standard |" \
      "tar -C $(quote "$HERE") --null -T - -czf $(quote "$tarball")"
  else
    git -C "$HERE" ls-files -z --cached --others --exclude-standard |
      tar -C "$HERE" --null -T - -czf "$tarball"
  fi
  run "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:daa_jax_src.tar.gz" "${LOCATION[@]}" --worker=all
  unpack="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR"
  on_all_workers "$unpack && tar -xzf daa_jax_src.tar.gz -C $REMOTE_DIR"
fi

# 3. Install: the README's line, then the TPU extra (jax[tpu]: libtpu). gcsfs lets etils.epath
#    (config.json, metrics.jsonl, orbax's metadata) reach the gs:// workdir without TensorFlow.
pip="python3 -m pip install"
on_all_workers "cd $REMOTE_DIR && $pip -U pip && $pip -e . && $pip -e \".[tpu]\" gcsfs"

# Data (config.data.source is read with local file APIs) and anything else the run needs.
[[ -n $SETUP ]] && on_all_workers "$SETUP"

# 4. Run on all workers; each keeps its own log, gcloud interleaves them here. A failed run
#    still gets its logs fetched (and the VM deleted) before this script exits non-zero.
main=(python3 -m daa_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=on
      "${MAIN_FLAGS[@]}")
status=0
run_main="cd $REMOTE_DIR && set -o pipefail && $(quote "${main[@]}") 2>&1 | tee ~/$REMOTE_LOG"
on_all_workers "$run_main" || status=$?

# 5. Results: the run's small files and worker 0's log (checkpoints stay in the bucket).
run mkdir -p "$RESULTS"
run gcloud storage cp "$WORKDIR/config.json" "$WORKDIR/metrics.jsonl" "$RESULTS/" ||
  echo "tpu_vm.sh: could not fetch $WORKDIR/{config.json,metrics.jsonl}" >&2
run "${GCLOUD_TPU[@]}" scp "$NAME:$REMOTE_LOG" "$RESULTS/" "${LOCATION[@]}" --worker=0 ||
  echo "tpu_vm.sh: could not fetch worker 0's log" >&2
if ((DRY_RUN)); then
  echo "tpu_vm.sh: dry run, nothing was run" >&2
elif ((status)); then
  echo "tpu_vm.sh: the run failed (exit $status); see $RESULTS/$REMOTE_LOG" >&2
else
  echo "tpu_vm.sh: done; results in $RESULTS, checkpoints in $WORKDIR" >&2
fi
# 6. The VM is deleted by the EXIT trap (unless --keep), also when a step above failed.
exit "$status"
