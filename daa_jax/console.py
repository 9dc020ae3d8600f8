"""What a job shows on the terminal: help, the resolved config, quiet logs and a summary.

Called by `main.py` only (these functions change process-wide logging). The console gets
progress bars (stderr), warnings and errors (stderr, one paragraph each, `daa_jax: warning:`)
and a short summary of where things are (stdout). Every absl/jax INFO line goes to
`<workdir>/daa_jax.log` (`daa_jax.<process>.log` on the other processes of a multi-process
job); `--alsologtostderr` (absl's flag) shows them on the terminal as well.
"""

from __future__ import annotations

import ast
import contextlib
import logging as py_logging
import os
import sys
import tempfile
from typing import Any

from absl import flags
from absl import logging

_HELP_WORDS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "help")

JOBS = (
    ("sft", "supervised fine-tuning on the preferred responses: the reference policy"),
    ("daa", "DPO / IPO / SLiC / ... training from an SFT run or HF weights"),
    ("eval", "KL from samples, win rates and held-out metrics of a run's checkpoints"),
    ("sweep", "objective x size x beta grid: runs, evaluation, fits, figures, report.md"),
    ("quickstart", "the whole study offline on the built-in synthetic task, in minutes"),
    ("tree_mdp", "the paper's Tree-MDP toy: out-of-distribution probability through training"),
)


