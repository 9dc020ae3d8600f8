"""Direct Alignment Algorithm objectives on sequence log-probs, plus `sequence_logps`.

Every objective defined in this module is a member of the unified family of Tang et al. 2024
("Generalized Preference Optimization", GPO): loss = E[g(β·h)] with g convex and

  h = [log πθ(y_w|x) − log π_ref(y_w|x)] − [log πθ(y_l|x) − log π_ref(y_l|x)],

where y_w is the chosen and y_l the rejected response. The implicit reward of a response is
r̂(x, y) = β·log πθ(y|x)/π_ref(y|x) (Rafailov et al. 2023), so β·h is the reward margin.
χPO, SimPO and DPO-Positive (`objectives_extra.py`, registered here too) change the link, drop
the reference, or penalize the margin; their docstrings give the equations.

Objectives take log-probs, not models: a live reference forward and cached
reference log-probs go through the same code. Each registered objective is a pure function

  fn(policy_logps [B,2], ref_logps [B,2], lengths [B,2], params: LossParams, normalize='sum')
      -> (loss [], metrics)

with column 0 = chosen, column 1 = rejected and lengths = response tokens including EOS.
β, α, ε, λ, γ, R_max and the DPO-Positive λ live in `LossParams` as traced arrays, so a β
sweep compiles one function; the objective name and `normalize` are static Python strings.
`needs_reference(name)` is False for a reference-free objective (simpo): the trainer then
keeps no reference params and makes no reference pass, and passes zeros as `ref_logps`.

`normalize='sum'` uses summed sequence log-probs (the DPO paper); `normalize='mean'` divides
every sequence log-prob (policy and reference) by its response length before forming h, the
length-normalized variant (as in SimPO / the "mean" option of several DPO codebases).

This module and its two siblings import only jax (pure math, the leftmost layer of the
trainer).
"""

from __future__ import annotations

import types
from typing import Callable

import jax
import jax.numpy as jnp

from daa_jax.train import objectives_base as base
from daa_jax.train.objectives_base import (  # noqa: F401  (re-exported: the public API)
    HPARAM_DEFAULTS, NORMALIZATIONS, TIE_EPS, LossParams, tie_half_accuracy)
from daa_jax.train.objectives_extra import chipo_loss, dpop_loss, simpo_loss  # noqa: F401

Array = base.Array
Metrics = base.Metrics
_pair_terms = base.pair_terms
_finish = base.finish


# --------------------------------------------------------------------------------------
# Token and sequence log-probs.
# --------------------------------------------------------------------------------------


def _token_logps(logits: Array, targets: Array) -> Array:
  """log softmax(logits)[target] in float32, without materializing the full log-softmax.

  Args:
    logits: [N, C, V] any float dtype.
    targets: [N, C] int; must be valid vocabulary ids.

  Returns:
    [N, C] float32.
  """
  # float32 (or wider) because logsumexp over ~50k bf16 logits loses ~2 decimal digits.
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # [N,C,V]
  picked = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]  # [N,C]
  # x[target] − logsumexp(x) equals log_softmax(x)[target] but keeps one [N,C,V] buffer
  # instead of two.
  return picked - jax.nn.logsumexp(x, axis=-1)


