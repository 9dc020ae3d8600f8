"""DAA objectives beyond the GPO family: χPO (a new link), SimPO (no reference), DPO-Positive.

Same contract as `objectives.py` (registered there, in `OBJECTIVES`): pure functions

  fn(policy_logps [B,2], ref_logps [B,2], lengths [B,2], params: LossParams, normalize='sum')
      -> (loss [], metrics)

with column 0 = chosen (y_w), 1 = rejected (y_l); every coefficient is a traced array of
`LossParams`, so a sweep over it compiles once. `normalize` acts as everywhere: 'mean' divides
each sequence log-prob by its response length before anything else is formed. The metrics are
the shared ones of `objectives_base.finish` (implicit rewards β·log πθ/π_ref, margin β·h), so
runs of different objectives log comparable numbers. Imports only jax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from daa_jax.train.objectives_base import Array, LossParams, Metrics, finish, pair_terms


def chipo_link(logratio: Array, beta: Array, rmax: Array) -> Array:
  """clip(β·φ(πθ/π_ref), −2R_max, 2R_max) per response, φ(z) = z + log z, from Δ = log πθ/π_ref.

  φ(e^Δ) = e^Δ + Δ. Δ is capped at log(1 + 2R_max/β) before the exp: there β·φ already exceeds
  2R_max (β·φ = β + 2R_max + β·cap), so above the cap the clipped value is 2R_max and its
  gradient 0 either way — the cap changes nothing but keeps e^Δ finite (no inf, no NaN
  gradient) for any Δ.
  """
  bound = 2.0 * rmax
  z = jnp.minimum(logratio, jnp.log1p(bound / beta))
  return jnp.clip(beta * (jnp.exp(z) + z), -bound, bound)


def chipo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
               normalize: str = "sum") -> tuple[Array, Metrics]:
  """χPO (Huang et al. 2024, "Correcting the Mythos of KL-Regularization", Algorithm 1):

    −log σ(clip_{2R_max}[β·φ(πθ(y_w)/π_ref(y_w))] − clip_{2R_max}[β·φ(πθ(y_l)/π_ref(y_l))]),

  DPO with its link log z replaced by φ(z) = z + log z (mixed χ² + KL regularization), and
  each response's β·φ clipped to [−2R_max, 2R_max] (clip_R(x) = max(−R, min(R, x)), the
  paper's clipping, applied per response as in its Algorithm 1). R_max = `rmax` (default 5,
  `HPARAM_DEFAULTS`; the paper leaves it a parameter) bounds the rewards; the clip saturates
  the chosen response once e^Δ ≈ 2R_max/β, which is the pessimism that stops
  overoptimization. β scales φ inside the clip. At πθ = π_ref both terms are β and the loss
  is log 2. See `chipo_link` for the finite exp. Normalization as in `dpo_loss` (Δ per token
  for 'mean'); TRL has no χPO loss.

  Args and Returns: as `objectives.dpo_loss`; uses `beta` and `rmax`.
  """
  t = pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  rmax = params.rmax.astype(t.h.dtype)
  u = chipo_link(t.logratio_chosen, beta, rmax) - chipo_link(t.logratio_rejected, beta, rmax)
  return finish(-jax.nn.log_sigmoid(u), t, params)


def simpo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
               normalize: str = "sum") -> tuple[Array, Metrics]:
  """SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log πθ(y_w) − β/|y_l|·log πθ(y_l) − γ).

  Reference-free: `ref_logps` is never read (the trainer passes zeros and makes no reference
  pass, `objectives.needs_reference`), and the metrics' reference log-probs read 0. The
  paper's length-normalized reward is `normalize='mean'`, which the trainer's config requires
  for simpo; 'sum' (library use only) is the paper's "w/o length normalization" ablation. β
  scales the per-token log-probs, the target margin γ (`gamma`) is subtracted outside β: TRL's
  `CPOTrainer(loss_type='simpo', cpo_alpha=0)` with `simpo_gamma` = γ (its default 0.5, ours).

  Args and Returns: as `objectives.dpo_loss`; uses `beta` and `gamma`.
  """
  del ref_logps  # reference-free by definition
  t = pair_terms(policy_logps, jnp.zeros_like(policy_logps), lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  return finish(-jax.nn.log_sigmoid(beta * t.h - params.gamma.astype(t.h.dtype)), t, params)


def dpop_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
              normalize: str = "sum") -> tuple[Array, Metrics]:
  """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3):

    −log σ(β·(h − λ·max(0, log π_ref(y_w) − log πθ(y_w)))),

  DPO whose margin loses λ (`dpop_lambda`, default 50, the paper's value) per nat that the
  chosen response's likelihood falls below the reference's, so the loss cannot be lowered by
  pushing both responses down. β scales the penalized margin; λ = 0 gives `dpo`. The penalty
  is normalized like h ('mean': per token). TRL's DPOTrainer, in the versions checked, has no
  `dpop` loss_type (no TRL equivalent); some third-party codes instead add
  λ·max(0, 1 − πθ(y_w)/π_ref(y_w)) outside the sigmoid, a different loss — this is the paper's.

  Args and Returns: as `objectives.dpo_loss`; uses `beta` and `dpop_lambda`.
  """
  t = pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  penalty = jnp.maximum(0.0, -t.logratio_chosen)  # log π_ref(y_w) − log πθ(y_w), if > 0
  lam = params.dpop_lambda.astype(t.h.dtype)
  return finish(-jax.nn.log_sigmoid(beta * (t.h - lam * penalty)), t, params)
