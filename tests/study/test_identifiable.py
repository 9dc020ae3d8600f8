"""Issue 22 item 4: intervals inside [0, 1]; no d* past the sampled √KL; no curve without a fit."""

import json
import math

import numpy as np

from daa_jax.study import figures as figures_lib
from daa_jax.study import fits as scaling
from daa_jax.study import intervals as intervals_lib
from daa_jax.study import report as report_lib

from test_scaling import _group_rows  # pylint: disable=g-bad-import-order


def _law(d, r0, a, b):
  return r0 + d * (a - b * np.log(d))


def test_d_star_beyond_the_sampled_range_is_a_bound_not_a_number(tmp_path):
  # α/β = 10: the law peaks at d* = e^9 ≈ 8103, far past the largest sampled √KL (3).
  d = np.linspace(0.2, 3.0, 12)
  y = _law(d, 0.17, 0.1, 0.01)
  rows = _group_rows(tmp_path, d, y, y - 0.02, y + 0.02)
  fits = intervals_lib.fit_all(rows, num_bootstrap=0)
  log = next(g for g in fits["groups"] if g["set"] == "all")["log"]
  assert log["d_star"] is None and log["peak_win_rate"] is None
  assert log["d_star_status"] == "beyond_sampled_range"
  assert log["d_star_lower_bound"] == 3.0
  assert math.isclose(log["coef"]["alpha"], 0.1, abs_tol=1e-9)  # the other fields are kept
  json.dumps(fits, allow_nan=False)
  text = open(report_lib.write_report(rows, fits, {}, str(tmp_path / "report.md"))).read()
  assert "beyond the sampled range (> 3.00)" in text and "8103" not in text


def test_d_star_inside_the_range_is_estimated(tmp_path):
  d = np.linspace(0.2, 4.0, 12)
  y = _law(d, 0.17, 0.045 * (1 + math.log(2.0)), 0.045)  # d* = 2
  rows = _group_rows(tmp_path, d, y, y - 0.02, y + 0.02)
  log = next(g for g in intervals_lib.fit_all(rows, num_bootstrap=0)["groups"]
             if g["set"] == "all")["log"]
  assert log["d_star_status"] == "estimated" and math.isclose(log["d_star"], 2.0, rel_tol=1e-6)
  assert "d_star_lower_bound" not in log


def test_peak_win_rate_interval_stays_inside_0_1():
  # A peak at R* = 0.995 with noisy points: unclipped, the bootstrap's upper bound passes 1.
  d = np.linspace(0.2, 4.0, 21)
  y = _law(d, 0.6, 0.2 * (1 + math.log(2.0)), 0.2)  # d* = 2, R* = 1.0
  y = np.minimum(y, 1.0)
  sig = np.full_like(d, 0.05)
  boot = intervals_lib.bootstrap_group(d, y, None, sigmas=sig, num_samples=400, seed=0)
  for form in scaling.FORMS:
    ci = boot[form]["peak_win_rate_ci"]
    assert ci is not None and 0.0 <= ci[0] <= ci[1] <= 1.0, (form, ci)
  assert boot["log"]["peak_win_rate_ci"][1] == 1.0  # it was clipped, not merely lucky


def test_a_group_with_three_distinct_points_is_drawn_without_a_curve(tmp_path):
  d = np.array([0.5, 0.5, 1.0, 1.0, 2.0, 2.0])
  y = np.array([0.2, 0.21, 0.25, 0.24, 0.22, 0.23])
  rows = _group_rows(tmp_path, d, y, y - 0.03, y + 0.03)
  fits = intervals_lib.fit_all(rows, num_bootstrap=0)
  group = next(g for g in fits["groups"] if g["set"] == "all")
  assert group["skipped"].startswith("not identifiable")
  fig = figures_lib._frontier_figure(rows, fits["groups"], "sqrt_kl", "√KL")  # pylint: disable=protected-access
  ax = next(a for a in fig.axes if a.get_title() == "DPO, all checkpoints")
  assert not [line for line in ax.get_lines() if line.get_linestyle() == ":"]
  text = open(report_lib.write_report(rows, fits, {}, str(tmp_path / "report.md"))).read()
  assert "not identifiable" in text
