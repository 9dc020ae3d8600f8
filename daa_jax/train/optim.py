"""Optimizers and learning-rate schedules from `config.optim`.

Two recipes:
  * `rmsprop` — the paper's DAA optimizer (likely; README, "Reproducing the paper"): RMSprop,
    lr 5e-7, linear warmup over 150 steps then constant, global-norm clipping at 10. The
    hyperparameters follow `torch.optim.RMSprop` as the original DPO code used it (decay 0.99,
    eps 1e-8 added outside the square root, no momentum) and its warmup (`schedule`), so runs
    are comparable with that code.
  * `adamw` — AdamW with linear warmup and cosine (or constant) decay, for SFT and the
    synthetic task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from daa_jax.errors import ConfigError
from daa_jax.errors import warn_misfit


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps` W, then `constant`, `cosine` or `linear`.

  The warmup is the DPO reference code's `LambdaLR(lambda s: min(1, (s + 1) / (W + 1)))`:
  update s (counted from 0) uses lr·(s + 1)/(W + 1), so the first update already moves the
  weights (lr/(W + 1)), and update W uses the full lr. A warmup that started at lr 0 would
  spend the first step on RMSprop's accumulator alone.
  """
  lr = float(optim_config.lr)
  warmup = int(optim_config.warmup_steps)
  kind = optim_config.schedule
  if kind not in ("constant", "cosine", "linear"):
    raise ConfigError(
        f"config.optim.schedule={kind!r}; use 'constant', 'cosine' or 'linear'.")
  # lr/(W+1) + (lr − lr/(W+1))·s/W = lr·(s + 1)/(W + 1) for s ≤ W.
  warm = optax.linear_schedule(lr / (warmup + 1), lr, max(warmup, 1))
  decay_steps = max(int(total_steps) - warmup, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_config.final_lr_frac))
  else:
    after = optax.linear_schedule(lr, lr * float(optim_config.final_lr_frac), decay_steps)
  if warmup <= 0:
    return after
  return optax.join_schedules([warm, after], [warmup])


def make(optim_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, lr_schedule)` for `config.optim`.

  Clipping comes first in the chain, so `grad_norm` metrics (computed by the step before the
  optimizer) are the pre-clip norms, as PyTorch's `clip_grad_norm_` reports them.
  """
  lr_fn = schedule(optim_config, total_steps)
  warmup = int(optim_config.warmup_steps)
  if warmup >= total_steps > 0:
    peak = float(lr_fn(total_steps - 1))
    warn_misfit(
        f"config.optim.warmup_steps={warmup} is not below the run's {total_steps} steps: the "
        f"learning rate never reaches config.optim.lr={float(optim_config.lr):g} (it peaks at "
        f"{peak:.3g}) and the loss will barely move. Set --config.optim.warmup_steps="
        f"{max(total_steps // 10, 0)} (about 10% of the run), or train longer "
        "(config.train.num_epochs).")
  name = optim_config.name
  if name == "rmsprop":
    core = optax.rmsprop(lr_fn, decay=float(optim_config.rms_decay), eps=float(optim_config.eps),
                         eps_in_sqrt=False)
  elif name == "adamw":
    core = optax.adamw(lr_fn, b1=float(optim_config.b1), b2=float(optim_config.b2),
                       eps=float(optim_config.eps), weight_decay=float(optim_config.weight_decay))
  elif name == "adam":
    core = optax.adam(lr_fn, b1=float(optim_config.b1), b2=float(optim_config.b2),
                      eps=float(optim_config.eps))
  elif name == "sgd":
    core = optax.sgd(lr_fn)
  else:
    raise ConfigError(
        f"config.optim.name={name!r} is unknown; use 'rmsprop' (the paper's), 'adamw', "
        "'adam' or 'sgd'.")
  parts = []
  if optim_config.grad_clip and float(optim_config.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip)))
  parts.append(core)
  tx = optax.chain(*parts)
  state_dtype = optim_config.get("state_dtype", "float32")
  if jnp.dtype(state_dtype) != jnp.float32:
    tx = with_state_dtype(tx, state_dtype)
  return tx, lr_fn


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
  """`tx` whose floating-point state arrays are stored in `dtype` (e.g. bfloat16).

  Each update upcasts the state to float32, runs `tx`, and rounds the new state back, so
  the arithmetic is float32 and only storage is narrow. Scalars (step counts) are kept.
  """
  dtype = jnp.dtype(dtype)

  def cast(tree, to):
    def one(x):
      dt = getattr(x, "dtype", None)  # optax.tree_map_params passes placeholders too
      if dt is None or not jnp.issubdtype(dt, jnp.floating) or not getattr(x, "ndim", 0):
        return x
      return x.astype(to)
    return jax.tree.map(one, tree)

  def init(params):
    return cast(tx.init(params), dtype)

  def update(updates, state, params=None):
    updates, state = tx.update(updates, cast(state, jnp.float32), params)
    return updates, cast(state, dtype)

  return optax.GradientTransformation(init, update)
