"""Scaling-law fits of win rate against KL (numpy/scipy; figures and report: report.py).

With d = √KL(πθ‖π_ref) (sequence-level, from policy samples) and R the win rate against the
reference summaries, three forms are fitted by exact linear least squares (each is linear in
its coefficients):

  log       R(d) = R0 + d(α − β ln d)      Gao et al. 2023's RL form, the paper's law
  bon       R(d) = R0 + d(α − β d)         Gao et al. 2023's best-of-n form
  quadratic R(KL) = R0 + c1·KL + c2·KL²    the paper's baseline, "a quadratic fit in KL"

α, β here are the law's coefficients, not the DAA's β. The paper writes R(d) = d(α − β ln d);
its Gao et al. origin fits the gold-reward *gain* over the initial policy. A win rate at d = 0 is
the SFT policy's win rate, not 0, so every form carries the offset R0: fitted (default; all
three forms then have 3 coefficients), or given (the SFT win rate of the sweep; then 2), and
the same way for all three forms so that their RMSEs compare at equal parameter counts.
Pass r0=0.0 for the paper's literal form.

Peaks: log: dR/dd = α − β ln d − β = 0 ⇒ d* = exp(α/β − 1), R* = R0 + β d* (a maximum iff
β > 0). bon: d* = α/(2β), R* = R0 + α²/(4β). quadratic: KL* = −c1/(2 c2) (c2 < 0).

Fits run per (objective, size), once on each run's final checkpoint and once on all
checkpoints, against √KL and against √forward-KL (KL(π_ref‖πθ)).

Uncertainty: each point is weighted by 1/σ² of its win rate (σ from its 95% interval), and
every fit gets percentile bootstrap intervals of its coefficients, d* and peak win rate
(`bootstrap_group`: checkpoints resampled and, with per-prompt outcomes, prompts too — every
checkpoint is judged on the same prompts, so one prompt resample moves them together). Whether
the win rate rises then falls is a paired test on split halves of the prompts
(`paired_peak_test`), not a comparison of overlapping intervals around the maximum of ~20
noisy points.

Figures and report.md: `daa_jax.report`. Command line (no JAX needed or imported):
  python -m daa_jax.scaling SWEEP_DIR [--r0 fit|sft|0.17] [--out DIR]
reads SWEEP_DIR/summary.csv (and prompt_outcomes.json when present) and writes fits.json,
figures/*.png|pdf and report.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from daa_jax.errors import DataError

NUMERIC_COLUMNS = ("beta", "step", "epoch_fraction", "kl", "sqrt_kl", "forward_kl", "win_rate",
                   "win_rate_lo", "win_rate_hi", "reward_acc", "heldout_loss", "length_r2",
                   "chosen_logp_drift", "truncation_rate", "num_seeds", "seed_win_rate_lo",
                   "seed_win_rate_hi", "seed_kl_lo", "seed_kl_hi")
_MISSING = ("", "nan", "na", "n/a", "none", "null")
# Rows of the reference policy itself: a source of R0, never a fitted group.
REFERENCE_OBJECTIVES = ("sft", "reference", "ref")
FORMS = {
    "log": "R = R0 + d(alpha - beta ln d)",
    "bon": "R = R0 + d(alpha - beta d)",
    "quadratic": "R = R0 + c1 KL + c2 KL^2 (KL = d^2)",
}


# --- Reading --------------------------------------------------------------------------------


def load_summary(path: str) -> list[dict[str, Any]]:
  """Rows of a sweep's summary.csv; numeric columns as float (missing: nan).

  Needs the columns objective, win_rate and kl or sqrt_kl; other known columns may be absent
  or blank. sqrt_kl is filled from kl as √max(kl, 0) (a Monte-Carlo KL estimate can dip
  slightly below 0) and kl from sqrt_kl. Unknown columns are kept as strings.

  Raises:
    DataError: missing file or column, or a non-numeric value in a numeric column.
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file; a sweep writes summary.csv when its runs finish.")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in ("objective", "win_rate") if c not in header]
    if missing or not {"kl", "sqrt_kl"} & set(header):
      raise DataError(f"{path}: header {header} lacks {missing or ['kl or sqrt_kl']}; "
                      "write summary.csv with the sweep (daa_jax.sweep).")
    rows = []
    for raw in reader:
      row: dict[str, Any] = {k: (v or "").strip() for k, v in raw.items() if k is not None}
      row.setdefault("size", "")
      for col in NUMERIC_COLUMNS:
        value = row.get(col, "")
        try:
          row[col] = math.nan if value.lower() in _MISSING else float(value)
        except ValueError:
          raise DataError(f"{path}:{reader.line_num}: column {col}={value!r} is not a number; "
                          "fix or blank that cell.") from None
      if math.isnan(row["sqrt_kl"]) and not math.isnan(row["kl"]):
        row["sqrt_kl"] = math.sqrt(max(row["kl"], 0.0))
      if math.isnan(row["kl"]) and not math.isnan(row["sqrt_kl"]):
        row["kl"] = row["sqrt_kl"] ** 2
      rows.append(row)
  return rows