def sequence_logps(logits: Array, targets: Array, loss_mask: Array,
                   chunk_size: int | None = None, project=None) -> tuple[Array, Array]:
  """Per-token and summed log-probs of `targets` under `logits`, in float32.

  The caller aligns everything to targets (`logits[:, :-1]`, `tokens[:, 1:]`,
  `loss_mask[:, :-1]`); no shift happens here. Masked positions contribute exactly 0 (a
  `where`, not a multiply, so garbage logits or out-of-range target ids at padding cannot
  leak NaN into the sum).

  Args:
    logits: [N, L, V] logits of the token at each target position (any float dtype), or,
      with `project`, the [N, L, D] final hidden states that `project` maps to them.
    targets: [N, L] int token ids.
    loss_mask: [N, L] nonzero on positions that count (response tokens incl. EOS).
    chunk_size: None computes all positions at once. An int processes L in chunks of that
      many positions under `lax.map` with rematerialization, so the float32 copy of the
      logits exists for one [N, chunk_size, V] slice at a time, in the forward and the
      backward pass. The result is identical; L need not be divisible by chunk_size.
    project: [N, C, D] -> [N, C, V] (the model's vocabulary projection,
      `CausalLM.logits_from_hidden`). Inside the chunks it is the fused form: no [N, L, V]
      buffer of any dtype exists, forward or backward (the projection is recomputed per
      chunk in the backward pass), which at V = 50k is the largest activation of a DAA step.

  Returns:
    summed: [N] float32, sum of per-token log-probs over masked-in positions.
    per_token: [N, L] float32, 0 where `loss_mask` is 0.
  """
  n, length = logits.shape[:2]
  mask = loss_mask > 0  # [N,L]
  # Padding targets may be -100 or ≥ V; any in-range id is fine since the result is masked.
  targets = jnp.where(mask, targets, 0).astype(jnp.int32)  # [N,L]
  project = project or (lambda x: x)

  if chunk_size is None or chunk_size >= length:
    per_token = _token_logps(project(logits), targets)  # [N,L]
  else:
    if chunk_size < 1:
      raise ValueError(f"config.loss.logps_chunk_size={chunk_size}; use a positive int or None.")
    num_full = length // chunk_size
    full = num_full * chunk_size

    # jax.checkpoint: without it the scan's backward would stack each chunk's float32
    # residuals into a full [L/C, N, C, V] buffer, defeating the point of chunking.
    @jax.checkpoint
    def one_chunk(start):
      lg = jax.lax.dynamic_slice_in_dim(logits, start, chunk_size, axis=1)  # [N,C,V|D]
      tg = jax.lax.dynamic_slice_in_dim(targets, start, chunk_size, axis=1)  # [N,C]
      return _token_logps(project(lg), tg)  # [N,C]

    starts = jnp.arange(num_full, dtype=jnp.int32) * chunk_size
    chunks = jax.lax.map(one_chunk, starts)  # [L//C, N, C]
    pieces = [jnp.moveaxis(chunks, 0, 1).reshape(n, full)]
    # The ragged tail is a static slice: dynamic_slice would clamp its start and recompute
    # (and double-count) positions of the previous chunk.
    if full < length:
      pieces.append(jax.checkpoint(lambda lg, tg: _token_logps(project(lg), tg))(
          logits[:, full:], targets[:, full:]))
    per_token = jnp.concatenate(pieces, axis=1)  # [N,L]

  per_token = jnp.where(mask, per_token, 0.0)
  return per_token.sum(axis=-1), per_token


# --------------------------------------------------------------------------------------
# Pairwise objectives (`LossParams`, the per-pair terms and the metrics: objectives_base.py).
# --------------------------------------------------------------------------------------

def dpo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
             normalize: str = "sum") -> tuple[Array, Metrics]:
  """DPO (Rafailov et al. 2023, eq. 7): per pair −log σ(β·h).

  β scales the log-ratio margin h inside the sigmoid (g(u) = −log σ(u) = log(1 + e^{−u}));
  at h = 0 the loss is log 2. h uses summed log-probs for `normalize='sum'` (the paper) and
  per-token means for `'mean'`.

  Args:
    policy_logps: [B, 2] policy sequence log-probs, column 0 chosen, 1 rejected.
    ref_logps: [B, 2] reference sequence log-probs, same layout.
    lengths: [B, 2] response lengths in tokens including EOS.
    params: `LossParams`; uses `beta`.
    normalize: 'sum' or 'mean' (static).

  Returns:
    loss: [] mean over pairs; metrics: see `compute_loss`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  return _finish(-jax.nn.log_sigmoid(beta * t.h), t, params)


def ipo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
             normalize: str = "sum") -> tuple[Array, Metrics]:
  """IPO in the unified GPO form (Tang et al. 2024; the overoptimization paper): (β·h − 1)².

  β scales h inside the square; the minimum is at h = 1/β, and the loss is 1 at h = 0. This
  is β²·(h − 1/β)², the IPO of Azar et al. 2023 at τ = β/2 times β² — `ipo_azar` keeps the
  original parameterization, whose β is not comparable to this one's. Normalization as in
  `dpo_loss`.

  Args and Returns: as `dpo_loss`; uses `beta`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  return _finish(jnp.square(beta * t.h - 1.0), t, params)


