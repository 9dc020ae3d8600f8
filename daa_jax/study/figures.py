"""The study's figures (matplotlib): KL/win-rate frontier with fitted laws, epochs, scatter panels."""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence
import numpy as np
from daa_jax.study.fits import (by_group, final_rows, is_reference, predict, run_id, size_key)


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _objective_key(objective: str):
  known = ("dpo", "ipo", "slic")
  low = objective.lower()
  return (known.index(low) if low in known else len(known), low)


def _x(row, x_col: str) -> float:
  """Abscissa of a row: sqrt_kl as stored; forward_kl turned into its square root."""
  value = row.get(x_col, math.nan)
  return math.sqrt(max(value, 0.0)) if x_col == "forward_kl" and math.isfinite(value) else value


def finite(rows, *cols):
  return [r for r in rows if all(math.isfinite(r.get(c, math.nan)) for c in cols)]


def _new_figure(nrows: int, ncols: int, width: float = 3.8, height: float = 3.0,
                sharey: bool | str = False):
  # matplotlib is imported here, not at module level: reading and fitting need none of it, and
  # a bare Figure (no pyplot) renders through Agg without touching the global backend.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
  return fig, fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)


def _win_rate_errors(rows, y_col: str = "win_rate"):
  """[2, N] asymmetric error bars from the 95% interval columns (0 where missing)."""
  y = np.array([r[y_col] for r in rows])
  lo = np.array([r.get("win_rate_lo", math.nan) for r in rows], np.float64)
  hi = np.array([r.get("win_rate_hi", math.nan) for r in rows], np.float64)
  return np.stack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)]).clip(min=0.0)


def _beta_markers(rows) -> dict[float, str]:
  betas = sorted({r["beta"] for r in rows if not is_reference(r) and math.isfinite(r["beta"])})
  return {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(betas)}


def _save(fig, out_dir: str, name: str) -> list[str]:
  paths = []
  for ext in ("png", "pdf"):
    path = os.path.join(out_dir, f"{name}.{ext}")
    fig.savefig(path, dpi=130)
    paths.append(path)
  return paths


def sizes_and_colors(rows):
  sizes = sorted({r["size"] for r in rows if not is_reference(r)}, key=size_key)
  return sizes, {s: f"C{i % 10}" for i, s in enumerate(sizes)}


def _frontier_figure(rows, fit_groups, x_col: str, xlabel: str):
  """Fig. 1 layout: objectives in columns, final / all checkpoints in rows, a color per size."""
  groups = by_group(rows)
  objectives = sorted({o for o, _ in groups}, key=_objective_key)
  sizes, color = sizes_and_colors(rows)
  marker = _beta_markers(rows)
  references = {r["size"]: r for r in finite([r for r in rows if is_reference(r)], "win_rate")}
  fits = {(g["objective"], g["size"], g["set"]): g for g in fit_groups}
  # One y-axis per row: objectives side by side are read against the same win-rate scale.
  fig, axes = _new_figure(2, len(objectives), sharey="row")
  for j, objective in enumerate(objectives):
    for i, set_name in enumerate(("final", "all")):
      ax = axes[i][j]
      for size in sizes:
        if (objective, size) not in groups:
          continue
        subset = groups[(objective, size)]
        subset = finite(final_rows(subset) if set_name == "final" else subset, x_col, "win_rate")
        if not subset:
          continue
        x = np.array([_x(r, x_col) for r in subset])
        for beta, m in marker.items():  # color: size; marker: the objective's β
          pts = [r for r in subset if r["beta"] == beta]
          if pts:
            ax.errorbar([_x(r, x_col) for r in pts], [r["win_rate"] for r in pts],
                        yerr=_win_rate_errors(pts), fmt=m, ms=4, color=color[size],
                        ecolor=color[size], elinewidth=0.7, alpha=0.85, zorder=3)
        ref = references.get(size)
        if ref is not None:  # the SFT policy itself: d = 0
          ax.errorbar([0.0], [ref["win_rate"]], yerr=_win_rate_errors([ref]), fmt="*", ms=9,
                      color="k", elinewidth=0.7, zorder=4)
        fit = fits.get((objective, size, set_name))
        if fit and not fit["skipped"]:
          grid = np.linspace(0.0, 1.05 * x.max(), 200)
          ax.plot(grid, predict("log", fit["log"]["coef"], grid), ":", color=color[size], lw=1.5)
      ax.set_title(f"{objective.upper()}, {set_name} checkpoints", fontsize=10)
      ax.set_xlabel(xlabel)
      if j == 0:  # the row shares its y-axis
        ax.set_ylabel("win rate (95% interval)")
      ax.grid(alpha=0.3)
  _frontier_legend(axes[0][-1], sizes, color, marker, bool(references))
  return fig