def configs_dir() -> str:
  """The repository's `configs/` (next to the package in a source checkout)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _first_docstring_line(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError):
    return ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def help_text(prog: str) -> str:
  """The help screen: usage, jobs, the config files, and how to see a resolved config."""
  lines = [
      "daa_jax: Direct Alignment Algorithms (DPO, IPO, SLiC, ...) and their over-optimization.",
      "",
      f"usage: {prog} --config CONFIG_FILE[:key=value,...] --workdir DIR [--config.a.b=VALUE ...]",
      "       daa-jax eval RUN_DIR                  (evaluate a run's checkpoints)",
      "",
      "jobs (config.job, set by the config file):",
  ]
  lines += [f"  {name:<11} {what}" for name, what in JOBS]
  lines += ["", "configs:"]
  root = configs_dir()
  names = sorted(n for n in os.listdir(root) if n.endswith(".py")) if os.path.isdir(root) else []
  for name in names:
    lines.append(f"  configs/{name:<16} {_first_docstring_line(os.path.join(root, name))}")
  if not names:
    lines.append(f"  (no configs/ next to the package at {root}; use a source checkout)")
  lines += [
      "",
      "every field of a resolved config (overrides applied, validated; no --workdir needed):",
      f"  {prog} --config configs/daa.py:size=tiny --print_config",
      "",
      "examples:",
      f"  {prog} --config configs/quickstart.py --workdir /tmp/quickstart",
      f"  {prog} --config configs/daa.py:size=tiny,objective=ipo,beta=0.05 \\",
      "      --config.data.source=pairs.jsonl --workdir runs/ipo",
      "",
      "flags: --config, --workdir, --print_config, --coordinator_address, --num_processes,",
      "  --process_id, --local_device_ids, --distributed=auto|on|off, --alsologtostderr",
      "  (INFO logs on the terminal too; they always go to <workdir>/daa_jax.log).",
      "A config file's docstring shows its command lines; a user error exits 2 with one",
      "paragraph naming the field and the fix.",
  ]
  return "\n".join(lines)


def maybe_help(argv: list[str], prog: str) -> None:
  """Prints the help and exits 0 for no arguments, `help`, `-h`, `--help` or `--helpfull`."""
  args = argv[1:]
  if args and not any(a in _HELP_WORDS for a in args):
    return
  text = help_text(prog)
  if "--helpfull" in args:  # main.py has defined its flags by now
    text += "\n\nall flags:\n" + flags.FLAGS.get_help()
  print(text)
  sys.exit(0)


def print_config(config) -> None:
  """Prints every field of `config` (the ConfigDict's YAML-like dump) to stdout."""
  print(f"# job: {config.get('job')}; every field, as resolved from the file, its argument "
        "and --config.* overrides.")
  print(str(config).rstrip())


class _ConsoleFormatter(py_logging.Formatter):
  """One paragraph per warning or error, without absl's thread id and file:line prefix."""

  def format(self, record):
    kind = "error" if record.levelno >= py_logging.ERROR else "warning"
    return f"daa_jax: {kind}: {record.getMessage()}"


def _wants_verbose() -> bool:
  try:
    return bool(flags.FLAGS["alsologtostderr"].value or flags.FLAGS["logtostderr"].value)
  except (KeyError, flags.UnparsedFlagAccessError):
    return False


def quiet_console() -> None:
  """Shows only warnings and errors on stderr (unless --alsologtostderr / --logtostderr)."""
  py_logging.getLogger().setLevel(py_logging.INFO)
  if _wants_verbose():
    return
  handler = logging.get_absl_handler()
  handler.setLevel(py_logging.WARNING)
  handler.setFormatter(_ConsoleFormatter())


@contextlib.contextmanager
def native_stderr_captured():
  """Holds what native code writes to stderr (fd 2) meanwhile; yields a `flush(path)` that
  appends it to the log.

  Backend start-up prints from C++ (libtpu installed on a machine without TPUs: "could not
  determine TPU accelerator type", InitGoogle notices) straight to the terminal, past any
  Python logging. Wrapped around `jax.distributed` and backend initialization, that text goes
  to the job's log instead; if start-up raises, it is shown on the terminal with the error.
  With --alsologtostderr nothing is captured.
  """
  if _wants_verbose():
    yield lambda path: None
    return
  sys.stderr.flush()
  saved = os.dup(2)
  held = tempfile.TemporaryFile()
  os.dup2(held.fileno(), 2)
  restored = []

  def restore():
    if not restored:
      os.dup2(saved, 2)
      os.close(saved)
      restored.append(True)

  def flush(path: str) -> None:
    held.seek(0)
    text = held.read().decode("utf-8", errors="replace")
    if text.strip():
      with open(path, "a", encoding="utf-8") as f:
        f.write("native stderr during start-up:\n" + text)

  try:
    yield flush
  except BaseException:
    restore()
    held.seek(0)
    sys.stderr.write(held.read().decode("utf-8", errors="replace"))
    raise
  finally:
    restore()


def log_to_file(workdir: str) -> str:
  """Sends every INFO-and-above record to the job's log file; returns its path.

  Process 0 writes `<workdir>/daa_jax.log`, process i `daa_jax.<i>.log`; a remote workdir
  (gs://) keeps the log on the local disk (python logging writes local files).
  """
  import jax  # pylint: disable=g-import-not-at-top
  index = jax.process_index()
  name = "daa_jax.log" if index == 0 else f"daa_jax.{index}.log"
  directory = workdir if "://" not in str(workdir) else os.path.join(
      tempfile.gettempdir(), "daa_jax_logs")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  handler = py_logging.FileHandler(path, encoding="utf-8")
  handler.setLevel(py_logging.INFO)
  handler.setFormatter(logging.PythonFormatter())
  py_logging.getLogger().addHandler(handler)
  return path


def status(line: str) -> None:
  """One line on stderr (beside the progress bars), also in the log."""
  logging.info("%s", line)
  sys.stderr.write(line + "\n")
  sys.stderr.flush()


def summary_text(config, workdir: str, summary: Any) -> str:
  """The few stdout lines a job ends with: what finished and where its files are."""
  if isinstance(summary, dict) and summary.get("message"):
    return str(summary["message"])
  job = config.get("job")
  if job in ("sft", "daa") and isinstance(summary, dict):
    status_word = summary.get("status", "finished")
    parts = [f"{job}: {status_word} at step {summary.get('step')}"]
    for key, label in (("loss/total", "loss"), ("daa/reward_acc", "reward acc"),
                       ("eval/reward_acc", "held-out acc")):
      if key in summary:
        parts.append(f"{label} {float(summary[key]):.4f}")
    if summary.get("attention_kernel"):
      parts.append(f"attention {summary['attention_kernel']}")
    lines = [", ".join(parts)]
    if summary.get("policy_moved") is False:
      lines.append(
          f"  the policy barely moved: RMS log-ratio margin "
          f"{float(summary['logratio_margin_rms']):.2g} nats (accuracies of margins this small "
          "mean little); train longer, raise config.optim.lr, or give more data.")
    if "guard_points" in summary:
      kept = summary.get("guard_kept_step")
      why = summary.get("guard_reason") or "it measured only"
      lines.append(
          f"  guard:   {summary['guard_points']} points, {summary['guard_seconds']:.1f} s "
          f"({100 * summary['guard_cost_fraction']:.0f}% of the training time); "
          + (f"stopped: {why}" if summary.get("guard_stopped") else "did not stop")
          + ("" if kept is None else
             f"; kept step {kept} (√KL {summary['guard_kept_sqrt_kl']:.2f}"
             + ("" if summary.get("guard_kept_win_rate") is None else
                f", win rate {summary['guard_kept_win_rate']:.3f}")
             + f") in {os.path.join(workdir, 'best')}"))
    if status_word == "preempted":
      lines.append("  rerun the same command to resume from the last checkpoint.")
    lines += [f"  run:     {workdir}", f"  metrics: {os.path.join(workdir, 'metrics.jsonl')}"]
    if job == "daa":
      lines.append(f"  next:    daa-jax eval {workdir}")
    return "\n".join(lines)
  return f"{job}: done in {workdir}"