def ipo_azar_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
                  normalize: str = "sum") -> tuple[Array, Metrics]:
  """IPO as in Azar et al. 2023 (eq. 17) and the original DPO code: (h − 1/(2β))².

  Here β (the paper's τ) sets the target margin: the minimum is at h = 1/(2β); the loss at
  h = 0 is 1/(4β²). (h − 1/(2β))² = (2β·h − 1)²/(4β²): `ipo` at β' = 2β, divided by 4β².
  Normalization as in `dpo_loss`.

  Args and Returns: as `dpo_loss`; uses `beta`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  return _finish(jnp.square(t.h - 1.0 / (2.0 * beta)), t, params)


def slic_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
              normalize: str = "sum") -> tuple[Array, Metrics]:
  """SLiC-HF (Zhao et al. 2023) in the unified form: max(0, 1 − β·h) + λ·NLL(y_w).

  β scales h inside the hinge (margin 1/β in h); at h = 0 the hinge is 1. SLiC-HF's
  calibration loss uses the policy alone; the unified form (Tang et al. 2024) measures the
  margin against the reference, as here. The optional regularizer λ·NLL(y_w) = −λ·log πθ(y_w)
  (λ = `sft_weight`, 0 by default, as in the overoptimization paper) is normalized like the
  log-ratios: summed log-prob for 'sum', per-token mean for 'mean'.

  Args and Returns: as `dpo_loss`; uses `beta` and `sft_weight`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  hinge = jnp.maximum(0.0, 1.0 - beta * t.h)
  return _finish(hinge + params.sft_weight.astype(t.h.dtype) * t.nll_chosen, t, params)


def rdpo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
              normalize: str = "sum") -> tuple[Array, Metrics]:
  """Length-regularized DPO (R-DPO, Park et al. 2024, eq. 9): −log σ(β·h + α(|y_w| − |y_l|)).

  Sign convention (Park et al. 2024, eq. 9): R-DPO optimizes the length-penalized reward
  r − α|y|. Its Bradley–Terry logit for y_w over y_l is written with the policy's implicit
  reward β·h plus α(|y_w| − |y_l|): when the chosen response is longer, the length term
  already supplies part of the logit, so the policy needs less margin β·h — it gains less
  from the length difference, which is what stops it from learning "longer is better".
  β scales h; α multiplies the length difference in tokens (incl. EOS) and is not scaled by
  β or by `normalize`. α = 0 gives `dpo`. Normalization of h as in `dpo_loss`.

  Args and Returns: as `dpo_loss`; uses `beta` and `alpha`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  beta = params.beta.astype(t.h.dtype)
  length_term = params.alpha.astype(t.h.dtype) * (t.length_chosen - t.length_rejected)
  return _finish(-jax.nn.log_sigmoid(beta * t.h + length_term), t, params)


def cdpo_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
              normalize: str = "sum") -> tuple[Array, Metrics]:
  """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"):

    −(1 − ε)·log σ(β·h) − ε·log σ(−β·h),

  the DPO loss with labels smoothed by a flip rate ε; β scales h as in DPO. Unlike DPO the
  optimum is finite: σ(β·h*) = 1 − ε. ε = 0 gives `dpo`. Normalization as in `dpo_loss`.

  Args and Returns: as `dpo_loss`; uses `beta` and `epsilon`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  u = params.beta.astype(t.h.dtype) * t.h
  eps = params.epsilon.astype(t.h.dtype)
  return _finish(-(1.0 - eps) * jax.nn.log_sigmoid(u) - eps * jax.nn.log_sigmoid(-u), t, params)


def robust_loss(policy_logps: Array, ref_logps: Array, lengths: Array, params: LossParams,
                normalize: str = "sum") -> tuple[Array, Metrics]:
  """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO", eq. 9):

    [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε),

  an unbiased estimate of the clean-label DPO loss under label flips at rate ε (needs
  ε < 1/2; config validation must enforce it since ε is traced here). β scales h as in DPO;
  ε = 0 gives `dpo`. Unlike cDPO the loss is unbounded below for ε > 0: as β·h → ∞ it falls
  linearly with slope −ε/(1 − 2ε), so its gradient never vanishes. Normalization as in
  `dpo_loss`.

  Args and Returns: as `dpo_loss`; uses `beta` and `epsilon`.
  """
  t = _pair_terms(policy_logps, ref_logps, lengths, normalize)
  u = params.beta.astype(t.h.dtype) * t.h
  eps = params.epsilon.astype(t.h.dtype)
  per_pair = ((1.0 - eps) * -jax.nn.log_sigmoid(u) - eps * -jax.nn.log_sigmoid(-u)) / (
      1.0 - 2.0 * eps)
  return _finish(per_pair, t, params)


