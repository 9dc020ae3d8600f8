"""Scaling-law fits of win rate against KL (numpy/scipy; report: study/report.py).

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
(`bootstrap_group`: with per-prompt outcomes the prompts are resampled — every checkpoint and
the SFT row that gives R0 are judged on the same prompts, so one prompt resample moves them
together — else the checkpoints, with interval noise). Whether
the win rate rises then falls is a paired test on split halves of the prompts
(`paired_peak_test`), not a comparison of overlapping intervals around the maximum of ~20
noisy points.

Figures and report.md: `daa_jax.study.report`; the files of a sweep and the refit command
`python -m daa_jax.scaling SWEEP_DIR` (no JAX needed or imported): `daa_jax.study.outputs`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from daa_jax.errors import DataError
from daa_jax.train import metrics as metrics_lib

NUMERIC_COLUMNS = ("beta", "step", "epoch_fraction", "kl", "sqrt_kl", "forward_kl", "win_rate",
                   "win_rate_lo", "win_rate_hi", "reward_acc", "heldout_abs_logratio_margin",
                   "heldout_loss", "length_r2", "chosen_logp_drift", "truncation_rate", "num_seeds", "seed_win_rate_lo",
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
                      "write summary.csv with the sweep (daa_jax.study.sweep).")
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


def features(form: str, d: np.ndarray) -> np.ndarray:
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
  return coef["r0"] + features(form, d.reshape(-1)) @ np.array([coef[n] for n in names])


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
  x = features(form, d)
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
    # A maximum past the largest sampled √KL is an extrapolation of the law, not a measured
    # peak (a rising curve puts it at d = 9691): report the bound, never the number.
    result["d_star_status"] = ("no_maximum" if result["d_star"] is None else
                               "estimated" if result["d_star"] <= d.max() else
                               "beyond_sampled_range")
    if result["d_star_status"] == "beyond_sampled_range":
      result.update(d_star=None, peak_win_rate=None, d_star_lower_bound=float(d.max()),
                    peak_note=f"beyond the sampled range (> {d.max():.3g})")
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


def write_fits(fits: Mapping[str, Any], path: str) -> str:
  """Writes `fits` (from `fit_all`) as indented strict JSON; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(metrics_lib.jsonable(fits), f, indent=2, allow_nan=False)
  return path
