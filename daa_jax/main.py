"""Entry point: `python -m daa_jax.main --config configs/daa.py:size=tiny --workdir DIR`.

The job comes from `config.job`: `sft`, `daa` (training), `eval` (evaluate a run's
checkpoints), `sweep` / `quickstart` (a grid of runs, evaluation, fits and figures) or
`tree_mdp` (the paper's toy). Any field can be overridden with `--config.a.b=value`.

`daa-jax --help` (or no arguments) lists the jobs and configs and exits 0; `--print_config`
prints every field of the resolved config and exits. The console shows progress bars,
warnings and a short summary; INFO logs go to `<workdir>/daa_jax.log` (`console.py`).

This is the only module with process-level side effects: flags, `jax.distributed`
initialization for multi-process jobs, and jax config updates. A user error (bad config
value, malformed data, incompatible checkpoint) ends with a one-paragraph message and exit
code 2. A SIGTERM or Ctrl-C to any process of a job stops all of them at an agreed point (during
training: every process saves the same step) and exits 0 with one line saying what was saved;
a second Ctrl-C aborts at once (exit 130, the last committed checkpoint kept).
"""

from __future__ import annotations

import difflib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from daa_jax import console
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
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' when the flags above or a multi-task SLURM job or "
    "TPU pod environment say so; 'on' always (unset values detected by jax from TPU VM "
    "metadata, SLURM or Open MPI; launch/tpu_vm.sh uses it); 'off' never (one process).")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every field of the resolved config (file, argument and "
    "--config.* overrides applied, validated) and exit; no --workdir needed.")


def _cpu_only(jax) -> bool:
  platforms = os.environ.get("JAX_PLATFORMS") or getattr(jax.config, "jax_platforms", "") or ""
  return [p.strip() for p in platforms.split(",") if p.strip()] == ["cpu"]


