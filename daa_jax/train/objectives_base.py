"""The shared machinery of the DAA objectives: `LossParams`, the per-pair terms, metrics.

`objectives.py` (the DPO family and the registry) and `objectives_extra.py` (χPO, SimPO,
DPO-Positive) build every loss from these: `pair_terms` forms the (optionally length-normalized)
log-ratios and the margin h of a batch `[B,2]`, and `finish` takes the mean loss and the
preference metrics shared by every objective. Imports only jax (pure math).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Any]

NORMALIZATIONS = ("sum", "mean")

# The runtime loss hyperparameters (the `LossParams` fields, `config.objective.<name>`) and
# their defaults. chipo's rmax = 5 bounds the Bradley–Terry preference probability the clip
# allows by σ(5) ≈ 0.993; simpo's gamma = 0.5 is TRL's `simpo_gamma`; dpop_lambda = 50 is the
# Smaug paper's λ.
HPARAM_DEFAULTS = dict(beta=0.1, alpha=0.0, epsilon=0.0, sft_weight=0.0, gamma=0.5, rmax=5.0,
                       dpop_lambda=50.0)


class LossParams(NamedTuple):
  """Runtime (traced) loss coefficients; a pytree, so jit/vmap/grad see arrays.

  Attributes:
    beta: [] inverse temperature β; the implicit reward is β·log πθ/π_ref.
    alpha: [] R-DPO length coefficient α (per token of length difference).
    epsilon: [] label-flip rate ε of cDPO and robust DPO (robust needs ε < 1/2).
    sft_weight: [] λ, weight of the chosen-response NLL added by SLiC.
    gamma: [] SimPO target reward margin γ (subtracted from the logit, outside β).
    rmax: [] χPO reward bound R_max: each response's β·φ is clipped to [−2R_max, 2R_max].
    dpop_lambda: [] DPO-Positive λ, weight of max(0, log π_ref(y_w) − log πθ(y_w)) in h.
  """
  beta: Array
  alpha: Array
  epsilon: Array
  sft_weight: Array
  gamma: Array
  rmax: Array
  dpop_lambda: Array

  @classmethod
  def create(cls, beta, alpha=0.0, epsilon=0.0, sft_weight=0.0, gamma=HPARAM_DEFAULTS["gamma"],
             rmax=HPARAM_DEFAULTS["rmax"],
             dpop_lambda=HPARAM_DEFAULTS["dpop_lambda"]) -> "LossParams":
    def at_least_f32(v):
      v = jnp.asarray(v)
      return v.astype(jnp.promote_types(v.dtype, jnp.float32))
    return cls(*(at_least_f32(v) for v in (beta, alpha, epsilon, sft_weight, gamma, rmax,
                                           dpop_lambda)))


class PairTerms(NamedTuple):
  """Per-pair quantities shared by every objective; all [B] in the compute dtype."""
  policy_chosen: Array
  policy_rejected: Array
  ref_chosen: Array
  ref_rejected: Array
  logratio_chosen: Array  # normalized log πθ(y_w)/π_ref(y_w)
  logratio_rejected: Array
  h: Array
  length_chosen: Array
  length_rejected: Array
  nll_chosen: Array  # −log πθ(y_w), normalized like the log-ratios
  magnitude: Array  # Σ |log-probs| behind h (normalized like it): its float32 resolution


def pair_terms(policy_logps: Array, ref_logps: Array, lengths: Array,
                normalize: str) -> PairTerms:
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"config.objective.normalize={normalize!r}; use one of {NORMALIZATIONS}.")
  # At least float32 for the loss (bf16 log-ratios of long sequences lose the margin); float64
  # stays float64 so finite-difference tests are exact.
  dtype = jnp.promote_types(jnp.result_type(policy_logps, ref_logps), jnp.float32)
  policy = policy_logps.astype(dtype)  # [B,2]
  ref = ref_logps.astype(dtype)  # [B,2]
  lengths = lengths.astype(dtype)  # [B,2]
  if normalize == "mean":
    # A zero-length response (a data bug) would divide by 0; treat it as length 1.
    scale = 1.0 / jnp.maximum(lengths, 1.0)
    policy_n, ref_n = policy * scale, ref * scale
  else:
    policy_n, ref_n = policy, ref
  logratios = policy_n - ref_n  # [B,2]
  return PairTerms(
      policy_chosen=policy[:, 0], policy_rejected=policy[:, 1],
      ref_chosen=ref[:, 0], ref_rejected=ref[:, 1],
      logratio_chosen=logratios[:, 0], logratio_rejected=logratios[:, 1],
      h=logratios[:, 0] - logratios[:, 1],
      length_chosen=lengths[:, 0], length_rejected=lengths[:, 1],
      nll_chosen=-policy_n[:, 0],
      magnitude=jnp.abs(policy_n).sum(-1) + jnp.abs(ref_n).sum(-1))


# A margin within this many float32 epsilons of the summed |log-probs| behind it is a tie.
TIE_EPS = 2.0


def tie_half_accuracy(h: Array, magnitude: Array) -> Array:
  """Per-pair preference accuracy [B]: 1 if h > 0, 0 if h < 0, 1/2 for a tie.

  A tie is |h| ≤ TIE_EPS · ε_float32 · magnitude, with magnitude = |log πθ(y_w)| + |log πθ(y_l)|
  + |log π_ref(y_w)| + |log π_ref(y_l)| (normalized like h): a difference below the float32
  resolution of those sums says nothing. When πθ = π_ref their log-probs may still come from
  two compiled programs (the trainer's gradient step and the reference pass) and differ by
  roundoff (~1e-5 nats on 500-token rows); without the tolerance such a step-0 batch reads
  anywhere in 0.3–0.8 instead of 0.5. Works on numpy and jax arrays alike.
  """
  tol = TIE_EPS * 1.1920929e-07 * magnitude
  return (h > tol) + 0.5 * (abs(h) <= tol)


def finish(per_pair_loss: Array, t: PairTerms, params: LossParams) -> tuple[Array, Metrics]:
  """Mean loss over pairs and the preference metrics shared by every objective."""
  beta = params.beta.astype(t.h.dtype)
  rewards_chosen = beta * t.logratio_chosen  # [B]
  rewards_rejected = beta * t.logratio_rejected  # [B]
  margins = rewards_chosen - rewards_rejected  # [B] = β·h
  loss = per_pair_loss.mean()
  # Ties count half: at initialization πθ == π_ref, every margin is 0 up to roundoff and
  # accuracy reads 0.5 (chance), not 0 — so a curve starting at 0.5 means "no preference yet".
  acc = tie_half_accuracy(t.h, t.magnitude).astype(t.h.dtype)
  metrics = {
      "loss": loss,
      "rewards_chosen": rewards_chosen.mean(),
      "rewards_rejected": rewards_rejected.mean(),
      "margin": margins.mean(),
      "margin_std": margins.std(),
      "reward_acc": acc.mean(),
      "logps_chosen": t.policy_chosen.mean(),
      "logps_rejected": t.policy_rejected.mean(),
      "ref_logps_chosen": t.ref_chosen.mean(),
      "ref_logps_rejected": t.ref_rejected.mean(),
      "per_pair": {
          "loss": per_pair_loss,
          "h": t.h,
          "accuracy": acc,
          "rewards_chosen": rewards_chosen,
          "rewards_rejected": rewards_rejected,
          "logratio_chosen": t.logratio_chosen,
          "logratio_rejected": t.logratio_rejected,
          "length_chosen": t.length_chosen,
          "length_rejected": t.length_rejected,
      },
  }
  return loss, metrics


