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
  assert "| R0 | a | b | RMSE | best-of-n RMSE |" in text and "| α |" not in text
  for column in ("**best-of-n RMSE**", "**RMSE ratio**", "**set**", "**n**", "**d\\***",
                 "**peak win rate**", "**quadratic RMSE**"):
    assert column in text, column
  assert "R(d) = R0 + d·(a − b·ln d)" in text and "alpha" not in text
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
