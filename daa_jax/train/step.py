"""Pure training and evaluation steps (jitted by the caller, `train/loop.py`).

Conventions:
  * `TrainState(step, params, opt_state)` is a plain pytree; the reference params are a separate,
    never-donated argument with no optimizer state.
  * Batches follow the data contract: `tokens [B,2,L]` for pairs (0 = chosen, 1 = rejected),
    `loss_mask` aligned to targets (`loss_mask[..., t] = 1` iff `tokens[..., t+1]` is a
    response token, EOS included), `attention_mask`, `positions`, `lengths [B,2]`, optional
    `ref_logps [B,2]` (cached reference).
  * Loss hyperparameters (β, α, ε, λ, γ, R_max, DPO-Positive λ) arrive as runtime float32
    arrays in `hparams`, so a β sweep compiles the step once.
  * Gradient accumulation: the global batch is split into `grad_accum` equal micro-batches
    that a `lax.scan` walks; each micro-batch contributes its loss *sum* divided by the
    global normalizer, so the accumulated gradient equals the one-big-batch gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from daa_jax.models import lora as lora_lib
from daa_jax.models import model as model_lib
from daa_jax.train import objectives
from daa_jax.train import packing as packing_lib

PyTree = Any


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: PyTree
  opt_state: PyTree


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static (compile-time) settings of a step; everything numeric is in `hparams`."""
  kind: str = "daa"            # daa | sft
  objective: str = "dpo"
  normalize: str = "sum"
  grad_accum: int = 1
  cached_ref: bool = False     # use batch['ref_logps'] instead of a reference forward
                               # (neither for a reference-free objective: zeros)
  logps_chunk: int = 0         # > 0: chunked log-softmax (memory-lean)
  packing: bool = False        # DAA batches are `packing.pack_pairs` rows [prompt|chosen|rejected]
  lora: bool = False           # params are LoRA adapters over the frozen base `ref_params`
  lora_scale: float = 1.0      # alpha / rank
  lora_dropout: float = 0.0    # > 0: dropout on the adapters' input (activation-level form)
  dropout_seed: int = 0        # the dropout masks' key: fold_in(key(seed), step, micro-batch)


# The dropout keys' stream under config.model.lora.seed (apart from the adapters' init keys,
# fold_in(key(seed), module index)).
_DROPOUT_STREAM = 0x64726F70


def _policy(model, params, ref_params, cfg: StepConfig, rng=None):
  """(model, params) of the policy. With LoRA the base `ref_params` merged with the adapters
  `params` (`models/lora.py`), so gradients reach only the adapters; with LoRA dropout and a
  `rng` (training), the base under `lora.with_adapters` (dropout on the adapters' input,
  which merged weights cannot express); else `params` itself."""
  if not cfg.lora:
    return model, params
  if cfg.lora_dropout > 0 and rng is not None:
    return lora_lib.with_adapters(model, params, cfg.lora_scale, cfg.lora_dropout,
                                  rng), ref_params
  return model, lora_lib.merge(ref_params, params, cfg.lora_scale)


def _global_norm(tree) -> jax.Array:
  if hasattr(optax, "tree") and hasattr(optax.tree, "norm"):  # optax >= 0.2.5
    return optax.tree.norm(tree)
  return optax.global_norm(tree)


def init_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def hparams_from_config(objective_config) -> dict[str, jax.Array]:
  """The runtime loss hyperparameters as float32 scalars (never static); a field the config
  lacks (one written before the field existed) takes its `objectives.HPARAM_DEFAULTS` value."""
  return {k: jnp.asarray(float(objective_config.get(k, d)), jnp.float32)
          for k, d in objectives.HPARAM_DEFAULTS.items()}


def _flat_pairs(x: jax.Array) -> jax.Array:
  """[B,2,...] -> [2B,...] with the chosen and rejected rows of a pair adjacent."""
  return x.reshape((-1,) + x.shape[2:])


def sequence_logps(model, params, tokens, attention_mask, positions, loss_mask,
                   logps_chunk: int = 0):
  """Summed response log-probs of rows `[N,L]` -> (`[N]`, per-token `[N,L-1]`), in float32.

  `logps_chunk > 0` fuses the vocabulary projection into the chunked log-softmax: no
  `[N,L,V]` logits exist (`objectives.sequence_logps`'s `project`)."""
  if not logps_chunk:
    logits = model.apply({"params": params}, tokens, attention_mask=attention_mask,
                         positions=positions)  # [N,L,V]
    return objectives.sequence_logps(logits[:, :-1], tokens[:, 1:], loss_mask[:, :-1])
  hidden = model.apply({"params": params}, tokens, attention_mask=attention_mask,
                       positions=positions, method=model_lib.CausalLM.hidden_states)  # [N,L,D]
  return objectives.sequence_logps(hidden[:, :-1], tokens[:, 1:], loss_mask[:, :-1],
                                   chunk_size=logps_chunk, project=lambda h: model.apply(
                                       {"params": params}, h,
                                       method=model_lib.CausalLM.logits_from_hidden))


