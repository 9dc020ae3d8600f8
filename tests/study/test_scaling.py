"""Tests of study/fits.py and study/report.py: coefficient recovery, peaks, and summary.csv → fits, figures, report."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from daa_jax.study import report as report_lib
from daa_jax.study import fits as scaling
from daa_jax.errors import DataError
from daa_jax.study import intervals as intervals_lib
from daa_jax.study import figures as figures_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _law(form, d, r0, a, b):
  d = np.asarray(d, dtype=np.float64)
  if form == "log":
    return r0 + d * (a - b * np.log(np.where(d > 0, d, 1.0)))
  if form == "bon":
    return r0 + d * (a - b * d)
  return r0 + a * d**2 + b * d**4  # quadratic in KL = d²


TRUE = {"log": (0.17, 0.25, 0.2), "bon": (0.17, 0.3, 0.1), "quadratic": (0.17, 0.08, -0.01)}
NAMES = {"log": ("alpha", "beta"), "bon": ("alpha", "beta"), "quadratic": ("c1", "c2")}


@pytest.mark.parametrize("form", ["log", "bon", "quadratic"])
@pytest.mark.parametrize("fixed_r0", [False, True])
def test_recovers_known_coefficients(form, fixed_r0):
  rng = np.random.default_rng(0)
  d = rng.uniform(0.05, 3.0, size=60)
  r0, a, b = TRUE[form]
  y = _law(form, d, r0, a, b) + rng.normal(0, 0.003, size=d.shape)
  fit = scaling.fit_form(form, d, y, r0=r0 if fixed_r0 else None)
  coef = fit["coef"]
  assert coef["r0"] == pytest.approx(r0, abs=0.006)
  assert coef[NAMES[form][0]] == pytest.approx(a, abs=0.01)
  assert coef[NAMES[form][1]] == pytest.approx(b, abs=0.005)
  assert fit["rmse"] == pytest.approx(0.003, abs=0.001)  # the noise level, nothing more
  np.testing.assert_allclose(scaling.predict(form, coef, d), _law(form, d, r0, a, b), atol=0.004)


def test_log_form_beats_quadratic_on_log_data():
  rng = np.random.default_rng(1)
  d = np.sort(rng.uniform(0.0, 2.5, size=35))
  y = _law("log", d, 0.17, 0.25, 0.2) + rng.normal(0, 0.005, size=d.shape)
  group = scaling.fit_group(d, y)
  assert group["skipped"] is None
  assert group["rmse_ratio"] < 0.5  # the quadratic in KL is flat at d = 0; the data are not
  assert group["log"]["rmse"] < group["quadratic"]["rmse"]


def test_peak_formulas():
  coef = {"r0": 0.17, "alpha": 0.25, "beta": 0.2}
  d_star, r_star, note = scaling.peak("log", coef)
  assert note is None and d_star == pytest.approx(math.exp(0.25 / 0.2 - 1))
  grid = np.linspace(0.01, 5, 20001)
  values = scaling.predict("log", coef, grid)
  assert grid[values.argmax()] == pytest.approx(d_star, abs=1e-3)
  assert r_star == pytest.approx(values.max(), abs=1e-6)
  assert r_star == pytest.approx(0.17 + 0.2 * d_star)
  d_star, r_star, _ = scaling.peak("bon", {"r0": 0.1, "alpha": 0.3, "beta": 0.1})
  assert d_star == pytest.approx(1.5) and r_star == pytest.approx(0.1 + 0.09 / 0.4)
  d_star, r_star, _ = scaling.peak("quadratic", {"r0": 0.1, "c1": 0.08, "c2": -0.01})
  assert d_star == pytest.approx(2.0) and r_star == pytest.approx(0.1 + 0.16)
  assert scaling.peak("log", {"r0": 0, "alpha": 1, "beta": -0.1})[0] is None


def test_too_few_points_and_degenerate_groups_are_skipped():
  assert "need at least 4" in scaling.fit_group([0.5, 1.0, 1.5], [0.2, 0.3, 0.25])["skipped"]
  assert scaling.fit_group([0.5, 1.0, 1.5], [0.2, 0.3, 0.25], r0=0.17)["skipped"] is None
  assert "not identifiable" in scaling.fit_group([1.0] * 5, [0.2, 0.3, 0.25, 0.2, 0.1])["skipped"]


# --- summary.csv → fits.json, figures, report -----------------------------------------------

COLUMNS = ["objective", "size", "beta", "step", "epoch_fraction", "kl", "sqrt_kl", "forward_kl",
           "win_rate", "win_rate_lo", "win_rate_hi", "reward_acc", "heldout_loss", "length_r2",
           "chosen_logp_drift"]
LAW = {("dpo", "1b"): (0.17, 0.22, 0.2), ("dpo", "2.8b"): (0.2, 0.25, 0.17),
       ("ipo", "1b"): (0.17, 0.18, 0.15), ("ipo", "2.8b"): (0.2, 0.2, 0.12)}


def _write_summary(path):
  rng = np.random.default_rng(2)
  rows = []
  for (objective, size), (r0, a, b) in LAW.items():
    for beta, speed in ((0.01, 1.0), (0.03, 0.7), (0.1, 0.45), (0.3, 0.25), (1.0, 0.12)):
      for k, frac in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
        d = 2.6 * speed * math.sqrt(frac)
        w = float(_law("log", d, r0, a, b) + rng.normal(0, 0.004))
        rows.append(dict(objective=objective, size=size, beta=beta, step=(k + 1) * 20,
                         epoch_fraction=frac, kl=d * d, sqrt_kl=d, forward_kl=0.9 * d * d,
                         win_rate=w, win_rate_lo=w - 0.035, win_rate_hi=w + 0.035,
                         reward_acc=0.6 + 0.1 * frac, heldout_loss=0.69 - 0.05 * frac,
                         length_r2=0.3 / (1 + d), chosen_logp_drift=-0.8 * d * d))
  # A group with two checkpoints of one run: too few for a fit, must not crash anything.
  rows += [dict(objective="slic", size="1b", beta=0.1, step=s, epoch_fraction=f, kl=k,
                sqrt_kl=math.sqrt(k), win_rate=w) for s, f, k, w in ((20, 0.5, 0.5, 0.22),
                                                                      (40, 1.0, 1.2, 0.25))]
  rows.append(dict(objective="sft", size="1b", step=0, kl=0.0, win_rate=0.17))
  rows[3]["reward_acc"] = ""  # a missing value
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow(row)
  return rows


def test_summary_to_fits_figures_and_report(tmp_path):
  _write_summary(tmp_path / "summary.csv")
  rows = scaling.load_summary(str(tmp_path / "summary.csv"))
  assert len(rows) == 4 * 25 + 3 and math.isnan(rows[3]["reward_acc"])
  assert math.isnan(rows[-2]["forward_kl"]) and rows[0]["step"] == 20.0
  fits = intervals_lib.fit_all(rows)
  json.dumps(fits, allow_nan=False)  # JSON-serializable, strict
  by = {(g["objective"], g["size"], g["set"]): g for g in fits["groups"]}
  assert ("sft", "1b", "all") not in by
  assert by[("slic", "1b", "final")]["skipped"] and by[("slic", "1b", "all")]["skipped"]
  for (objective, size), (r0, a, b) in LAW.items():
    g = by[(objective, size, "all")]
    assert g["n"] == 25 and g["log"]["coef"]["alpha"] == pytest.approx(a, abs=0.03)
    assert g["log"]["coef"]["beta"] == pytest.approx(b, abs=0.02)
    assert g["rmse_ratio"] < 1
    assert by[(objective, size, "final")]["n"] == 5
  fwd = {(g["objective"], g["size"], g["set"]): g for g in fits["forward_kl_groups"]}
  assert fwd[("dpo", "1b", "all")]["x"] == "sqrt_forward_kl"
  # Given R0 from the sft row (1b) — and fitted where a size has none (2.8b).
  fits_sft = intervals_lib.fit_all(rows, r0="sft")
  g = next(g for g in fits_sft["groups"] if g["objective"] == "dpo" and g["size"] == "1b")
  assert g["log"]["coef"]["r0"] == 0.17 and g["r0_source"] == "sft rows"

  fits_path = scaling.write_fits(fits, str(tmp_path / "fits.json"))
  assert json.load(open(fits_path))["groups"][0]["objective"] == "dpo"
  figures = figures_lib.make_figures(rows, fits, str(tmp_path / "figures"))
  assert set(figures) == {"frontier", "epoch_1b", "epoch_2.8b", "proxy_metrics", "length_r2",
                          "forward_kl", "likelihood_drift"}
  for paths in figures.values():
    assert [os.path.splitext(p)[1] for p in paths] == [".png", ".pdf"]
    for p in paths:
      assert os.path.getsize(p) > 1000
  report = report_lib.write_report(rows, fits, figures, str(tmp_path / "report.md"),
                                extra_lines=["judge: gold reward"])
  text = open(report).read()
  assert "| dpo | 1b | all | 25 |" in text and "skipped: 2 points" in text
  assert "![frontier](figures/frontier.png)" in text and "judge: gold reward" in text
  best = max((r for r in rows if r["objective"] == "dpo" and r["size"] == "1b"),
             key=lambda r: r["win_rate"])
  assert f"DPO 1b: best win rate {best['win_rate']:.3f} at √KL {best['sqrt_kl']:.2f}" in text


def test_cli_runs_without_jax(tmp_path):
  _write_summary(tmp_path / "summary.csv")
  code = ("import runpy, sys\n"
          f"sys.argv = ['scaling', {str(tmp_path)!r}]\n"
          "try:\n"
          "  runpy.run_module('daa_jax.scaling', run_name='__main__', alter_sys=True)\n"
          "except SystemExit as e:\n"
          "  assert not e.code, e.code\n"
          "assert 'jax' not in sys.modules, 'daa_jax.scaling imported jax'\n"
          "import daa_jax.evaluate.judges\n"
          "assert 'jax' not in sys.modules, 'daa_jax.evaluate.judges imported jax'\n")
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  for name in ("fits.json", "report.md", "figures/frontier.png", "figures/frontier.pdf"):
    assert os.path.getsize(tmp_path / name) > 0


def test_load_summary_errors(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    scaling.load_summary(str(tmp_path / "missing.csv"))
  (tmp_path / "bad.csv").write_text("objective,size,kl,win_rate\ndpo,1b,0.5,abc\n")
  with pytest.raises(DataError, match=r"bad.csv:2: column win_rate"):
    scaling.load_summary(str(tmp_path / "bad.csv"))
  (tmp_path / "nokl.csv").write_text("objective,win_rate\ndpo,0.3\n")
  with pytest.raises(DataError, match="kl or sqrt_kl"):
    scaling.load_summary(str(tmp_path / "nokl.csv"))


def _group_rows(tmp_path, d, y, lo, hi, objective="dpo"):
  path = tmp_path / f"{objective}.csv"
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["objective", "size", "beta", "step", "kl", "sqrt_kl",
                                           "win_rate", "win_rate_lo", "win_rate_hi", "run"])
    writer.writeheader()
    for i in range(len(d)):
      writer.writerow(dict(objective=objective, size="1b", beta=0.1, step=10 * (i + 1),
                           kl=d[i] ** 2, sqrt_kl=d[i], win_rate=y[i], win_rate_lo=lo[i],
                           win_rate_hi=hi[i], run=f"{objective}_{i % 3}"))
  return scaling.load_summary(str(path))


def test_weighted_fit_discounts_a_point_with_a_wide_interval(tmp_path):
  rng = np.random.default_rng(2)
  d = np.linspace(0.1, 3.0, 25)
  y = _law("log", d, 0.17, 0.25, 0.2) + rng.normal(0, 0.004, d.shape)
  lo, hi = y - 0.02, y + 0.02
  y[[20, 22]] += 0.25  # two wild points that their intervals say to trust little
  lo[[20, 22]], hi[[20, 22]] = y[[20, 22]] - 0.5, y[[20, 22]] + 0.5
  rows = _group_rows(tmp_path, d, y, lo, hi)
  weighted = next(g for g in intervals_lib.fit_all(rows, num_bootstrap=0)["groups"] if g["set"] == "all")
  plain = next(g for g in intervals_lib.fit_all(rows, weighted=False, num_bootstrap=0)["groups"]
               if g["set"] == "all")
  assert weighted["weighted"] and not plain["weighted"]
  err = lambda g: abs(g["log"]["coef"]["alpha"] - 0.25) + abs(g["log"]["coef"]["beta"] - 0.2)
  assert err(weighted) < 0.02 < err(plain)


def test_bootstrap_intervals_cover_the_truth_over_prompts_and_checkpoints(tmp_path):
  rng = np.random.default_rng(3)
  d = np.linspace(0.1, 3.0, 21)
  p = _law("log", d, 0.17, 0.25, 0.2)
  num_prompts = 400
  outcomes_table = (rng.uniform(size=(len(d), num_prompts)) < p[:, None]).astype(float)
  y = outcomes_table.mean(1)
  half = 1.96 * np.sqrt(y * (1 - y) / num_prompts)
  rows = _group_rows(tmp_path, d, y, y - half, y + half)
  outcomes = {scaling.outcome_key(r): outcomes_table[i] for i, r in enumerate(rows)}
  fits = intervals_lib.fit_all(rows, outcomes=outcomes, num_bootstrap=400)
  g = next(g for g in fits["groups"] if g["set"] == "all")
  assert g["bootstrap"]["method"] == "prompts"
  log = g["log"]
  truth = dict(alpha=0.25, beta=0.2, d_star=math.exp(0.25 / 0.2 - 1),
               peak_win_rate=0.17 + 0.2 * math.exp(0.25 / 0.2 - 1))
  for name, value in truth.items():
    lo, hi = log[f"{name}_ci"]
    assert lo < value < hi, (name, lo, hi)
    point = log["coef"][name] if name in ("alpha", "beta") else log[name]
    assert lo <= point <= hi
  for form in ("bon", "quadratic"):
    assert g[form]["d_star_ci"] is not None and "peak_win_rate_ci" in g[form]
  assert 0 <= g["bootstrap"]["log_beats_bon"] <= 1
  json.dumps(fits, allow_nan=False)
  # Without per-prompt outcomes: checkpoints resampled, win rates perturbed by their intervals.
  g2 = next(g for g in intervals_lib.fit_all(rows, num_bootstrap=200)["groups"] if g["set"] == "all")
  assert g2["bootstrap"]["method"] == "checkpoints and interval noise"
  report = report_lib.write_report(rows, fits, {}, str(tmp_path / "report.md"))
  text = open(report).read()
  assert "Log-form 95% bootstrap intervals" in text
  a_lo, a_hi = log["alpha_ci"]
  assert f"[{a_lo:.3f}, {a_hi:.3f}]" in text


def test_paired_split_half_peak_test(tmp_path):
  rng = np.random.default_rng(4)
  num_prompts = 600
  d = np.linspace(0.2, 3.5, 12)
  p = _law("log", d, 0.17, 0.25, 0.2)  # peak 0.42 at d = 1.28, 0.17 + … falling after
  u = rng.uniform(size=num_prompts)  # a prompt's difficulty, shared by every checkpoint
  table = (u[None, :] < p[:, None]).astype(float)
  rows = _group_rows(tmp_path, d, table.mean(1), table.mean(1) - 0.04, table.mean(1) + 0.04)
  sft = dict(objective="sft", size="1b", step=0.0, run="sft_1b", sqrt_kl=0.0)
  outcomes = {scaling.outcome_key(r): table[i] for i, r in enumerate(rows)}
  outcomes[scaling.outcome_key(sft)] = (u < 0.17).astype(float)
  result = intervals_lib.paired_peak_test(rows, outcomes, sft, seed=0)
  assert result["rises"] and result["falls"]
  assert 0.8 < result["peak_sqrt_kl"] < 2.0 and result["num_test_prompts"] == 300
  assert result["vs_sft"]["diff"] > 0 and result["vs_sft"]["p_value"] < 1e-6
  # Every checkpoint as good as SFT, outcomes independent: the best-looking checkpoint of one
  # half is no better on the other half.
  flat = (rng.uniform(size=table.shape) < 0.3).astype(float)
  outcomes = {scaling.outcome_key(r): flat[i] for i, r in enumerate(rows)}
  outcomes[scaling.outcome_key(sft)] = (rng.uniform(size=num_prompts) < 0.3).astype(float)
  result = intervals_lib.paired_peak_test(rows, outcomes, sft, seed=0)
  assert not result["rises"] and result["vs_sft"]["p_value"] > 0.05
  assert intervals_lib.paired_peak_test(rows, {}, sft) is None  # no per-prompt outcomes


def test_report_says_which_reference_and_flags_truncated_checkpoints(tmp_path):
  path = tmp_path / "summary.csv"
  path.write_text("objective,size,beta,step,kl,win_rate,truncation_rate,reference,run\n"
                  "dpo,1b,0.1,10,0.5,0.3,0.01,chosen,a\n"
                  "dpo,1b,0.1,20,4.0,0.2,0.40,chosen,a\n")
  rows = scaling.load_summary(str(path))
  text = open(report_lib.write_report(rows, intervals_lib.fit_all(rows), {},
                                      str(tmp_path / "report.md"))).read()
  assert "judged against the chosen response of each prompt's first pair" in text
  assert "**Truncated samples**: 1 checkpoints have more than 5%" in text
  assert "worst 40%: dpo 1b β=0.1, step 20" in text


def test_fit_group_three_distinct_points_not_identifiable():
  # Six rows at three √KL values: fitting three coefficients would draw an exact U.
  d = np.array([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
  y = np.array([0.5, 0.52, 0.7, 0.68, 0.55, 0.57])
  out = scaling.fit_group(d, y)
  assert out["skipped"] == "not identifiable: 3 distinct sqrt(KL) points; need at least 4"
  assert "log" not in out


def test_paired_peak_test_refuses_unequal_prompt_counts(tmp_path):
  # One checkpoint evaluated on fewer prompts: no silent misalignment and no numpy crash,
  # one paragraph naming the checkpoint, both counts and the fix.
  d = np.linspace(0.2, 3.5, 4)
  rows = _group_rows(tmp_path, d, np.full(4, 0.3), np.full(4, 0.25), np.full(4, 0.35))
  outcomes = {scaling.outcome_key(r): np.zeros(10) for r in rows}
  short = scaling.outcome_key(rows[2])
  outcomes[short] = np.zeros(7)
  with pytest.raises(DataError) as err:
    intervals_lib.paired_peak_test(rows, outcomes, None, seed=0)
  text = str(err.value)
  assert str(short) in text and "7" in text and "10" in text and "num_prompts" in text
  assert "\n" not in text


def test_fit_rmse_uses_the_fit_weights():
  # The forms are compared by the same weights they are fitted with: weighted RMSE in closed
  # form, sqrt(sum w r^2 / sum w).
  d = np.linspace(0.2, 3.0, 9)
  y = _law("log", d, 0.2, 0.3, 0.2) + np.array([0, .02, -.01, .05, 0, -.03, .01, 0, .02])
  w = np.linspace(1.0, 9.0, 9)
  for form in scaling.FORMS:
    fit = scaling.fit_form(form, d, y, None, w)
    resid = scaling.predict(form, fit["coef"], d) - y
    assert fit["rmse"] == pytest.approx(math.sqrt(np.sum(w * resid ** 2) / np.sum(w)),
                                        rel=1e-12)


def test_bootstrap_form_comparison_uses_the_fit_weights():
  # Twelve precise points on a log law, three near-weightless ones placed on the best-of-n
  # fit's extrapolation. Weighted (as the fits are), the log form fits the points that count
  # exactly and beats best-of-n in every replicate; unweighted, the three outliers would
  # decide the comparison for best-of-n whenever a replicate draws one.
  d_hi = np.linspace(0.3, 2.0, 12)
  y_hi = _law("log", d_hi, 0.2, 0.3, 0.2)
  bon = scaling.fit_form("bon", d_hi, y_hi)["coef"]
  d_lo = np.array([3.0, 3.5, 4.0])
  d = np.concatenate([d_hi, d_lo])
  y = np.concatenate([y_hi, scaling.predict("bon", bon, d_lo)])
  w = np.concatenate([np.ones(12), np.full(3, 1e-9)])
  assert (scaling.fit_form("log", d, y, None, w)["rmse"]
          < scaling.fit_form("bon", d, y, None, w)["rmse"])
  boot = intervals_lib.bootstrap_group(d, y, None, weights=w, num_samples=300, seed=0)
  assert boot["log_beats_bon"] == 1.0