def _frontier_legend(ax, sizes, color, marker, with_reference: bool) -> None:
  """One legend: color = model size, marker = β, star = the SFT reference, dotted = the fit."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  handles = [Line2D([], [], color=color[s], marker="o", ls="", label=f"size {s}") for s in sizes]
  handles += [Line2D([], [], color="0.4", marker=m, ls="", label=f"β={b:g}")
              for b, m in marker.items()]
  if with_reference:
    handles.append(Line2D([], [], color="k", marker="*", ms=9, ls="", label="SFT (d = 0)"))
  handles.append(Line2D([], [], color="0.4", ls=":", label="log-form fit"))
  ax.legend(handles=handles, fontsize=7, loc="best")


def _epoch_figure(rows, size: str):
  """Win rate and KL over the epoch for one model size: one line per β, a column per objective."""
  groups = {o: g for (o, s), g in by_group(rows).items() if s == size}
  objectives = sorted(groups, key=_objective_key)
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  fig, axes = _new_figure(2, len(objectives), sharey="row")
  for j, objective in enumerate(objectives):
    runs: dict[tuple, list] = {}
    for r in finite(groups[objective], "epoch_fraction"):
      runs.setdefault(run_id(r), []).append(r)
    # Colored by β order (small β, large KL: dark); NaN β last.
    order = sorted(runs, key=lambda k: (math.isnan(runs[k][0]["beta"]), runs[k][0]["beta"], k))
    for k, key in enumerate(order):
      run = sorted(runs[key], key=lambda r: r["epoch_fraction"])
      shade = colormaps["viridis"](k / max(len(order) - 1, 1))
      label = f"β={run[0]['beta']:g}" + (f" ({run[0]['run']})" if run[0].get("run") else "")
      pts = finite(run, "win_rate")
      handle = axes[0][j].errorbar(
          [r["epoch_fraction"] for r in pts], [r["win_rate"] for r in pts],
          yerr=_win_rate_errors(pts), fmt="o-", ms=3, color=shade, elinewidth=0.7,
          capsize=2, label=label)
      for bar in handle[2]:
        bar.set_alpha(0.4)  # β lines share checkpoints: overlapping bars stay see-through
      pts = finite(run, "kl")
      axes[1][j].plot([r["epoch_fraction"] for r in pts], [r["kl"] for r in pts], "o-", ms=3,
                      color=shade, label=label)
    epochs = [r["epoch_fraction"] for r in finite(groups[objective], "epoch_fraction")
              if r["epoch_fraction"] > 0]
    for i, label in enumerate(("win rate (95% interval)", "KL(πθ‖π_ref)")):
      axes[i][j].set_title(f"{objective.upper()} {size}", fontsize=10)
      axes[i][j].set_ylabel(label)
      axes[i][j].grid(alpha=0.3)
      # Schedule checkpoints cluster early (0.25, 0.5, 1, 2, ... epochs): a log axis spreads them.
      if epochs and max(epochs) / min(epochs) >= 8:
        ticks = sorted(set(epochs))
        axes[i][j].set_xscale("log")
        axes[i][j].set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=7)
        axes[i][j].minorticks_off()
        axes[i][j].set_xlabel("epochs (log scale; ticks at checkpoints)")
      else:
        axes[i][j].set_xlabel("epochs")
    if runs:
      axes[0][j].legend(fontsize=7)
  return fig


def _scatter_figure(rows, panels, width: float = 3.8):
  """One panel per (x column, y column, x label, y label); a color per size, a marker per
  objective, win-rate intervals as bars, Spearman ρ per size in the panel's title."""
  sizes, color = sizes_and_colors(rows)
  groups = by_group(rows)
  objectives = sorted({o for o, _ in groups}, key=_objective_key)
  fig, axes = _new_figure(1, len(panels), width=width)
  for ax, (x_col, y_col, xlabel, ylabel) in zip(axes[0], panels):
    xs: dict[str, list] = {}
    ys: dict[str, list] = {}
    for (objective, size), group_rows in groups.items():
      pts = finite(group_rows, x_col, y_col)
      if not pts:
        continue
      err = {"xerr" if x_col == "win_rate" else "yerr": _win_rate_errors(pts, "win_rate")} if (
          "win_rate" in (x_col, y_col)) else {}
      handle = ax.errorbar([r[x_col] for r in pts], [r[y_col] for r in pts], fmt=_MARKERS[
          objectives.index(objective) % len(_MARKERS)], ms=4, color=color[size],
                           elinewidth=0.6, label=f"{objective} {size}", **err)
      for bar in handle[2]:
        bar.set_alpha(0.3)  # the intervals are wide: keep the points readable
      xs.setdefault((objective, size), []).extend(r[x_col] for r in pts)
      ys.setdefault((objective, size), []).extend(r[y_col] for r in pts)
    # The rank correlations the report quotes (per objective and size), on the panel itself.
    text = [f"ρ = {_fmt(spearman(xs[k], ys[k]), 2)} ({k[0]} {k[1]}, n={len(xs[k])})"
            for k in sorted(xs, key=lambda k: (_objective_key(k[0]), size_key(k[1])))]
    if text:
      ax.set_title("Spearman " + ", ".join(text), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="lower right")
  return fig, axes