def pair_logps(model, params, batch, logps_chunk: int = 0, packing: bool = False) -> jax.Array:
  """Policy (or reference) log-probs of both responses of each pair: `[B,2]` float32.

  `packing=True` takes a `packing.pack_pairs` batch (one prompt-shared row per pair) and
  gives the same values as the two-row batch it was packed from.
  """
  if packing:
    if "target_index" not in batch:
      raise ValueError("StepConfig.packing=True needs batches from packing.pack_pairs.")
    return packing_lib.packed_pair_logps(model, params, batch, logps_chunk)
  summed, _ = sequence_logps(
      model, params, _flat_pairs(batch["tokens"]), _flat_pairs(batch["attention_mask"]),
      _flat_pairs(batch["positions"]), _flat_pairs(batch["loss_mask"]), logps_chunk)
  return summed.reshape(batch["tokens"].shape[:2])


def _reference_logps(model, ref_params, batch, cfg: StepConfig, policy):
  """`[B,2]` reference log-probs: cached, a live forward, or zeros for a reference-free
  objective (`objectives.needs_reference`), which runs no reference pass at all."""
  if not objectives.needs_reference(cfg.objective):
    return jnp.zeros_like(policy)
  if cfg.cached_ref:
    return batch["ref_logps"].astype(jnp.float32)
  return jax.lax.stop_gradient(
      pair_logps(model, ref_params, batch, cfg.logps_chunk, cfg.packing))


def _daa_loss(params, ref_params, batch, hparams, rng=None, *, model, cfg: StepConfig,
              num_pairs):
  policy = pair_logps(*_policy(model, params, ref_params, cfg, rng), batch, cfg.logps_chunk,
                      cfg.packing)
  ref = _reference_logps(model, ref_params, batch, cfg, policy)
  # hparams: `hparams_from_config`'s keys (a caller's dict may hold fewer: defaults fill in).
  loss, metrics = objectives.compute_loss(cfg.objective, policy, ref, batch["lengths"],
                                          normalize=cfg.normalize, **hparams)
  micro = policy.shape[0]
  # The micro-batch's share of the global mean: sum over micro-batches = global mean. A
  # standard deviation is no mean: the margins themselves travel out, and `_loss_and_grads`
  # takes margin_std over the whole batch.
  weight = micro / num_pairs
  scalars = {k: v * weight for k, v in metrics.items() if k not in ("per_pair", "margin_std")}
  margins = metrics["per_pair"]["rewards_chosen"] - metrics["per_pair"]["rewards_rejected"]
  return loss * weight, (scalars, margins)


def _sft_loss(params, ref_params, batch, hparams, rng=None, *, model, cfg: StepConfig,
              num_tokens):
  del hparams
  summed, _ = sequence_logps(*_policy(model, params, ref_params, cfg, rng), batch["tokens"],
                             batch["attention_mask"], batch["positions"], batch["loss_mask"],
                             cfg.logps_chunk)
  nll = -jnp.sum(summed) / num_tokens  # token-level mean over the *global* batch
  return nll, ({"loss": nll, "tokens": jnp.sum(batch["lengths"]).astype(jnp.float32)},)


def _split_micro(batch, grad_accum: int):
  """[B,...] -> [A, B/A, ...] taking every A-th example, so each micro-batch keeps the
  batch-axis sharding (a contiguous split would put each micro-batch on a subset of devices)."""
  def split(x):
    x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _micro_rng(rng, i):
  return None if rng is None else jax.random.fold_in(rng, i)


