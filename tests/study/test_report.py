"""report.md and the figures say what they measured: columns, coefficients, β, intervals, ρ."""

import math

from daa_jax.study import report as report_lib
from daa_jax.study import fits as scaling
from daa_jax.study import intervals as intervals_lib
from daa_jax.study import figures as figures_lib

from test_scaling import _write_summary  # pylint: disable=g-bad-import-order


def _rows_and_fits(tmp_path):
  _write_summary(tmp_path / "summary.csv")
  rows = scaling.load_summary(str(tmp_path / "summary.csv"))
  return rows, intervals_lib.fit_all(rows, r0="sft")


def test_report_defines_what_it_measured(tmp_path):
  rows, fits = _rows_and_fits(tmp_path)
  figures = figures_lib.make_figures(rows, fits, str(tmp_path / "figures"),
                                    pairs_on_policy=True)
  text = open(report_lib.write_report(
      rows, fits, figures, str(tmp_path / "report.md"), win_rate_against="Win rate: X vs Y.",
      extra_lines=["## Checks of the paper's findings", "", "- ok"],
      pairs_on_policy=True)).read()
  assert "Win rate: X vs Y." in text
  # One notation, the paper's: α and β in every table and check (fits.json's alpha, beta), the
  # law stated, and no leftover a/b coefficients.
  assert "| R0 | α | β | RMSE | best-of-n RMSE |" in text and "| a | b |" not in text
  assert "| weighted | α | β | d* |" in text
  assert "the paper's law R(d) = d(α − β log d)" in text and "(fits.json: alpha, beta)" in text
  for column in ("**best-of-n RMSE**", "**RMSE ratio**", "**set**", "**n**", "**d\\***",
                 "**peak win rate**", "**quadratic RMSE**"):
    assert column in text, column
  assert "R(d) = R0 + d·(α − β·ln d)" in text and "(a − b" not in text
  assert "exp(α/β − 1)" in text and "**α**, **β**" in text
  assert "## Notes" not in text  # the checks bring their own heading: no empty section
  assert "## Checks of the paper's findings" in text
  assert "= −KL(π_ref‖πθ) exactly: the dashed line is that identity, not a finding" in text
  assert "(no reading" not in text
  # Every figure has a caption saying what it shows.
  for name in figures:
    section = text.split(f"### {name}\n")[1].split("###")[0]
    assert len(section.strip().splitlines()) >= 3, name


def test_frontier_marks_beta_and_the_sft_point_and_shares_y(tmp_path):
  rows, fits = _rows_and_fits(tmp_path)
  fig = figures_lib._frontier_figure(rows, fits["groups"], "sqrt_kl", "√KL")  # pylint: disable=protected-access
  axes = fig.axes
  top = [ax for ax in axes if "final" in ax.get_title()]
  assert len(top) == 3 and all(top[0].get_shared_y_axes().joined(top[0], ax) for ax in top)
  dpo_all = next(ax for ax in axes if ax.get_title() == "DPO, all checkpoints")
  markers = {line.get_marker() for line in dpo_all.get_lines()}
  betas = {r["beta"] for r in rows if r["objective"] == "dpo" and r["size"] == "1b"}
  assert len(markers & set(figures_lib._MARKERS)) >= min(len(betas), 2)  # pylint: disable=protected-access
  stars = [l for l in dpo_all.get_lines() if l.get_marker() == "*"]
  assert stars and list(stars[0].get_xdata()) == [0.0]  # the SFT policy at d = 0
  assert list(stars[0].get_ydata()) == [0.17]
  assert len(dpo_all.containers) >= len(betas)  # error bars on every β's win rates
  legend = [t.get_text() for t in axes[2].get_legend().get_texts()]
  assert "SFT (d = 0)" in legend and any(t.startswith("β=") for t in legend)


def test_epoch_axes_go_log_where_checkpoints_cluster_and_win_rates_have_bars(tmp_path):
  rows, _ = _rows_and_fits(tmp_path)
  spread = [dict(r, epoch_fraction=r["epoch_fraction"] * 2 ** (4 * r["epoch_fraction"]))
            for r in rows]  # 0.2 .. 16 epochs
  fig = figures_lib._epoch_figure(spread, "1b")  # pylint: disable=protected-access
  win_axes = [ax for ax in fig.axes if "win rate" in ax.get_ylabel()]
  assert win_axes and all(ax.get_xscale() == "log" for ax in fig.axes)
  assert all(ax.containers for ax in win_axes)
  linear = figures_lib._epoch_figure(rows, "1b")  # pylint: disable=protected-access
  fractions = [r["epoch_fraction"] for r in rows if math.isfinite(r["epoch_fraction"])]
  if max(fractions) / min(f for f in fractions if f > 0) < 8:
    assert all(ax.get_xscale() == "linear" for ax in linear.axes)