ObjectiveFn = Callable[..., tuple[Array, Metrics]]

# Name -> objective; read-only so no caller can register a loss behind the config's back.
OBJECTIVES: types.MappingProxyType[str, ObjectiveFn] = types.MappingProxyType({
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "ipo_azar": ipo_azar_loss,
    "slic": slic_loss,
    "rdpo": rdpo_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "chipo": chipo_loss,
    "simpo": simpo_loss,
    "dpop": dpop_loss,
})

# Objectives that never read `ref_logps`: no reference params, no reference pass.
REFERENCE_FREE = frozenset({"simpo"})


def needs_reference(name: str) -> bool:
  """Whether objective `name` reads the reference log-probs (False: simpo)."""
  get_objective(name)  # a ValueError naming the valid objectives for an unknown name
  return name not in REFERENCE_FREE


def get_objective(name: str) -> ObjectiveFn:
  """The registered objective called `name`; ValueError naming the valid ones otherwise."""
  try:
    return OBJECTIVES[name]
  except KeyError:
    raise ValueError(
        f"config.objective.name={name!r} is not a known objective; choose one of "
        f"{', '.join(OBJECTIVES)}.") from None


def compute_loss(name: str, policy_logps: Array, ref_logps: Array, lengths: Array, *,
                 beta, alpha=0.0, epsilon=0.0, sft_weight=0.0,
                 gamma=HPARAM_DEFAULTS["gamma"], rmax=HPARAM_DEFAULTS["rmax"],
                 dpop_lambda=HPARAM_DEFAULTS["dpop_lambda"],
                 normalize: str = "sum") -> tuple[Array, Metrics]:
  """The DAA loss `name` and its preference metrics.

  `name` and `normalize` must be Python strings (static under jit); `beta`, `alpha`,
  `epsilon`, `sft_weight`, `gamma`, `rmax` and `dpop_lambda` may be Python floats or traced
  scalars — changing them does not
  recompile a jitted caller that passes them as arguments.

  Args:
    name: one of `OBJECTIVES`: dpo, ipo, ipo_azar, slic, rdpo, cdpo, robust, chipo, simpo,
      dpop.
    policy_logps: [B, 2] policy sequence log-probs, column 0 chosen, 1 rejected.
    ref_logps: [B, 2] reference sequence log-probs, same layout.
    lengths: [B, 2] response lengths in tokens including EOS.
    beta: β. alpha: R-DPO α. epsilon: cDPO/robust ε. sft_weight: SLiC λ. gamma: SimPO γ.
    rmax: χPO R_max. dpop_lambda: DPO-Positive λ.
    normalize: 'sum' (summed log-probs) or 'mean' (each log-prob divided by its length).

  Returns:
    loss: [] float32 mean over the B pairs.
    metrics: float32 scalars `loss`, `rewards_chosen`, `rewards_rejected` (batch means of
      β·logratio), `margin` (mean of β·h), `margin_std`, `reward_acc` (fraction of margins
      > 0, ties — |h| within float32 resolution, `tie_half_accuracy` — counting 1/2), `logps_chosen`, `logps_rejected`, `ref_logps_chosen`,
      `ref_logps_rejected` (raw summed log-probs, not normalized), and `per_pair`, a dict of
      [B] arrays: `loss`, `h`, `accuracy`, `rewards_chosen`, `rewards_rejected`,
      `logratio_chosen`, `logratio_rejected`, `length_chosen`, `length_rejected`.
  """
  fn = get_objective(name)
  params = LossParams.create(beta, alpha, epsilon, sft_weight, gamma, rmax, dpop_lambda)
  return fn(jnp.asarray(policy_logps), jnp.asarray(ref_logps), jnp.asarray(lengths), params,
            normalize=normalize)


__all__ = ["HPARAM_DEFAULTS", "LossParams", "NORMALIZATIONS", "OBJECTIVES", "REFERENCE_FREE",
           "compute_loss", "get_objective", "needs_reference", "tie_half_accuracy",
           "sequence_logps", "dpo_loss", "ipo_loss", "ipo_azar_loss", "slic_loss", "rdpo_loss",
           "cdpo_loss", "robust_loss", "chipo_loss", "simpo_loss", "dpop_loss"]
