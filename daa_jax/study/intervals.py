"""The fits of every group with their bootstrap intervals (`fit_all`), and the paired peak test."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence
from absl import logging
import numpy as np
from daa_jax.errors import DataError
from daa_jax.study import fits as fits_lib
from daa_jax.train import metrics as metrics_lib


def _resolve_r0(r0, rows, size) -> tuple[float | None, str, list]:
  """(R0 or None to fit it, its source, the reference rows it was measured on)."""
  if r0 is None or r0 == "fit":
    return None, "fitted", []
  if isinstance(r0, str) and r0 == "sft":
    ref = [r for r in rows if fits_lib.is_reference(r) and r["size"] == size
           and not math.isnan(r["win_rate"])]
    if not ref:
      return None, "fitted (no sft row for this size)", []
    return float(np.mean([r["win_rate"] for r in ref])), "sft rows", ref
  if isinstance(r0, Mapping):
    return (None, "fitted", []) if r0.get(size) is None else (float(r0[size]), "given", [])
  return float(r0), "given", []


def _r0_noise(ref_rows, outcomes, num_prompts):
  """What the bootstrap needs to resample an R0 measured on `ref_rows` (the SFT rows):
  ([R, P] their per-prompt outcomes or None, σ of their mean win rate or None)."""
  if not ref_rows:
    return None, None
  keys = [fits_lib.outcome_key(r) for r in ref_rows]
  if (outcomes is not None and num_prompts is not None and all(k in outcomes for k in keys)
      and all(len(outcomes[k]) == num_prompts for k in keys)):
    return np.stack([outcomes[k] for k in keys]), None
  sigma = fits_lib.point_sigmas(ref_rows)
  # A mean of R independent measurements: σ/√R.
  return None, (None if sigma is None else float(np.sqrt(np.sum(sigma**2)) / len(sigma)))


def _percentile_ci(values, confidence: float = 0.95) -> list[float] | None:
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
  if v.size < 10:
    return None
  a = (1 - confidence) / 2
  return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def bootstrap_group(d, win_rate, r0: float | None, weights=None, outcomes=None, sigmas=None,
                    num_samples: int = 1000, seed: int = 0, r0_outcomes=None,
                    r0_sigma: float | None = None) -> dict[str, Any]:
  """Percentile intervals of every form's coefficients, d* and peak win rate.

  With per-prompt `outcomes`, each replicate resamples the prompts (with replacement) and
  recomputes every checkpoint's win rate on them: the checkpoints were judged on the same
  prompts, so one prompt resample moves them together and keeps their correlation. The
  checkpoints themselves are not resampled then: their √KL are the design, and their win-rate
  noise is the prompts'; resampling both counts that noise twice (in the simulation of
  tests/study/test_coverage.py the d* interval then covers 0.995 instead of 0.95). Without
  outcomes each replicate resamples the checkpoints and gives each resampled win rate
  Gaussian noise of its own σ (`sigmas`), if given.

  A given R0 that was itself measured (the SFT policy's win rate) is resampled with the rest:
  with `r0_outcomes`, as the mean of the SFT rows on the replicate's prompts (the same prompts
  as the checkpoints'); else with Gaussian noise of `r0_sigma`. Holding a measured R0 fixed
  would leave its error out of every interval.

  Args:
    d: [N] √KL. win_rate: [N]. r0: fixed offset or None (fitted).
    weights: [N] or None (as `fit_form`).
    outcomes: [N, P] per-prompt mean outcomes of the N checkpoints, or None.
    sigmas: [N] σ of each win rate (`point_sigmas`), used only without outcomes.
    num_samples: bootstrap replicates. seed: of the resampling.
    r0_outcomes: [R, P] or [P] per-prompt outcomes R0 was measured on (needs `outcomes`,
      with the same P), or None.
    r0_sigma: σ of a measured R0, used without `r0_outcomes`; None: R0 is exact.

  Returns:
    {form: {'alpha_ci', 'beta_ci' (quadratic: 'c1_ci', 'c2_ci'), 'd_star_ci',
    'peak_win_rate_ci', 'peak_frac' (share of replicates with a maximum)}, 'num_samples',
    'method', 'log_beats_bon' (share of replicates where the log form's RMSE, weighted by
    `weights` as in `fit_form`, is below the best-of-n form's), 'log_beats_quadratic'}.
  """
  d = np.asarray(d, dtype=np.float64)
  y = np.asarray(win_rate, dtype=np.float64)
  n = len(d)
  rng = np.random.default_rng(seed)
  n_free = 3 if r0 is None else 2
  if outcomes is not None:
    rows = np.tile(np.arange(n), (num_samples, 1))  # [S, N] every checkpoint, every time
  else:
    rows = rng.integers(0, n, (num_samples, n))  # [S, N] resampled checkpoints
  if outcomes is not None:
    prompts = rng.integers(0, outcomes.shape[1], (num_samples, outcomes.shape[1]))
    # [S, N]: checkpoint rows[s, i]'s mean outcome on the prompts of replicate s.
    yb = np.take_along_axis(outcomes[rows], prompts[:, None, :], axis=2).mean(axis=2)
  else:
    yb = y[rows]
    if sigmas is not None:
      yb = yb + rng.normal(0.0, 1.0, yb.shape) * np.asarray(sigmas)[rows]
  r0b = None if r0 is None else np.full(num_samples, float(r0))  # [S]
  if r0 is not None and r0_outcomes is not None and outcomes is not None:
    ref = np.atleast_2d(np.asarray(r0_outcomes, np.float64))  # [R, P]
    r0b = ref[:, prompts].mean(axis=2).mean(axis=0)
  elif r0 is not None and r0_sigma:
    r0b = r0b + rng.normal(0.0, float(r0_sigma), num_samples)
  db = d[rows]
  keep = np.array([len(np.unique(r)) >= n_free + 1 for r in db])  # a full-rank design
  db, yb = db[keep], yb[keep]
  r0b = None if r0b is None else r0b[keep]
  wb = np.ones_like(db) if weights is None else np.asarray(weights, np.float64)[rows][keep]
  draws: dict[str, dict[str, list]] = {}
  rmse = {}
  for form in fits_lib.FORMS:
    x = fits_lib.features(form, db.reshape(-1)).reshape(db.shape + (2,))  # [S, N, 2]
    if r0 is None:
      x = np.concatenate([np.ones(db.shape + (1,)), x], axis=2)
      target = yb
    else:
      target = yb - r0b[:, None]
    root = np.sqrt(wb)[..., None]
    sol = np.linalg.pinv(x * root) @ (target * root[..., 0])[..., None]  # [S, k, 1]
    sol = sol[..., 0]
    # Weighted as the fits and `fit_form`'s RMSE are: an unweighted comparison would rank the
    # forms by the noisy points the fits chose to discount.
    resid = np.einsum("snk,sk->sn", x, sol) - target
    rmse[form] = np.sqrt(np.sum(wb * resid**2, axis=1) / np.sum(wb, axis=1))
    names = ("c1", "c2") if form == "quadratic" else ("alpha", "beta")
    offset = sol[:, 0] if r0 is None else r0b
    c = sol[:, -2:]
    bucket = draws[form] = {names[0]: list(c[:, 0]), names[1]: list(c[:, 1]),
                            "d_star": [], "peak_win_rate": []}
    for r, (c1, c2) in zip(offset, c):
      d_star, r_star, _ = fits_lib.peak(form, {"r0": r, names[0]: c1, names[1]: c2})
      bucket["d_star"].append(d_star)
      bucket["peak_win_rate"].append(r_star)
  beats = {other: list(rmse["log"] < rmse[other]) for other in ("bon", "quadratic")}
  method = ("prompts" if outcomes is not None else
            "checkpoints and interval noise" if sigmas is not None else "checkpoints")
  out: dict[str, Any] = {"num_samples": len(beats["bon"]), "method": method}
  for form, bucket in draws.items():
    out[form] = {f"{k}_ci": _percentile_ci(v) for k, v in bucket.items()}
    if out[form]["peak_win_rate_ci"] is not None:  # a win rate lies in [0, 1]
      out[form]["peak_win_rate_ci"] = [min(max(v, 0.0), 1.0)
                                       for v in out[form]["peak_win_rate_ci"]]
    peaks = bucket.get("d_star", [])
    out[form]["peak_frac"] = (float(np.mean([p is not None for p in peaks])) if peaks
                              else None)
  out["log_beats_bon"] = float(np.mean(beats["bon"])) if beats["bon"] else None
  out["log_beats_quadratic"] = float(np.mean(beats["quadratic"])) if beats["bon"] else None
  return out


def fit_all(rows: Sequence[Mapping[str, Any]], r0=None, outcomes=None, weighted: bool = True,
            num_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Fits every (objective, size) group on final and on all checkpoints, for √KL and √fwd-KL.

  Args:
    rows: from `load_summary`.
    r0: the offset R(0): None or 'fit' fits it per group; a float fixes it everywhere (0.0
      gives the paper's literal d(α − β ln d)); {size: float} fixes it per model size; 'sft'
      takes the mean win rate of the rows whose objective is 'sft' (or 'reference') of the
      same size, falling back to fitting.
    outcomes: {outcome_key(row): [P] per-prompt outcomes} (`load_prompt_outcomes`) or None:
      with them the bootstrap resamples prompts as well as checkpoints.
    weighted: weight each point by 1/σ² of its win rate (from win_rate_lo/hi) when every
      point of the group has an interval.
    num_bootstrap: replicates of the intervals (0: none).
    seed: of the bootstrap.

  Returns:
    JSON-serializable dict: forms, r0_mode, groups and forward_kl_groups. Each group: objective,
    size, set ('final' | 'all'), x ('sqrt_kl' | 'sqrt_forward_kl'), n, r0_source, skipped
    (None or the reason), weighted and, when fitted, d_range, log / bon / quadratic (see
    `fit_form`; each with alpha_ci, beta_ci (quadratic: c1_ci, c2_ci), d_star_ci,
    peak_win_rate_ci as [lo, hi] 95% bootstrap intervals, or None), bootstrap (method,
    num_samples, log_beats_bon, log_beats_quadratic), rmse_ratio (log RMSE / quadratic RMSE)
    and rmse_ratio_bon.
  """
  out: dict[str, Any] = {"forms": dict(fits_lib.FORMS), "r0_mode": r0 if isinstance(r0, (str, type(None)))
                         else ("per size" if isinstance(r0, Mapping) else float(r0)),
                         "groups": [], "forward_kl_groups": []}
  for x_col, key in (("sqrt_kl", "groups"), ("forward_kl", "forward_kl_groups")):
    for (objective, size), group_rows in fits_lib.by_group(rows).items():
      for set_name, subset in (("final", fits_lib.final_rows(group_rows)), ("all", group_rows)):
        x = np.array([r[x_col] for r in subset], dtype=np.float64)
        if x_col == "forward_kl":
          x = np.sqrt(np.maximum(x, 0.0))
        y = np.array([r["win_rate"] for r in subset], dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if x_col == "forward_kl" and not ok.any():
          continue  # the sweep measured no forward KL: nothing to report
        kept = [r for r, k in zip(subset, ok) if k]
        weights = fits_lib.point_weights(kept) if weighted else None
        group_r0, source, ref_rows = _resolve_r0(r0, rows, size)
        result = fits_lib.fit_group(x[ok], y[ok], group_r0, weights)
        entry = {"objective": objective, "size": size, "set": set_name,
                 "x": "sqrt_kl" if x_col == "sqrt_kl" else "sqrt_forward_kl",
                 "r0_source": source, **result}
        if entry["skipped"]:  # info, not a warning: the report's fit table lists it
          logging.info("scaling fit %s/%s/%s/%s skipped: %s", objective, size, set_name,
                       entry["x"], entry["skipped"])
        elif num_bootstrap:
          per_prompt = None
          if outcomes is not None and all(fits_lib.outcome_key(r) in outcomes for r in kept):
            arrays = [outcomes[fits_lib.outcome_key(r)] for r in kept]
            if len({a.shape for a in arrays}) == 1:
              per_prompt = np.stack(arrays)
          r0_outcomes, r0_sigma = _r0_noise(
              ref_rows, outcomes, None if per_prompt is None else per_prompt.shape[1])
          boot = bootstrap_group(x[ok], y[ok], group_r0, weights, per_prompt,
                                 fits_lib.point_sigmas(kept), num_samples=num_bootstrap,
                                 seed=seed, r0_outcomes=r0_outcomes, r0_sigma=r0_sigma)
          for form in fits_lib.FORMS:
            entry[form].update(boot.pop(form))
          entry["bootstrap"] = boot
        out[key].append(entry)
  return metrics_lib.jsonable(out)


def _paired(diff: np.ndarray) -> dict[str, float]:
  """Mean of per-prompt differences, its standard error, and the one-sided p-value of
  mean ≤ 0 (normal approximation: a mean over hundreds of prompts)."""
  n = diff.size
  mean = float(diff.mean())
  se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
  if not se > 0:
    p = 0.0 if mean > 0 else 1.0
  else:
    p = 0.5 * math.erfc(mean / se / math.sqrt(2))  # 1 − Φ(mean/se)
  return {"diff": mean, "stderr": se, "p_value": p, "lo95": mean - 1.644854 * se}


def paired_peak_test(group_rows, outcomes: Mapping[str, np.ndarray], sft_row=None,
                     seed: int = 0) -> dict[str, Any] | None:
  """Does the win rate rise then fall? Paired tests on split halves of the prompts.

  Every checkpoint is judged on the same prompts, so checkpoints compare prompt by prompt
  (paired), not by overlapping intervals. Taking the best of ~20 noisy checkpoints and
  testing it on the same prompts would be biased upward: the peak is chosen on one random
  half of the prompts (`seed`) and tested on the other half, against the SFT policy (rises)
  and against the largest-KL checkpoint (falls).

  Args:
    group_rows: one (objective, size)'s checkpoint rows (with sqrt_kl, run, step).
    outcomes: {outcome_key(row): [P] per-prompt mean outcome}.
    sft_row: the reference policy's row of this size, or None.
    seed: of the split.

  Returns:
    None without per-prompt outcomes for every row; else {'peak': key, 'peak_sqrt_kl',
    'peak_win_rate_test' (on the test half), 'largest_kl': key, 'num_test_prompts',
    'vs_sft' and 'vs_largest_kl' ({'diff', 'stderr', 'p_value', 'lo95'}: the peak minus the
    other on the test half; p one-sided), 'rises' and 'falls' (p < 0.05)}.

  Raises:
    DataError: the checkpoints (or the SFT row) were judged on different numbers of prompts.
  """
  rows = [r for r in group_rows if math.isfinite(r.get("sqrt_kl", math.nan))]
  keys = [fits_lib.outcome_key(r) for r in rows]
  if not rows or any(k not in outcomes for k in keys):
    return None
  if sft_row is not None and fits_lib.outcome_key(sft_row) not in outcomes:
    sft_row = None
  # The per-prompt arrays carry no prompt ids, so a checkpoint judged on fewer prompts cannot
  # be aligned with the others: pairing by position would compare different prompts.
  counts = {k: len(outcomes[k]) for k in keys + ([fits_lib.outcome_key(sft_row)] if sft_row else [])}
  if len(set(counts.values())) > 1:
    common = max(set(counts.values()), key=list(counts.values()).count)
    odd = ", ".join(f"{k} ({n} prompts)" for k, n in counts.items() if n != common)
    raise DataError(
        f"paired peak test: the checkpoints of this group were judged on different prompt "
        f"sets: {odd}, the others on {common} prompts; per-prompt outcomes carry no prompt "
        f"ids, so they cannot be paired. Re-evaluate those checkpoints with the same "
        f"evaluation num_prompts and prompt file as the rest of the sweep.")
  table = np.stack([outcomes[k] for k in keys])  # [C, P]
  num_prompts = table.shape[1]
  order = np.random.default_rng(seed).permutation(num_prompts)
  pick, test = order[:num_prompts // 2], order[num_prompts // 2:]
  best = int(np.argmax(table[:, pick].mean(axis=1)))
  far = int(np.argmax([r["sqrt_kl"] for r in rows]))
  out: dict[str, Any] = {
      "peak": keys[best], "peak_sqrt_kl": rows[best]["sqrt_kl"],
      "peak_win_rate_test": float(table[best, test].mean()), "largest_kl": keys[far],
      "largest_kl_sqrt_kl": rows[far]["sqrt_kl"], "num_test_prompts": int(test.size),
      "split_seed": int(seed)}
  out["vs_largest_kl"] = (None if far == best else
                          _paired(table[best, test] - table[far, test]))
  out["vs_sft"] = (None if sft_row is None else
                   _paired(table[best, test] - outcomes[fits_lib.outcome_key(sft_row)][test]))
  out["rises"] = bool(out["vs_sft"] and out["vs_sft"]["p_value"] < 0.05)
  out["falls"] = bool(out["vs_largest_kl"] and out["vs_largest_kl"]["p_value"] < 0.05)
  return out
