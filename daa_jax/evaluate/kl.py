"""KL(πθ‖π_ref) and forward-KL estimates from samples, with standard errors; length R²."""

from __future__ import annotations

import math
import numpy as np


def kl_estimates(logps: np.ndarray, ref_logps: np.ndarray) -> dict[str, np.ndarray]:
  """Per-sequence KL estimates from per-token log-probs of samples of the first policy.

  Args:
    logps: `[N,T]` log-probs of the sampled tokens under the sampling policy (0 past the end).
    ref_logps: `[N,T]` under the other policy (0 past the end).

  Returns:
    `k1`, `k3` (per token, summed), `k3_seq` (per sequence): `[N]` float64 (module docstring).
  """
  l = np.asarray(logps, np.float64) - np.asarray(ref_logps, np.float64)  # [N,T]
  k1 = l.sum(-1)
  # expm1: (r − 1) without cancellation when r ≈ 1; padding (l = 0) adds exactly 0.
  k3 = (np.expm1(-l) + l).sum(-1)
  with np.errstate(over="ignore"):
    k3_seq = np.expm1(-k1) + k1
  return {"k1": k1, "k3": k3, "k3_seq": k3_seq}


def mean_stderr(x: np.ndarray) -> tuple[float, float]:
  """Mean and its standard error std(ddof=1)/√n (nan for n < 2)."""
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
  return float(x.mean()), se


def length_r2(rewards: np.ndarray, lengths: np.ndarray) -> float:
  """R² of the least-squares line reward ≈ a + b·length (= Pearson r²); nan if either is
  constant (e.g. the reference, whose implicit rewards are all 0)."""
  r = np.asarray(rewards, np.float64)
  n = np.asarray(lengths, np.float64)
  if r.size < 2 or np.ptp(r) == 0 or np.ptp(n) == 0:
    return math.nan
  return float(np.corrcoef(n, r)[0, 1] ** 2)


def kl_stats(scores: dict[str, np.ndarray], lengths: np.ndarray, prefix: str,
              reverse: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Summary scalars and per-sequence arrays of one direction's estimates."""
  sampler, other = ("policy_logps", "ref_logps") if reverse else ("ref_logps", "policy_logps")
  est = kl_estimates(scores[sampler], scores[other])
  est["rb"] = scores["kl_step" if reverse else "forward_kl_step"].astype(np.float64).sum(-1)
  out = {}
  for name, key in (("", "k1"), ("_k3", "k3"), ("_k3_seq", "k3_seq"), ("_rb", "rb")):
    out[prefix + name], out[prefix + name + "_stderr"] = mean_stderr(est[key])
  out["sqrt_" + prefix] = math.sqrt(max(out[prefix], 0.0))
  out[prefix + "_per_token"] = float(est["k1"].sum() / max(int(np.sum(lengths)), 1))
  return out, est
