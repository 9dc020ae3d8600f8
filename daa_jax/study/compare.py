"""Objectives compared on the paper's KL axis: the regularizer study's table and figure.

For each objective (a group of the sweep, all its β/strength runs and checkpoints, one size):
its fitted log-form law (`fits.json`'s "all" set: peak win rate and d* with their bootstrap
intervals, α, β), the win rate of its largest-KL checkpoint, and a paired test against the
baseline (DPO) at matched √KL: √KL is cut into bins of `bin_width`; in every bin where both
have checkpoints, each prompt's outcome is averaged over the objective's checkpoints in the
bin and over the baseline's, and the per-prompt differences are averaged over the shared bins
(all checkpoints were judged on the same prompts). The test is two-sided, normal
approximation over prompts. An objective whose law cannot be fitted is named with the reason,
never dropped.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from daa_jax.study import fits as fits_lib

Z95 = 1.959964


def matched_kl_test(rows_a, rows_b, outcomes: Mapping[str, np.ndarray],
                    bin_width: float = 0.5) -> dict[str, Any] | None:
  """Objective a minus baseline b at matched √KL, paired by prompt (None: no shared bin or no
  per-prompt outcomes). Returns {'diff', 'stderr', 'ci95', 'p_value', 'bins', 'num_prompts'}."""
  def binned(rows):
    out: dict[int, list] = {}
    for r in rows:
      key = fits_lib.outcome_key(r)
      if key in outcomes and math.isfinite(r.get("sqrt_kl", math.nan)):
        out.setdefault(int(r["sqrt_kl"] // bin_width), []).append(np.asarray(outcomes[key]))
    return out
  a, b = binned(rows_a), binned(rows_b)
  shared = sorted(set(a) & set(b))
  if not shared:
    return None
  sizes = {len(x) for k in shared for x in a[k] + b[k]}
  if len(sizes) != 1:
    return None  # judged on different prompt sets: they cannot be paired
  diff = np.mean([np.mean(a[k], axis=0) - np.mean(b[k], axis=0) for k in shared], axis=0)
  mean, se = float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))
  p = math.erfc(abs(mean) / se / math.sqrt(2)) if se > 0 else (0.0 if mean else 1.0)
  return {"diff": mean, "stderr": se, "ci95": [mean - Z95 * se, mean + Z95 * se],
          "p_value": p, "bins": [[k * bin_width, (k + 1) * bin_width] for k in shared],
          "num_prompts": int(diff.size)}


def compare(rows: Sequence[Mapping[str, Any]], fits: Mapping[str, Any],
            outcomes: Mapping[str, np.ndarray] | None, baseline: str = "dpo",
            bin_width: float = 0.5) -> dict[str, Any]:
  """{'baseline', 'bin_width', 'objectives': [{objective, size, ...}]} for every group."""
  groups = fits_lib.by_group(rows)
  fitted = {(g["objective"], g["size"]): g for g in fits.get("groups", [])
            if g.get("set") == "all" and g.get("x", "sqrt_kl") == "sqrt_kl"}
  out = []
  for (objective, size), group in groups.items():
    entry: dict[str, Any] = {"objective": objective, "size": size, "checkpoints": len(group)}
    g = fitted.get((objective, size))
    if g is None or g.get("skipped"):
      entry["fit"] = f"not fitted: {g['skipped'] if g else 'no fit for this group'}"
    else:
      log = g["log"]
      entry.update(fit="fitted", alpha=log["coef"]["alpha"], beta=log["coef"]["beta"],
                   alpha_ci=log.get("alpha_ci"), beta_ci=log.get("beta_ci"),
                   peak_win_rate=log["peak_win_rate"], peak_win_rate_ci=log.get(
                       "peak_win_rate_ci"), d_star=log["d_star"], d_star_ci=log.get("d_star_ci"),
                   d_star_status=log.get("d_star_status"), peak_note=log.get("peak_note"))
    far = max(group, key=lambda r: r["sqrt_kl"])
    entry.update(largest_sqrt_kl=far["sqrt_kl"], win_rate_at_largest_kl=far["win_rate"])
    base = groups.get((baseline, size))
    entry["vs_baseline"] = (None if objective == baseline or base is None or outcomes is None
                            else matched_kl_test(group, base, outcomes, bin_width))
    out.append(entry)
  out.sort(key=lambda e: e["objective"] != baseline)  # the baseline first, then as grouped
  return {"baseline": baseline, "bin_width": bin_width, "objectives": out}


def _ci(ci, digits=3) -> str:
  return "" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table_lines(result: Mapping[str, Any]) -> list[str]:
  """The report's section: one row per objective."""
  base = result["baseline"]
  lines = ["## Objectives at matched KL", "",
           f"Per objective, all its runs and checkpoints: the log-form law's peak win rate and "
           f"√KL at the peak (d*) with 95% bootstrap intervals, α and β, the win rate of the "
           f"largest-KL checkpoint, and the paired difference from {base} at matched √KL (bins "
           f"of {result['bin_width']:g}, per-prompt outcomes averaged within each shared bin; "
           "two-sided p).", "",
           "| objective | size | checkpoints | peak win rate | √KL at peak | α | β | win rate at "
           f"largest KL (√KL) | − {base} at matched √KL | p | shared bins |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for e in result["objectives"]:
    if e["fit"] == "fitted":
      peak = ("—" if e["peak_win_rate"] is None else
              f"{e['peak_win_rate']:.3f}{_ci(e['peak_win_rate_ci'])}")
      dstar = (e.get("peak_note") or "no maximum") if e["d_star"] is None else (
          f"{e['d_star']:.2f}{_ci(e['d_star_ci'], 2)}")
      coef = (f"{e['alpha']:.3f}{_ci(e['alpha_ci'])}", f"{e['beta']:.3f}{_ci(e['beta_ci'])}")
    else:
      peak, dstar, coef = e["fit"], "—", ("—", "—")
    vs = e["vs_baseline"]
    cmp_ = (("—", "—", "—") if vs is None else
            (f"{vs['diff']:+.3f}{_ci(vs['ci95'])}", f"{vs['p_value']:.2g}", str(len(vs["bins"]))))
    lines.append(f"| {e['objective']} | {e['size']} | {e['checkpoints']} | {peak} | {dstar} | "
                 f"{coef[0]} | {coef[1]} | {e['win_rate_at_largest_kl']:.3f} "
                 f"({e['largest_sqrt_kl']:.2f}) | {cmp_[0]} | {cmp_[1]} | {cmp_[2]} |")
  return lines + [""]


def figure(rows, fits: Mapping[str, Any], path: str) -> str | None:
  """Every objective's checkpoints and fitted law on one win-rate-vs-√KL plot."""
  groups = fits_lib.by_group(rows)
  if len({o for o, _ in groups}) < 2:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fitted = {(g["objective"], g["size"]): g for g in fits.get("groups", [])
            if g.get("set") == "all" and g.get("x", "sqrt_kl") == "sqrt_kl"
            and not g.get("skipped")}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, ((objective, size), group) in enumerate(groups.items()):
    color = colors[i % len(colors)]
    d = np.array([r["sqrt_kl"] for r in group])
    y = np.array([r["win_rate"] for r in group])
    ax.scatter(d, y, s=12, color=color, alpha=0.7, label=f"{objective} ({size})")
    g = fitted.get((objective, size))
    if g is not None:
      c = g["log"]["coef"]
      grid = np.linspace(1e-6, d.max(), 200)
      ax.plot(grid, c["r0"] + grid * (c["alpha"] - c["beta"] * np.log(grid)), color=color,
              lw=1.2)
  ax.set_xlabel("√KL(πθ‖π_ref)")
  ax.set_ylabel("win rate")
  ax.set_title("Objectives on one KL axis (lines: log-form fits on all checkpoints)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
