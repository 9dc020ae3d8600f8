"""study/compare.py: the paired test at matched KL covers a known difference, bins pair only
checkpoints at the same KL, unfitted objectives are named; the sweep's grids and variants."""

import numpy as np
import pytest

from daa_jax.study import compare
from daa_jax.study import fits as fits_lib
from daa_jax.study import sweep
from daa_jax.train import config as config_lib


def _rows(objective, ds, run="r"):
  return [dict(objective=objective, size="tiny2", beta=0.1, step=10 * (i + 1), sqrt_kl=d,
               win_rate=0.3, run=f"{objective}_{run}", epoch_fraction=float(i)) for i, d in
          enumerate(ds)]


def _outcomes(rows, probs, rng, base):
  """Per-prompt outcomes: a shared prompt difficulty `base` [P] plus the row's shift."""
  return {fits_lib.outcome_key(r): (rng.random(base.size) < np.clip(base + p, 0, 1)).astype(float)
          for r, p in zip(rows, probs)}


def test_matched_kl_interval_covers_the_true_difference():
  rng = np.random.default_rng(0)
  a, b = _rows("ipo", [0.3, 0.8, 1.3, 2.6]), _rows("dpo", [0.2, 0.7, 1.4, 1.6])
  # True shift of a over b: −0.05 in every bin. Bins of 0.5: [0, .5), [.5, 1), [1, 1.5) are
  # shared; a's 2.6 and b's 1.6 have no partner and must not enter.
  truth, hits, n = -0.05, 0, 300
  for _ in range(n):
    base = rng.uniform(0.2, 0.6, 400)
    outcomes = {**_outcomes(a, [truth, truth, truth, 0.5], rng, base),
                **_outcomes(b, [0.0, 0.0, 0.0, 0.0], rng, base)}
    test = compare.matched_kl_test(a, b, outcomes, bin_width=0.5)
    hits += test["ci95"][0] <= truth <= test["ci95"][1]
  assert test["bins"] == [[0.0, 0.5], [0.5, 1.0], [1.0, 1.5]]
  assert 0.92 <= hits / n <= 0.98, hits / n  # nominal 95%, 300 replicates (±0.025)


def test_no_shared_bin_or_unpairable_prompts_give_no_test():
  rng = np.random.default_rng(1)
  a, b = _rows("ipo", [0.1]), _rows("dpo", [2.0])
  outcomes = {**_outcomes(a, [0], rng, np.full(50, 0.5)), **_outcomes(b, [0], rng, np.full(50, 0.5))}
  assert compare.matched_kl_test(a, b, outcomes) is None
  b = _rows("dpo", [0.2])
  outcomes[fits_lib.outcome_key(b[0])] = np.zeros(40)  # judged on other prompts
  assert compare.matched_kl_test(a, b, outcomes) is None


def test_an_objective_without_a_fit_is_named_with_the_reason():
  rows = _rows("dpo", [0.5, 1.0, 1.5, 2.0]) + _rows("simpo", [0.5, 1.0])
  fits = {"groups": [
      {"objective": "dpo", "size": "tiny2", "set": "all", "x": "sqrt_kl", "skipped": None,
       "log": {"coef": {"r0": 0.2, "alpha": 0.1, "beta": 0.1}, "peak_win_rate": 0.3,
               "peak_win_rate_ci": [0.28, 0.32], "d_star": 1.0, "d_star_ci": [0.9, 1.1],
               "alpha_ci": [0.05, 0.15], "beta_ci": [0.05, 0.15], "d_star_status": "estimated"}},
      {"objective": "simpo", "size": "tiny2", "set": "all", "x": "sqrt_kl",
       "skipped": "not identifiable: 2 distinct sqrt(KL) points; need at least 4"}]}
  result = compare.compare(rows, fits, None)
  by = {e["objective"]: e for e in result["objectives"]}
  assert by["simpo"]["fit"].startswith("not fitted: not identifiable")
  lines = compare.table_lines(result)
  assert any(line.startswith("| simpo | tiny2 | 2 | not fitted: not identifiable") for line in lines)
  assert any(line.startswith("| dpo | tiny2 | 4 | 0.300 [0.280, 0.320] | 1.00 [0.90, 1.10]")
             for line in lines)


def test_regularizer_study_expands_grids_and_variants():
  c = config_lib.load_sibling(__file__.replace("tests/study/test_compare.py", "configs/x.py"),
                              "regularizers", "quick=True")
  config_lib.validate(c)
  runs = [r for r in sweep.expand(c, "/tmp/reg") if r["kind"] == "daa"]
  assert len(runs) == 14 and {r["objective"] for r in runs} == set(c.objectives)
  by = {r["name"]: r["config"].objective for r in runs}
  assert by["simpo_tiny2_b10"].name == "simpo" and by["simpo_tiny2_b10"].normalize == "mean"
  tr = by["tr_dpo_tiny2_b0p1"]
  assert (tr.name, tr.reference, tr.ref_update, tr.ref_update_every) == ("dpo", "live", "soft", 31)
  assert by["dpo_tiny2_b0p1"].reference == "cached" and by["dpo_tiny2_b0p1"].ref_update == "none"
  for r in runs:
    config_lib.validate(r["config"])
  with pytest.raises(config_lib.ConfigError, match="tr_dpx"):
    bad = c.unlocked()
    with bad:
      c.objectives = ("dpo", "tr_dpx")
    config_lib.validate(c)