def test_proxy_metrics_panels_state_spearman_rho(tmp_path):
  rows, _ = _rows_and_fits(tmp_path)
  fig, axes = figures_lib._scatter_figure(  # pylint: disable=protected-access
      rows, [("win_rate", "reward_acc", "win rate", "acc")])
  title = axes[0][0].get_title()
  assert title.startswith("Spearman ")
  objectives = {r["objective"] for r in rows if not scaling.is_reference(r)}
  for objective in objectives:  # per objective, not pooled across DPO/IPO/SLiC
    pts = [r for r in rows if r["size"] == "1b" and r["objective"] == objective
           and math.isfinite(r.get("reward_acc", math.nan)) and math.isfinite(r["win_rate"])]
    rho = figures_lib.spearman([r["win_rate"] for r in pts], [r["reward_acc"] for r in pts])  # pylint: disable=protected-access
    if pts:
      assert f"ρ = {figures_lib._fmt(rho, 2)} ({objective} 1b, n={len(pts)})" in title  # pylint: disable=protected-access
  assert axes[0][0].containers  # win-rate intervals as horizontal bars
  del fig


def covered_points(fig):
  """Plotted points (every Line2D vertex inside its axes) that some legend's box covers, after
  rendering: what a reader could not see."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  renderer = canvas.get_renderer()
  boxes = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes if ax.get_legend()]
  boxes += [legend.get_window_extent(renderer) for legend in fig.legends]
  covered = []
  for ax in fig.axes:
    frame = ax.get_window_extent(renderer)
    for line in ax.get_lines():
      xy = np.asarray(line.get_xydata(), np.float64)
      xy = xy[np.isfinite(xy).all(1)]
      if not len(xy):
        continue
      for x, y in ax.transData.transform(xy):
        if frame.contains(x, y) and any(b.contains(x, y) for b in boxes):
          covered.append((ax.get_title(), line.get_label(), float(x), float(y)))
  return covered, len(boxes)


def test_figure_legends_never_cover_a_plotted_point(tmp_path):
  rows, fits = _rows_and_fits(tmp_path)
  spread = [dict(r, epoch_fraction=r["epoch_fraction"] * 2 ** (4 * r["epoch_fraction"]))
            for r in rows]
  figures = {
      "frontier": figures_lib._frontier_figure(rows, fits["groups"], "sqrt_kl", "√KL"),  # pylint: disable=protected-access
      "epoch": figures_lib._epoch_figure(rows, "1b"),  # pylint: disable=protected-access
      "epoch_log": figures_lib._epoch_figure(spread, "1b"),  # pylint: disable=protected-access
      "proxy": figures_lib._scatter_figure(rows, [  # pylint: disable=protected-access
          ("win_rate", "reward_acc", "win rate", "acc"),
          ("win_rate", "heldout_loss", "win rate", "loss")])[0],
      "length_r2": figures_lib._scatter_figure(rows, [("kl", "length_r2", "KL", "R²")])[0],  # pylint: disable=protected-access
  }
  for name, fig in figures.items():
    covered, legends = covered_points(fig)
    assert legends >= 1, name  # the check checked something
    assert not covered, (name, covered[:5])


def test_report_flags_reward_accuracies_from_near_zero_margins(tmp_path):
  rows, fits = _rows_and_fits(tmp_path)
  assert "near-zero margins" not in report_lib.figure_readings(rows, fits)["proxy_metrics"]
  trained = [r for r in rows if not scaling.is_reference(r)]
  for i, r in enumerate(trained):
    r["heldout_abs_logratio_margin"] = 1e-3 if i < 2 else 0.4  # two barely-moved checkpoints
  text = report_lib.figure_readings(rows, fits)["proxy_metrics"]
  assert (f"2 of {len(trained)} trained checkpoints have a mean held-out |log-ratio margin| "
          "under 0.05 nats") in text