def _loss_and_grads(params, ref_params, batch, hparams, model, cfg: StepConfig, rng=None):
  """`rng`: the step's dropout key (None: no dropout); micro-batch i draws from
  fold_in(rng, i)."""
  if cfg.kind == "daa":
    loss_fn = functools.partial(_daa_loss, model=model, cfg=cfg,
                                num_pairs=batch["tokens"].shape[0])
  else:
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
    loss_fn = functools.partial(_sft_loss, model=model, cfg=cfg, num_tokens=num_tokens)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if cfg.grad_accum == 1:
    (loss, aux), grads = grad_fn(params, ref_params, batch, hparams, _micro_rng(rng, 0))
    return loss, _whole_batch(aux), grads

  micro_batches = _split_micro(batch, cfg.grad_accum)

  def body(carry, xs):
    micro, i = xs
    loss_acc, metrics_acc, grads_acc = carry
    (loss, (metrics, *rest)), grads = grad_fn(params, ref_params, micro, hparams,
                                              _micro_rng(rng, i))
    return (loss_acc + loss, jax.tree.map(jnp.add, metrics_acc, metrics),
            jax.tree.map(jnp.add, grads_acc, grads)), rest

  first = jax.tree.map(lambda x: x[0], micro_batches)
  metrics_shape = jax.eval_shape(
      lambda: grad_fn(params, ref_params, first, hparams, _micro_rng(rng, 0))[0][1][0])
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)  # noqa: E731
  init = (jnp.zeros((), jnp.float32), zeros(metrics_shape),
          jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
  (loss, metrics, grads), rest = jax.lax.scan(
      body, init, (micro_batches, jnp.arange(cfg.grad_accum, dtype=jnp.int32)))
  # rest: the per-pair margins of every micro-batch, [A, B/A] (empty for SFT).
  return loss, _whole_batch((metrics, *[r.reshape(-1) for r in rest])), grads


def _whole_batch(aux: tuple) -> dict:
  """(scalars[, margins [B]]) -> scalars with margin_std of the whole batch, so no logged
  statistic depends on grad_accum."""
  scalars, *rest = aux
  if rest:
    scalars = dict(scalars, margin_std=rest[0].std())
  return scalars


def train_step(state: TrainState, ref_params: PyTree, batch: dict, hparams: dict,
               *, model, tx: optax.GradientTransformation, cfg: StepConfig,
               lr_fn=None):
  """One optimizer step on a global batch.

  Returns `(new_state, metrics)`; metrics are float32 scalars with flat `group/name` names. A
  non-finite loss or gradient leaves the state unchanged (the update is skipped) and sets
  `train/nonfinite` = 1, so the loop can stop naming this step with earlier checkpoints intact.
  """
  rng = None
  if cfg.lora and cfg.lora_dropout > 0:  # one key per step: resume draws the same masks
    stream = jax.random.fold_in(jax.random.key(cfg.dropout_seed), _DROPOUT_STREAM)
    rng = jax.random.fold_in(stream, state.step)
  loss, m, grads = _loss_and_grads(state.params, ref_params, batch, hparams, model, cfg, rng)
  grad_norm = _global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(  # noqa: E731
      lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                         opt_state=keep(new_opt_state, state.opt_state))
  metrics = {"loss/total": loss, "opt/grad_norm": grad_norm,
             "train/nonfinite": 1.0 - finite.astype(jnp.float32)}
  if lr_fn is not None:
    metrics["opt/lr"] = jnp.asarray(lr_fn(state.step), jnp.float32)
  metrics.update(named_metrics(m, cfg.kind))
  return new_state, metrics


def named_metrics(m: dict, kind: str) -> dict:
  """objectives' metric keys -> the flat `group/name` keys of metrics.jsonl."""
  if kind == "sft":
    return {"sft/nll": m["loss"], "data/response_tokens": m["tokens"]}
  table = {"loss": "daa/loss", "reward_acc": "daa/reward_acc", "margin": "daa/margin",
           "margin_std": "daa/margin_std", "rewards_chosen": "daa/rewards_chosen",
           "rewards_rejected": "daa/rewards_rejected", "logps_chosen": "logps/chosen",
           "logps_rejected": "logps/rejected", "ref_logps_chosen": "logps/ref_chosen",
           "ref_logps_rejected": "logps/ref_rejected"}
  return {table.get(k, "daa/" + k): v for k, v in m.items() if k != "per_pair"}


def eval_step(params, ref_params, batch, hparams, *, model, cfg: StepConfig):
  """Held-out DAA metrics without gradients or donation; per-pair values for diagnostics.

  Returns `(loss, metrics)` where `metrics['per_pair']` holds `[B]` arrays (implicit rewards,
  log-ratios, lengths, losses) and `policy_logps`/`ref_logps` `[B,2]`.
  """
  policy = pair_logps(*_policy(model, params, ref_params, cfg), batch, cfg.logps_chunk,
                      cfg.packing)
  ref = _reference_logps(model, ref_params, batch, cfg, policy)
  loss, metrics = objectives.compute_loss(cfg.objective, policy, ref, batch["lengths"],
                                          normalize=cfg.normalize, **hparams)
  metrics = dict(metrics)
  metrics["policy_logps"] = policy
  metrics["ref_logps"] = ref
  return loss, metrics
