"""One run's evaluated checkpoints at a glance: `eval/checkpoints.{csv,md,png}`, and the figure
helpers the study's figures share (a bare Figure, win-rate error bars, legends outside the axes).

The table has a row per `eval/<step>/summary.json`; the plot shows win rate against √KL (one
point per checkpoint, its 95% interval as a bar, the step written beside it) and held-out
accuracy per step, hollow where the held-out margins are tiny (`heldout_margin_tiny`: the
accuracy is the sign of near-zero margins).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

COLUMNS = ("step", "epoch_fraction", "kl", "kl_stderr", "sqrt_kl", "forward_kl", "win_rate",
           "win_rate_lo", "win_rate_hi", "reward_acc", "heldout_abs_logratio_margin",
           "heldout_margin_tiny", "heldout_loss", "length_r2", "truncation_rate",
           "is_reference")


# --- Figure helpers (shared with study/figures.py) ------------------------------------------


def new_figure(nrows: int, ncols: int, width: float = 3.8, height: float = 3.0,
               sharey: bool | str = False):
  """A bare constrained-layout Figure and its [nrows, ncols] axes."""
  # matplotlib is imported here, not at module level: reading and fitting need none of it, and
  # a bare Figure (no pyplot) renders through Agg without touching the global backend.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def win_rate_errors(rows, y_col: str = "win_rate"):
  """[2, N] asymmetric error bars from the 95% interval columns (0 where missing)."""
  y = np.array([r[y_col] for r in rows], np.float64)
  lo = np.array([_num(r.get("win_rate_lo")) for r in rows], np.float64)
  hi = np.array([_num(r.get("win_rate_hi")) for r in rows], np.float64)
  return np.stack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)]).clip(min=0.0)


def outside_legend(ax, **kwargs):
  """A legend to the right of `ax`, outside it: a legend inside the axes can cover points
  (constrained layout makes room for it)."""
  kwargs.setdefault("fontsize", 7)
  return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def _num(value) -> float:
  return math.nan if value is None or isinstance(value, bool) else float(value)


# --- The table ---------------------------------------------------------------------------------


def read_summaries(workdir: str) -> list[dict]:
  """Every `<workdir>/eval/<step>/summary.json`, by step."""
  eval_dir = os.path.join(workdir, "eval")
  out = []
  for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else ():
    path = os.path.join(eval_dir, name, "summary.json")
    if name.isdigit() and os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        out.append(json.load(f))
  return sorted(out, key=lambda s: int(s["step"]))


def rows_of(summaries: Sequence[Mapping[str, Any]]) -> list[dict]:
  rows = []
  for s in summaries:
    lo, hi = (s.get("win_rate_ci") or [None, None])[:2]
    row = {c: s.get(c) for c in COLUMNS}
    row.update(win_rate_lo=lo, win_rate_hi=hi)
    rows.append(row)
  return rows


def _cell(value, digits: int = 4) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "—"
  if isinstance(value, bool):
    return "yes" if value else "no"
  return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
  """The table as markdown; a held-out accuracy from tiny margins is marked, with a note."""
  head = ("step", "epoch", "KL ± s.e.", "√KL", "win rate [95%]", "held-out acc",
          "mean \\|h\\| (nats)", "held-out loss", "truncated")
  lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    win = ("—" if r["win_rate"] is None else
           f"{r['win_rate']:.3f} [{r['win_rate_lo']:.3f}, {r['win_rate_hi']:.3f}]")
    acc = ("—" if r["reward_acc"] is None else f"{r['reward_acc']:.3f}") + (
        " (tiny margins)" if r["heldout_margin_tiny"] else "")
    step = f"{r['step']}" + (" (reference)" if r.get("is_reference") else "")
    lines.append("| " + " | ".join((
        step, _cell(r["epoch_fraction"], 3), f"{_cell(r['kl'])} ± {_cell(r['kl_stderr'], 2)}",
        _cell(r["sqrt_kl"]), win, acc, _cell(r["heldout_abs_logratio_margin"], 3),
        _cell(r["heldout_loss"]), _cell(r["truncation_rate"], 3))) + " |")
  if any(r["heldout_margin_tiny"] and not r.get("is_reference") for r in rows):
    lines += ["", "(tiny margins): the mean held-out |log-ratio margin| is below 0.05 nats; "
              "the policy barely left the reference and the accuracy is the sign of near-zero "
              "margins."]
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[Mapping[str, Any]], title: str):
  """Win rate vs √KL (when judged) and held-out accuracy per step; returns the Figure."""
  judged = [r for r in rows if r["win_rate"] is not None and r["sqrt_kl"] is not None]
  fig, axes = new_figure(1, 2 if judged else 1, width=4.2)
  panels = list(axes[0])
  if judged:
    ax = panels.pop(0)
    ax.errorbar([r["sqrt_kl"] for r in judged], [r["win_rate"] for r in judged],
                yerr=win_rate_errors(judged), fmt="o-", ms=4, color="C0", elinewidth=0.8,
                capsize=2, label="checkpoint (95% interval)")
    for r in judged:
      ax.annotate(str(r["step"]), (r["sqrt_kl"], r["win_rate"]), textcoords="offset points",
                  xytext=(4, 4), fontsize=7)
    ax.set_xlabel("√KL(πθ‖π_ref)")
    ax.set_ylabel("win rate")
    ax.grid(alpha=0.3)
    outside_legend(ax)
  ax = panels[0]
  held = [r for r in rows if r["reward_acc"] is not None]
  for tiny, style in ((False, dict(mfc="C1")), (True, dict(mfc="none"))):
    pts = [r for r in held if bool(r["heldout_margin_tiny"]) == tiny]
    if pts:
      label = "tiny margins: means little" if tiny else "held-out accuracy"
      ax.plot([r["step"] for r in pts], [r["reward_acc"] for r in pts], "o", ms=5,
              color="C1", label=label, **style)
  ax.set_xlabel("step")
  ax.set_ylabel("held-out accuracy")
  ax.grid(alpha=0.3)
  if held:
    outside_legend(ax)
  fig.suptitle(title, fontsize=10)
  return fig


def write(workdir: str) -> dict[str, str]:
  """Writes `<workdir>/eval/checkpoints.{csv,md,png}` from the evaluated steps; their paths."""
  rows = rows_of(read_summaries(workdir))
  if not rows:
    return {}
  eval_dir = os.path.join(workdir, "eval")
  title = f"{os.path.basename(os.path.normpath(workdir))}: evaluated checkpoints"
  paths = {k: os.path.join(eval_dir, f"checkpoints.{k}") for k in ("csv", "md", "png")}
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
  writer.writeheader()
  writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
  for key, text in (("csv", buf.getvalue()), ("md", markdown(rows, title))):
    with open(paths[key] + ".tmp", "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(paths[key] + ".tmp", paths[key])
  plot(rows, title).savefig(paths["png"], dpi=130)
  return paths
