"""Entry point: `python -m daa_jax.main --config configs/daa.py:size=tiny --workdir DIR`.

The job comes from `config.job`: `sft`, `daa` (training), `eval` (evaluate a run's
checkpoints), `sweep` / `quickstart` (a grid of runs, evaluation, fits and figures) or
`tree_mdp` (the paper's toy). Any field can be overridden with `--config.a.b=value`.

This is the only module with process-level side effects: flags, `jax.distributed`
initialization for multi-process jobs, and jax config updates. A user error (bad config
value, malformed data, incompatible checkpoint) ends with a one-paragraph message and exit
code 2; a SIGTERM during training checkpoints and exits 0.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from daa_jax.errors import DaaError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/daa.py:size=1b,objective=ipo,beta=0.05.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run (or sweep) directory; local or gs://.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process jobs (TPU pods and "
    "SLURM are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated local device ids for this process (GPU).")


def _maybe_initialize_distributed() -> None:
  """Initializes jax.distributed when this is one process of several."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = _COORDINATOR.value is not None or (_NUM_PROCESSES.value or 1) > 1
  auto = any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                       "MEGASCALE_COORDINATOR_ADDRESS"))
  slurm_single = os.environ.get("SLURM_NTASKS", "1") == "1" and "TPU_WORKER_HOSTNAMES" not in (
      os.environ)
  if explicit:
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
    if _LOCAL_DEVICES.value:
      kwargs["local_device_ids"] = [int(x) for x in _LOCAL_DEVICES.value.split(",")]
    jax.distributed.initialize(**kwargs)
  elif auto and not slurm_single:
    jax.distributed.initialize()
  logging.info("topology: process %d of %d, %d local / %d global devices (%s)",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)


def dispatch(config, workdir: str):
  """Runs `config.job` in `workdir` and returns its summary."""
  job = config.job
  if job in ("sft", "daa"):
    from daa_jax import train  # pylint: disable=g-import-not-at-top
    return train.run(config, workdir)
  if job == "eval":
    from daa_jax import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run(config, workdir)
  if job in ("sweep", "quickstart"):
    from daa_jax import sweep  # pylint: disable=g-import-not-at-top
    return sweep.run(config, workdir)
  if job == "tree_mdp":
    from daa_jax import tree_mdp  # pylint: disable=g-import-not-at-top
    return tree_mdp.run(config, workdir)
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  raise ConfigError(f"config.job={job!r}; use sft, daa, eval, sweep, quickstart or tree_mdp.")


class _QuietLibraries:
  """Drops INFO chatter from orbax (one line per file operation) from the run's log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv) -> None:
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required.")
  try:
    _maybe_initialize_distributed()
    summary = dispatch(_CONFIG.value, _WORKDIR.value)
  except DaaError as e:
    sys.stderr.write(f"daa_jax: error: {e}\n")
    sys.exit(2)
  if isinstance(summary, dict) and summary.get("message"):
    print(summary["message"])


def cli() -> None:
  """Console script `daa-jax`: the same flags, plus `daa-jax eval RUN_DIR` as a shortcut."""
  argv = sys.argv
  if len(argv) >= 3 and argv[1] == "eval" and not argv[2].startswith("-"):
    run_dir = argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = os.path.join(os.path.dirname(here), "configs", "eval.py")
    argv = [argv[0], f"--config={cfg}:run={run_dir}", f"--workdir={run_dir}"] + argv[3:]
  app.run(main, argv=argv)


if __name__ == "__main__":
  app.run(main)