def _maybe_initialize_distributed() -> str:
  """Initializes jax.distributed when this is one process of several, then logs topology.

  `--distributed=auto` initializes when `--coordinator_address` or `--num_processes` > 1 is
  given, or the environment is a SLURM job with more than one task or a TPU pod that sets
  `TPU_WORKER_HOSTNAMES` / `MEGASCALE_COORDINATOR_ADDRESS`; a single SLURM task (one process
  driving all of a node's GPUs) is not distributed. A GCE TPU VM slice sets no variable (jax
  reads its metadata server), so `launch/tpu_vm.sh` passes `--distributed=on`. Unset values
  are detected by jax (TPU metadata, SLURM, Open MPI).
  """
  import jax  # pylint: disable=g-import-not-at-top
  by_flags = _COORDINATOR.value is not None or (_NUM_PROCESSES.value or 1) > 1
  by_env = os.environ.get("SLURM_NTASKS", "1") != "1" or any(
      v in os.environ for v in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"))
  mode = _DISTRIBUTED.value
  if mode == "on" or (mode == "auto" and (by_flags or by_env)):
    if _cpu_only(jax) and getattr(jax.config, "jax_cpu_collectives_implementation",
                                  "gloo") is None:
      # Cross-process collectives on CPU need an implementation: older jax has none by
      # default (newer defaults to gloo), and a multi-process CPU job then fails at its
      # first all-reduce.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
    if _LOCAL_DEVICES.value:
      kwargs["local_device_ids"] = [int(x) for x in _LOCAL_DEVICES.value.split(",")]
    jax.distributed.initialize(**kwargs)
  topology = (f"topology: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices "
              f"({jax.devices()[0].device_kind}), platform {jax.default_backend()}")
  logging.info("%s", topology)
  return topology


def dispatch(config, workdir: str, explicit=None):
  """Runs `config.job` in `workdir` and returns its summary; `explicit`: the fields set by
  `--config.*` overrides (training adapts only the others to a small data set)."""
  job = config.job
  from daa_jax.train import preemption  # pylint: disable=g-import-not-at-top
  preemption.set_phase(f"the {job} job", {
      "eval": f"every step with {workdir}/eval/<step>/summary.json is complete; the others "
              "are evaluated when you rerun",
      "sweep": "finished runs and evaluations are kept; the run in progress resumes from its "
               "last checkpoint",
      "quickstart": "finished runs and evaluations are kept; the run in progress resumes from "
                    "its last checkpoint",
  }.get(job, "nothing was saved"))
  if job == "daa" and config.get("guard") is not None and config.guard.get("enabled"):
    from daa_jax.study import guard  # pylint: disable=g-import-not-at-top
    return guard.run(config, workdir, explicit)
  if job in ("sft", "daa"):
    from daa_jax.train import loop as train  # pylint: disable=g-import-not-at-top
    return train.run(config, workdir, explicit)
  if job == "eval":
    from daa_jax.evaluate import loop as evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.run(config, workdir)
  if job in ("sweep", "quickstart"):
    from daa_jax.study import sweep  # pylint: disable=g-import-not-at-top
    return sweep.run(config, workdir)
  if job == "tree_mdp":
    from daa_jax.study import tree_mdp  # pylint: disable=g-import-not-at-top
    return tree_mdp.run(config, workdir)
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  raise ConfigError(f"config.job={job!r}; use sft, daa, eval, sweep, quickstart or tree_mdp.")


class _QuietLibraries:
  """Drops INFO chatter from orbax (one line per file operation) from the run's log."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv) -> None:
  _STARTED.append(True)
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or (_WORKDIR.value is None and not _PRINT_CONFIG.value):
    raise app.UsageError("--config and --workdir are required (see daa-jax --help).")
  console.quiet_console()
  from daa_jax.train import preemption  # pylint: disable=g-import-not-at-top
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  workdir, created = None, False
  try:
    # Relative paths are resolved here, once, against the directory the command was typed in.
    config_lib.resolve_paths(_CONFIG.value)
    if _PRINT_CONFIG.value:
      _validate(_CONFIG.value)
      console.print_config(_CONFIG.value)
      return
    workdir = config_lib.absolute_path(_WORKDIR.value)
    created = _make_workdir(workdir)
    with console.native_stderr_captured() as flush_start_up:
      topology = _maybe_initialize_distributed()
    # After jax.distributed: its own SIGTERM notifier must not take the signal from us.
    preemption.install()
    log_path = console.log_to_file(workdir)
    flush_start_up(log_path)
    console.status(f"{topology}; log: {log_path}")
    _validate(_CONFIG.value)
    summary = dispatch(_CONFIG.value, workdir,
                       config_flags.get_override_values(flags.FLAGS["config"]).keys())
  except DaaError as e:
    if workdir:
      _clean_failed_start(workdir, created)
    sys.stderr.write(f"daa_jax: error: {e}\n")
    sys.exit(2)
  except preemption.Preempted as e:
    print(f"daa_jax: {e}")
    sys.exit(0)
  except KeyboardInterrupt:  # a second Ctrl-C while the first waited for its save
    sys.stderr.write("daa_jax: aborted by a second Ctrl-C without saving; the last committed "
                     "checkpoint is kept. Run the same command again to continue from it.\n")
    sys.exit(130)
  print(console.summary_text(_CONFIG.value, workdir, summary))


def _make_workdir(workdir: str) -> bool:
  """Creates a local `workdir` and checks that it is writable; returns whether it was created.

  Raises:
    ConfigError: it cannot be created (a parent is a file, a read-only place) or written.
  """
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  if "://" in workdir:
    return False
  existed = os.path.isdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    # A write probe: os.access says yes to root on a read-only mount.
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".daa_jax_write_test"):
      pass
  except OSError as e:
    raise ConfigError(
        f"--workdir={workdir}: cannot {'write to' if existed else 'create'} it "
        f"({e.strerror or e}{': ' + e.filename if e.filename else ''}). Give a directory you "
        "can write, whose parents are directories (not files), e.g. --workdir=runs/NAME."
    ) from None
  return not existed


def _clean_failed_start(workdir: str, created: bool) -> None:
  """After a user error, removes what this start left half-written.

  Uncommitted orbax directories (`*.orbax-checkpoint-tmp*`) go; a workdir this run created
  goes too unless a checkpoint was committed in it (e.g. before a divergence). Committed steps
  and anything an earlier run saved stay.
  """
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  if "://" in workdir:
    return
  try:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() != 0:
      return
  except Exception:  # pylint: disable=broad-except  (jax not initialized: one process)
    pass
  for tmp in glob.glob(os.path.join(workdir, "**", "*.orbax-checkpoint-tmp*"), recursive=True):
    shutil.rmtree(tmp, ignore_errors=True)
  checkpoints = os.path.join(workdir, "checkpoints")
  committed = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  if created and not committed:
    shutil.rmtree(workdir, ignore_errors=True)


def _validate(config) -> None:
  """Every closed-set field and range of the config, before any data is read."""
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)


def cli() -> None:
  """Console script `daa-jax`: the same flags, plus `daa-jax eval RUN_DIR` as a shortcut."""
  argv = sys.argv
  console.maybe_help(argv, "daa-jax")
  if len(argv) >= 3 and argv[1] == "eval" and not argv[2].startswith("-"):
    run_dir = argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = os.path.join(os.path.dirname(here), "configs", "eval.py")
    argv = [argv[0], f"--config={cfg}:run={run_dir}", f"--workdir={run_dir}"] + argv[3:]
  _run(argv)


_STARTED = []
# Field names users carry over from other trainers, and what they are called here.
_ALIASES = {"learning_rate": "lr", "epochs": "num_epochs", "steps": "max_steps",
            "warmup": "warmup_steps", "max_grad_norm": "grad_clip", "clip": "grad_clip",
            "gradient_accumulation_steps": "grad_accum", "bs": "batch_size"}


def _parse_flags(argv):
  """absl's flag parsing, with a config that does not load (a config file that does not
  exist, a bad `file.py:arg`, an unknown `--config.a.b` key, a value of the wrong type) turned
  into one paragraph and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises on first use
    return rest
  except (flags.Error, DaaError, AttributeError, KeyError, TypeError, ValueError,
          OSError) as e:
    sys.stderr.write(f"daa_jax: error: {_flag_error_text(e, argv)}\n")
    sys.exit(2)


