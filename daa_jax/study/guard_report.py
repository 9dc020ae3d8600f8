"""The guard's part of a study's report: a table and a figure of every guarded run.

`write(out_dir)` finds the run directories of `out_dir` holding `guard.json` (written by
`study/guard.py` while they trained), writes `guard.md` (the table), `figures/guard.png` (each
run's live curve: its points in training order, the running fit as it stood at the end, the
stop and the kept point), and returns the lines `report.md` appends. The sweep's report and
`python -m daa_jax.scaling` both call it, so a refit redraws it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from etils import epath


def evidence_table(run_dirs: list[str]) -> str | None:
  """Markdown table of the guarded runs among `run_dirs` (those with guard.json), or None.

  Per run: the rule, where it stopped (or would have, in a dry run), the kept point, the best
  point of all the run's points, the best minus the kept win rate paired on the prompts
  (95% interval; "within" = the kept point is not significantly worse) and the steps saved.
  """
  lines = ["| run | rule | stop step | last step | kept step | kept √KL | kept win rate | "
           "best step | best win rate | best − kept [95% CI] | within | steps saved |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  found = False
  for run_dir in run_dirs:
    path = epath.Path(run_dir) / "guard.json"
    if not path.exists():
      continue
    found = True
    doc = json.loads(path.read_text())
    last = max(p["step"] for p in doc["points"])
    kept, best, test = doc["kept"], doc["best"], doc.get("kept_vs_best")
    rule = doc["rule"] + (" (dry run)" if doc.get("dry_run") else "")
    stop = doc["stop_step"]
    win = lambda x: "—" if x is None or x.get("win_rate") is None else f"{x['win_rate']:.3f}"
    diff = ("0 (same point)" if test is None else
            f"{test['diff']:+.3f} [{test['ci95'][0]:+.3f}, {test['ci95'][1]:+.3f}]")
    within = "yes" if test is None or test["within"] else "no"
    lines.append(
        f"| {epath.Path(run_dir).name} | {rule} | {'—' if stop is None else stop} | {last} | "
        f"{kept['step']} | {kept['sqrt_kl']:.2f} | {win(kept)} | {best['step']} | {win(best)} "
        f"| {diff} | {within} | {0 if stop is None else last - stop} |")
  return "\n".join(lines) + "\n" if found else None


def guarded_runs(out_dir: str) -> list[str]:
  """The run directories directly under `out_dir` with a guard.json, sorted."""
  return sorted(os.path.dirname(p) for p in
                (str(x) for x in epath.Path(out_dir).glob("*/guard.json")))


def figure(run_dirs: list[str], path: str) -> str | None:
  """Each guarded run's live curve with its running fit; None without runs."""
  docs = [(d, json.loads((epath.Path(d) / "guard.json").read_text())) for d in run_dirs]
  docs = [(d, doc) for d, doc in docs if any(p.get("win_rate") is not None
                                              for p in doc["points"])]
  if not docs:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cols = min(3, len(docs))
  rows = math.ceil(len(docs) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for ax, (run_dir, doc) in zip(axes.flat, docs):
    pts = [p for p in doc["points"] if p.get("win_rate") is not None]
    d = np.array([p["sqrt_kl"] for p in pts])
    y = np.array([p["win_rate"] for p in pts])
    lo = np.array([p["win_rate_ci"][0] for p in pts])
    hi = np.array([p["win_rate_ci"][1] for p in pts])
    ax.errorbar(d, y, yerr=[y - lo, hi - y], fmt="o-", ms=3, lw=0.8, alpha=0.8,
                label="guard points (training order)")
    fit = doc.get("fit") or {}
    if fit.get("status") == "fitted":
      grid = np.linspace(1e-6, max(d.max(), 1e-3), 200)
      ax.plot(grid, fit["r0"] + grid * (fit["alpha"] - fit["beta"] * np.log(grid)), "k--",
              lw=1, label="running fit (at the end)")
    if doc.get("stop_step") is not None:
      s = next(p for p in pts if p["step"] == doc["stop_step"])
      ax.plot([s["sqrt_kl"]], [s["win_rate"]], "rx", ms=10, mew=2,
              label=f"stop{' (dry run)' if doc.get('dry_run') else ''}, step {s['step']}")
    kept = doc.get("kept")
    if kept and kept.get("win_rate") is not None:
      ax.plot([kept["sqrt_kl"]], [kept["win_rate"]], "*", color="gold", mec="k", ms=14,
              label=f"kept, step {kept['step']}")
    ax.set_title(os.path.basename(run_dir), fontsize=9)
    ax.set_xlabel("√KL(πθ‖π_ref)")
    ax.set_ylabel("win rate")
    ax.legend(fontsize=6)
  for ax in list(axes.flat)[len(docs):]:
    ax.axis("off")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write(out_dir: str) -> list[str]:
  """guard.md and figures/guard.png for the guarded runs of `out_dir`; the report's lines."""
  runs = guarded_runs(out_dir)
  table = evidence_table(runs)
  if table is None:
    return []
  png = figure(runs, os.path.join(out_dir, "figures", "guard.png"))
  lines = ["## The over-optimization guard", "",
           "Each run's guard points (measured while it trained), the rule's stop and the kept "
           "point; best − kept is paired on the prompts (95% interval), \"within\" = the kept "
           "point is not significantly worse than the best of all the run's points.", "",
           table.rstrip("\n"), ""]
  if png:
    lines += ["![guard](figures/guard.png)", ""]
  with open(os.path.join(out_dir, "guard.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines).replace("## The", "# The", 1) + "\n")
  return lines