# --- Fitting --------------------------------------------------------------------------------


def _features(form: str, d: np.ndarray) -> np.ndarray:
  """[N, 2] regressors of the non-offset coefficients."""
  if form == "log":
    with np.errstate(divide="ignore", invalid="ignore"):
      dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # d ln d → 0 at d = 0
    return np.stack([d, -dlogd], axis=1)
  if form == "bon":
    return np.stack([d, -d * d], axis=1)
  if form == "quadratic":
    return np.stack([d**2, d**4], axis=1)
  raise ValueError(f"unknown form {form!r}; use one of {sorted(FORMS)}")


def predict(form: str, coef: Mapping[str, float], d) -> np.ndarray:
  """R at d = √KL for a fitted form's coefficients (`fit_form(...)['coef']`)."""
  d = np.asarray(d, dtype=np.float64)
  names = ("c1", "c2") if form == "quadratic" else ("alpha", "beta")
  return coef["r0"] + _features(form, d.reshape(-1)) @ np.array([coef[n] for n in names])


def peak(form: str, coef: Mapping[str, float]) -> tuple[float | None, float | None, str | None]:
  """(d*, R(d*), note): the predicted maximum, or Nones and why there is none."""
  r0 = coef["r0"]
  if form == "log":
    a, b = coef["alpha"], coef["beta"]
    if b <= 0:
      return None, None, "no interior maximum (beta <= 0)"
    if a / b - 1 > 700:  # exp overflows float64
      return None, None, "peak beyond float range"
    d_star = math.exp(a / b - 1)
    return d_star, r0 + b * d_star, None
  if form == "bon":
    a, b = coef["alpha"], coef["beta"]
    if b <= 0 or a <= 0:
      return None, None, "no maximum at d > 0 (need alpha > 0, beta > 0)"
    return a / (2 * b), r0 + a * a / (4 * b), None
  c1, c2 = coef["c1"], coef["c2"]
  if c2 >= 0 or c1 <= 0:
    return None, None, "no maximum at KL > 0 (need c1 > 0, c2 < 0)"
  kl_star = -c1 / (2 * c2)
  return math.sqrt(kl_star), r0 - c1 * c1 / (4 * c2), None


def fit_form(form: str, d, win_rate, r0: float | None = None, weights=None) -> dict[str, Any]:
  """(Weighted) least-squares fit of one form.

  Args:
    form: 'log', 'bon' or 'quadratic'.
    d: [N] √KL.
    win_rate: [N] win rates.
    r0: the offset R(0); None fits it.
    weights: [N] or None: each squared residual's weight (1/σ² of the point's win rate).

  Returns:
    dict with coef ({'r0', 'alpha', 'beta'} or {'r0', 'c1', 'c2'}), rmse (root mean squared
    residual, weighted by `weights` when given), d_star, peak_win_rate, peak_note, peak_in_range, n, rank. A rank-deficient
    design does not raise: `rank` below the number of free coefficients reports it.
  """
  d = np.asarray(d, dtype=np.float64)
  y = np.asarray(win_rate, dtype=np.float64)
  x = _features(form, d)
  if r0 is None:
    x = np.concatenate([np.ones((len(d), 1)), x], axis=1)
    target = y
  else:
    target = y - r0
  if weights is not None:
    root = np.sqrt(np.asarray(weights, dtype=np.float64))
    x, target = x * root[:, None], target * root
  sol, _, rank, _ = np.linalg.lstsq(x, target, rcond=None)
  if r0 is None:
    r0_fit, c = float(sol[0]), sol[1:]
  else:
    r0_fit, c = float(r0), sol
  names = ("c1", "c2") if form == "quadratic" else ("alpha", "beta")
  coef = {"r0": r0_fit, names[0]: float(c[0]), names[1]: float(c[1])}
  # The forms are compared by the same weights they were fitted with: an unweighted RMSE
  # would rank them by the noisy points the fit chose to discount.
  w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
  rmse = float(np.sqrt(np.sum(w * (predict(form, coef, d) - y) ** 2) / np.sum(w)))
  d_star, r_star, note = peak(form, coef)
  return dict(coef=coef, rmse=rmse, d_star=d_star, peak_win_rate=r_star, peak_note=note,
              peak_in_range=(d_star is not None and d.min() <= d_star <= d.max()),
              n=int(len(d)), rank=int(rank))