def _has(rows, *cols) -> bool:
  return bool(finite([r for r in rows if not is_reference(r)], *cols))


def make_figures(rows: Sequence[Mapping[str, Any]], fits: Mapping[str, Any],
                 out_dir: str, pairs_on_policy: bool = False) -> dict[str, list[str]]:
  """Writes the sweep's figures as PNG and PDF into out_dir.

  Figures (each only when its columns hold data): 'frontier' (Fig. 1: win rate vs √KL, points
  and dotted log-form fits), 'epoch_<size>' (win rate and KL over the epoch, a line per β),
  'proxy_metrics' (implicit-reward accuracy and held-out loss vs win rate), 'length_r2' (length
  R² vs KL), 'forward_kl' (win rate vs √forward KL with the same fits), 'likelihood_drift'
  (chosen log-prob change vs forward KL; `pairs_on_policy`: the preference pairs are samples
  of the reference policy, which the figure's title says).

  Returns:
    {figure name: [png path, pdf path]}.
  """
  os.makedirs(out_dir, exist_ok=True)
  figures: dict[str, list[str]] = {}
  if _has(rows, "sqrt_kl", "win_rate"):
    figures["frontier"] = _save(
        _frontier_figure(rows, fits["groups"], "sqrt_kl", "√KL(πθ‖π_ref)"), out_dir, "frontier")
  if _has(rows, "epoch_fraction", "win_rate"):
    for size in sizes_and_colors(rows)[0]:
      name = "epoch_" + re.sub(r"[^A-Za-z0-9._-]+", "_", size or "all")
      figures[name] = _save(_epoch_figure(rows, size), out_dir, name)
  panels = [("win_rate", col, "win rate", label) for col, label in
            (("reward_acc", "implicit-reward accuracy"), ("heldout_loss", "held-out loss"))
            if _has(rows, col, "win_rate")]
  if panels:
    figures["proxy_metrics"] = _save(_scatter_figure(rows, panels)[0], out_dir, "proxy_metrics")
  if _has(rows, "kl", "length_r2"):
    fig, _ = _scatter_figure(rows, [("kl", "length_r2", "KL(πθ‖π_ref)", "R² of reward on length")])
    figures["length_r2"] = _save(fig, out_dir, "length_r2")
  if _has(rows, "forward_kl", "win_rate"):
    figures["forward_kl"] = _save(
        _frontier_figure(rows, fits.get("forward_kl_groups", []), "forward_kl",
                         "√KL(π_ref‖πθ)"), out_dir, "forward_kl")
  if _has(rows, "forward_kl", "chosen_logp_drift"):
    fig, axes = _scatter_figure(
        rows, [("forward_kl", "chosen_logp_drift", "KL(π_ref‖πθ)", "Δ log π(y_chosen|x)")],
        width=5.0)
    top = max(r["forward_kl"] for r in finite(rows, "forward_kl"))
    axes[0][0].plot([0, top], [0, -top], "k--", lw=0.8, label="−KL(π_ref‖πθ)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    axes[0][0].set_title(
        ("pairs sampled from π_ref: their mean over both responses\nlies on the dashed line "
         "by identity; "
         if pairs_on_policy else "chosen responses' log-likelihood change; ")
        + axes[0][0].get_title(), fontsize=9)
    figures["likelihood_drift"] = _save(fig, out_dir, "likelihood_drift")
  return figures


def _fmt(value, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "—"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def spearman(x, y) -> float | None:
  x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return None
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.spearmanr(x, y)[0])