def _leaves(node, prefix=""):
  out = {}
  for key in node.keys():
    value = node[key]
    if hasattr(value, "keys") and not isinstance(value, (str, tuple)):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _load_config_file(spec: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("daa_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _flag_error_text(e: BaseException, argv) -> str:
  """One paragraph for a flag or config that does not parse, naming what was typed."""
  chain, x = [], e
  while x is not None and x not in chain:
    chain.append(x)
    x = x.__cause__ or x.__context__
  for x in reversed(chain):  # the innermost of daa_jax's own errors says it best
    if isinstance(x, DaaError):
      return str(x).strip()
  config_args = [a for a in argv[1:] if a.startswith("--config=") or a == "--config"]
  spec = None
  if config_args:
    i = argv.index(config_args[-1])
    spec = (config_args[-1].partition("=")[2] if "=" in config_args[-1]
            else (argv[i + 1] if i + 1 < len(argv) else None))
  if spec and not os.path.isfile(spec.partition(":")[0]):
    return (f"--config={spec}: the config file {spec.partition(':')[0]} does not exist (looked "
            f"in {os.getcwd()}). Give a config file such as configs/daa.py; daa-jax --help "
            "lists them.")
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  if spec and overrides:
    try:
      fields = _leaves(_load_config_file(spec))
    except Exception:  # pylint: disable=broad-except  (the file itself is broken: below)
      fields = None
    if fields is not None:
      for arg in overrides:
        key, _, value = arg[len("--config."):].partition("=")
        if key not in fields:
          section, _, leaf = key.rpartition(".")
          alias = f"{section + '.' if section else ''}{_ALIASES.get(leaf, leaf)}"
          close = [alias] if alias in fields else difflib.get_close_matches(
              key, list(fields), n=1, cutoff=0.6)
          fix = f" Did you mean --config.{close[0]}?" if close else ""
          where = f"config.{section}" if section else "the config"
          return (f"{arg}: {where} has no field {leaf!r} ({spec.partition(':')[0]}).{fix} "
                  "Its fields are listed by --print_config.")
        default = fields[key]
        if f"--config.{key}" in str(e) and default is not None:
          return (f"{arg}: {value!r} is not a valid {type(default).__name__} for "
                  f"config.{key} (it is {default!r} in {spec.partition(':')[0]}); give a "
                  f"value like --config.{key}={default}.")
  first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return (f"the command line does not parse ({first}). Check --config=FILE[:args] and each "
          "--config.a.b=value against the config's fields (--print_config lists them).")


def _run(argv=None) -> None:
  """`app.run(main)`, turning a bad `--config.a.b=value` override (raised by ml_collections
  while flags are parsed, before `main` starts) into a one-paragraph error and exit code 2."""
  try:
    app.run(main, argv=argv, flags_parser=_parse_flags)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if _STARTED:  # raised by the job itself: a bug, keep its traceback
      raise
    given = [a for a in (argv or sys.argv) if a.startswith("--config.")]
    sys.stderr.write(
        f"daa_jax: error: a --config override does not fit the config ({type(e).__name__}: "
        f"{e}). Overrides given: {' '.join(given) or 'none'}. Check the field names and types "
        "in the config file (its fields are listed in its get_config).\n")
    sys.exit(2)


if __name__ == "__main__":
  console.maybe_help(sys.argv, "python -m daa_jax.main")
  _run()