# Fewest distinct √KL values a group needs before a curve is fitted and drawn.
MIN_DISTINCT_D = 4


def fit_group(d, win_rate, r0: float | None = None, weights=None) -> dict[str, Any]:
  """All three forms on one group's points, or `{'skipped': reason}` when they cannot be fitted.

  A group needs one more point than free coefficients (so an RMSE means something) and enough
  distinct d values for a full-rank design.
  """
  d = np.asarray(d, dtype=np.float64)
  y = np.asarray(win_rate, dtype=np.float64)
  n_free = 3 if r0 is None else 2
  out: dict[str, Any] = {"n": int(len(d)), "skipped": None, "weighted": weights is not None}
  if len(d) < n_free + 1:
    out["skipped"] = f"{len(d)} points; need at least {n_free + 1} for {n_free} coefficients"
    return out
  # Three distinct points pin any 3-coefficient curve exactly (a U through them): no fit.
  # A given R0 is itself a point at d = 0, so it counts.
  n_distinct = len(np.unique(d))
  if n_distinct + (r0 is not None) < MIN_DISTINCT_D:
    out["skipped"] = (f"not identifiable: {n_distinct} distinct sqrt(KL) points; "
                      f"need at least {MIN_DISTINCT_D}")
    return out
  out["d_range"] = [float(d.min()), float(d.max())]
  for form in FORMS:
    result = fit_form(form, d, y, r0, weights)
    if result["rank"] < n_free:
      out = {"n": int(len(d)), "skipped": f"degenerate: {len(np.unique(d))} distinct d values"}
      return out
    out[form] = result
  quad = out["quadratic"]["rmse"]
  out["rmse_ratio"] = out["log"]["rmse"] / quad if quad > 0 else None
  out["rmse_ratio_bon"] = out["bon"]["rmse"] / quad if quad > 0 else None
  return out


def size_key(size: str):
  m = re.fullmatch(r"(?i)\s*(?:pythia-?)?([\d.]+)\s*([kmbt]?)\s*", size or "")
  if not m:
    return (math.inf, size)
  scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
  return (float(m.group(1)) * scale, size)


def is_reference(row) -> bool:
  return row["objective"].lower() in REFERENCE_OBJECTIVES


def run_id(row) -> tuple:
  """A run is its `run` column when the sweep writes one (seeds, variants), else
  (objective, size, beta)."""
  if row.get("run"):
    return (row["run"],)
  return (row["objective"], row["size"], row["beta"] if not math.isnan(row["beta"]) else None)


def final_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """Each run's last checkpoint: the largest step (then epoch_fraction)."""
  best: dict[tuple, tuple] = {}
  for row in rows:
    run = run_id(row)
    order = tuple(-math.inf if math.isnan(row[c]) else row[c] for c in ("step", "epoch_fraction"))
    if run not in best or order >= best[run][0]:
      best[run] = (order, row)
  return [row for _, row in best.values()]


def by_group(rows):
  """{(objective, size): rows}, in objective then size order; reference rows left out."""
  groups: dict[tuple, list] = {}
  for row in rows:
    if not is_reference(row):
      groups.setdefault((row["objective"], row["size"]), []).append(row)
  return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], size_key(kv[0][1]))))


def _resolve_r0(r0, rows, size) -> tuple[float | None, str]:
  if r0 is None or r0 == "fit":
    return None, "fitted"
  if isinstance(r0, str) and r0 == "sft":
    ref = [r["win_rate"] for r in rows if is_reference(r) and r["size"] == size
           and not math.isnan(r["win_rate"])]
    if not ref:
      return None, "fitted (no sft row for this size)"
    return float(np.mean(ref)), "sft rows"
  if isinstance(r0, Mapping):
    return (None, "fitted") if r0.get(size) is None else (float(r0[size]), "given")
  return float(r0), "given"


def point_sigmas(rows) -> np.ndarray | None:
  """σ of each row's win rate, (win_rate_hi − win_rate_lo)/(2·1.96); None when a row lacks
  its interval. A zero-width interval (every outcome equal) takes the narrowest positive
  width of the group, so that no point gets an infinite weight."""
  lo = np.array([r.get("win_rate_lo", math.nan) for r in rows], dtype=np.float64)
  hi = np.array([r.get("win_rate_hi", math.nan) for r in rows], dtype=np.float64)
  width = hi - lo
  if not len(rows) or not np.all(np.isfinite(width)) or not np.any(width > 0):
    return None
  width = np.where(width > 0, width, width[width > 0].min())
  return width / (2 * 1.959964)


def point_weights(rows) -> np.ndarray | None:
  """1/σ² of each row's win rate (`point_sigmas`), normalized to mean 1; None without σ."""
  sigma = point_sigmas(rows)
  if sigma is None:
    return None
  w = 1.0 / sigma**2
  return w / w.mean()


def outcome_key(row) -> str:
  """Key of a checkpoint's per-prompt outcomes (`prompt_outcomes.json`): '<run>@<step>'."""
  return f"{row.get('run') or '/'.join(map(str, run_id(row)))}@{int(row['step'])}"


def load_prompt_outcomes(path: str) -> dict[str, np.ndarray] | None:
  """{outcome_key: [P] mean outcome per prompt} from a sweep's prompt_outcomes.json; None if
  the file does not exist."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  return {k: np.asarray(v, dtype=np.float64) for k, v in data.items()}


def _percentile_ci(values, confidence: float = 0.95) -> list[float] | None:
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
  if v.size < 10:
    return None
  a = (1 - confidence) / 2
  return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def bootstrap_group(d, win_rate, r0: float | None, weights=None, outcomes=None, sigmas=None,
                    num_samples: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Percentile intervals of every form's coefficients, d* and peak win rate.

  Each replicate resamples the checkpoints (with replacement) and, when `outcomes` is given,
  the prompts too: every checkpoint's win rate is recomputed on the same resampled prompts
  (they were judged on the same prompts, so the resampling keeps their correlation). Without
  outcomes each resampled win rate gets Gaussian noise of its own σ (`sigmas`), if given.

  Args:
    d: [N] √KL. win_rate: [N]. r0: fixed offset or None (fitted).
    weights: [N] or None (as `fit_form`).
    outcomes: [N, P] per-prompt mean outcomes of the N checkpoints, or None.
    sigmas: [N] σ of each win rate (`point_sigmas`), used only without outcomes.
    num_samples: bootstrap replicates. seed: of the resampling.

  Returns:
    {form: {'alpha_ci', 'beta_ci' (quadratic: 'c1_ci', 'c2_ci'), 'd_star_ci',
    'peak_win_rate_ci', 'peak_frac' (share of replicates with a maximum)}, 'num_samples',
    'method', 'log_beats_bon' (share of replicates where the log form's RMSE is below the
    best-of-n form's), 'log_beats_quadratic'}.
  """
  d = np.asarray(d, dtype=np.float64)
  y = np.asarray(win_rate, dtype=np.float64)
  n = len(d)
  rng = np.random.default_rng(seed)
  n_free = 3 if r0 is None else 2
  rows = rng.integers(0, n, (num_samples, n))  # [S, N] resampled checkpoints
  if outcomes is not None:
    prompts = rng.integers(0, outcomes.shape[1], (num_samples, outcomes.shape[1]))
    # [S, N]: checkpoint rows[s, i]'s mean outcome on the prompts of replicate s.
    yb = np.take_along_axis(outcomes[rows], prompts[:, None, :], axis=2).mean(axis=2)
  else:
    yb = y[rows]
    if sigmas is not None:
      yb = yb + rng.normal(0.0, 1.0, yb.shape) * np.asarray(sigmas)[rows]
  db = d[rows]
  keep = np.array([len(np.unique(r)) >= n_free + 1 for r in db])  # a full-rank design
  db, yb = db[keep], yb[keep]
  wb = np.ones_like(db) if weights is None else np.asarray(weights, np.float64)[rows][keep]
  draws: dict[str, dict[str, list]] = {}
  rmse = {}
  for form in FORMS:
    x = _features(form, db.reshape(-1)).reshape(db.shape + (2,))  # [S, N, 2]
    if r0 is None:
      x = np.concatenate([np.ones(db.shape + (1,)), x], axis=2)
      target = yb
    else:
      target = yb - r0
    root = np.sqrt(wb)[..., None]
    sol = np.linalg.pinv(x * root) @ (target * root[..., 0])[..., None]  # [S, k, 1]
    sol = sol[..., 0]
    rmse[form] = np.sqrt(np.mean((np.einsum("snk,sk->sn", x, sol) - target) ** 2, axis=1))
    names = ("c1", "c2") if form == "quadratic" else ("alpha", "beta")
    offset = sol[:, 0] if r0 is None else np.full(len(sol), float(r0))
    c = sol[:, -2:]
    bucket = draws[form] = {names[0]: list(c[:, 0]), names[1]: list(c[:, 1]),
                            "d_star": [], "peak_win_rate": []}
    for r, (c1, c2) in zip(offset, c):
      d_star, r_star, _ = peak(form, {"r0": r, names[0]: c1, names[1]: c2})
      bucket["d_star"].append(d_star)
      bucket["peak_win_rate"].append(r_star)
  beats = {other: list(rmse["log"] < rmse[other]) for other in ("bon", "quadratic")}
  method = ("checkpoints and prompts" if outcomes is not None else
            "checkpoints and interval noise" if sigmas is not None else "checkpoints")
  out: dict[str, Any] = {"num_samples": len(beats["bon"]), "method": method}
  for form, bucket in draws.items():
    out[form] = {f"{k}_ci": _percentile_ci(v) for k, v in bucket.items()}
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
  out: dict[str, Any] = {"forms": dict(FORMS), "r0_mode": r0 if isinstance(r0, (str, type(None)))
                         else ("per size" if isinstance(r0, Mapping) else float(r0)),
                         "groups": [], "forward_kl_groups": []}
  for x_col, key in (("sqrt_kl", "groups"), ("forward_kl", "forward_kl_groups")):
    for (objective, size), group_rows in by_group(rows).items():
      for set_name, subset in (("final", final_rows(group_rows)), ("all", group_rows)):
        x = np.array([r[x_col] for r in subset], dtype=np.float64)
        if x_col == "forward_kl":
          x = np.sqrt(np.maximum(x, 0.0))
        y = np.array([r["win_rate"] for r in subset], dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        if x_col == "forward_kl" and not ok.any():
          continue  # the sweep measured no forward KL: nothing to report
        kept = [r for r, k in zip(subset, ok) if k]
        weights = point_weights(kept) if weighted else None
        group_r0, source = _resolve_r0(r0, rows, size)
        result = fit_group(x[ok], y[ok], group_r0, weights)
        entry = {"objective": objective, "size": size, "set": set_name,
                 "x": "sqrt_kl" if x_col == "sqrt_kl" else "sqrt_forward_kl",
                 "r0_source": source, **result}
        if entry["skipped"]:  # info, not a warning: the report's fit table lists it
          logging.info("scaling fit %s/%s/%s/%s skipped: %s", objective, size, set_name,
                       entry["x"], entry["skipped"])
        elif num_bootstrap:
          per_prompt = None
          if outcomes is not None and all(outcome_key(r) in outcomes for r in kept):
            arrays = [outcomes[outcome_key(r)] for r in kept]
            if len({a.shape for a in arrays}) == 1:
              per_prompt = np.stack(arrays)
          boot = bootstrap_group(x[ok], y[ok], group_r0, weights, per_prompt,
                                 point_sigmas(kept), num_samples=num_bootstrap, seed=seed)
          for form in FORMS:
            entry[form].update(boot.pop(form))
          entry["bootstrap"] = boot
        out[key].append(entry)
  return jsonable(out)


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
  keys = [outcome_key(r) for r in rows]
  if not rows or any(k not in outcomes for k in keys):
    return None
  if sft_row is not None and outcome_key(sft_row) not in outcomes:
    sft_row = None
  # The per-prompt arrays carry no prompt ids, so a checkpoint judged on fewer prompts cannot
  # be aligned with the others: pairing by position would compare different prompts.
  counts = {k: len(outcomes[k]) for k in keys + ([outcome_key(sft_row)] if sft_row else [])}
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
                   _paired(table[best, test] - outcomes[outcome_key(sft_row)][test]))
  out["rises"] = bool(out["vs_sft"] and out["vs_sft"]["p_value"] < 0.05)
  out["falls"] = bool(out["vs_largest_kl"] and out["vs_largest_kl"]["p_value"] < 0.05)
  return out


def jsonable(obj):
  """Strict-JSON form of results: nan/inf → None, numpy scalars and arrays → Python, keys →
  str (evaluation summaries, fits, checks)."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_fits(fits: Mapping[str, Any], path: str) -> str:
  """Writes `fits` (from `fit_all`) as indented strict JSON; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(jsonable(fits), f, indent=2, allow_nan=False)
  return path


if __name__ == "__main__":
  from daa_jax import report  # pylint: disable=g-import-not-at-top
  sys.exit(report.main())
