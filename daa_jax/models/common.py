"""What every model family shares beyond its layers: the `CausalLM` base (masks,
positions, the KV cache, the layer stack with scan and remat) and the family registry.

A family (`gpt_neox.py`, `llama.py`, `gemma2.py`) subclasses `CausalLM`, names its modules
as its Hugging Face checkpoint does (building them from `layers.py`) and implements three
hooks: `_embed`, `_final_norm`, `_logits`. `CausalLM(config)` hands over to the family's
class (`FAMILIES[config.model_type]`), so callers never name a family.

Axis letters: B batch, L length, T new tokens (decoding), S cache slots, D embed, G
key/value heads, K head dim, R rotary dims, V vocab, N layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.models.config import ModelConfig
from daa_jax.models import gpu_flash
from daa_jax.models import registry
from daa_jax.models import splash as splash_lib
from daa_jax.models.layers import constrain, rotary_cos_sin

Array = jax.Array
Cache = dict[str, Any]


# --- Masks and positions ---------------------------------------------------------------


def self_mask(valid: Array, positions: Array | None, segment_ids: Array | None,
              shared_segment: int | None = None, window: int = 0):
  """Masks ([B,1,L,L] full, [B,1,L,L] sliding-window or None) and positions [B,L] for a
  forward without cache.

  The window counts positions, not slots: a key is seen when `q_pos - k_pos < window`. For
  contiguous rows (left padding included) that is HF's slot rule; in packed rows it is the
  rule of the unpacked rows, so packing stays exact.
  """
  b, l = valid.shape
  slot = jnp.arange(l)
  mask = (slot[None, :, None] >= slot[None, None, :]) & valid[:, None, :]  # [B,L,L]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if shared_segment is not None:
      same |= (segment_ids == shared_segment)[:, None, :]
    mask &= same
  if positions is None and shared_segment is not None:
    # A token's position is the number of real tokens it sees before itself.
    positions = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
  # Let every query see itself: padding queries would otherwise have no key at all, a
  # NaN in some fused kernels. Real queries always see themselves anyway.
  diag = (slot[:, None] == slot[None, :])[None]
  mask |= diag
  if positions is None:
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # real tokens up to and incl. t
    if segment_ids is not None:
      # Subtract the count before the segment's first token (running max over starts).
      starts = jnp.concatenate(
          [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      before = jnp.where(starts, count - valid.astype(jnp.int32), 0)
      count = count - jax.lax.cummax(before, axis=1)
    positions = jnp.maximum(count - 1, 0)
  sliding = None
  if window:
    near = positions[:, :, None] - positions[:, None, :] < window
    sliding = ((mask & near) | diag)[:, None]
  return (mask[:, None], sliding), positions


def cache_mask(valid: Array, positions: Array | None, cache: Cache, window: int = 0):
  """Masks ([B,1,T,S] full and sliding-window or None), positions [B,T] and the cache with
  the new tokens' validity written. The window counts slots (HF's rule; rows in the cache
  are contiguous)."""
  b, t = valid.shape
  index = cache["index"]
  if positions is None:
    seen = jnp.sum(cache["mask"].astype(jnp.int32), axis=1, keepdims=True)  # [B,1]
    positions = jnp.maximum(seen + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
  key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, index))  # [B,S]
  q_slot = index + jnp.arange(t)  # [T]
  k_slot = jnp.arange(key_valid.shape[1])  # [S]
  mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & key_valid[:, None, :]
  diag = (k_slot[None, :] == q_slot[:, None])[None]
  mask |= diag  # as in `self_mask`
  sliding = None
  if window:
    near = (q_slot[:, None] - k_slot[None, :] < window)[None]
    sliding = ((mask & near) | diag)[:, None]
  return (mask[:, None], sliding), positions, {**cache, "mask": key_valid}


# --- The model -------------------------------------------------------------------------


REMAT_POLICIES = {
    "full": None,  # save nothing; recompute the whole layer.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class CausalLM(nn.Module):
  """The one decoder entry: `CausalLM(config)` is the family's module for `config`.

  Params are `config.param_dtype` (float32); activations and returned logits are
  `config.dtype`. Callers take log_softmax in float32 (`logits.astype(jnp.float32)`).

  A family subclass builds, in `setup`, its embedding, `self.layers =
  self.make_layers(Block)` and its final norm and head under HF's names, and implements
  `_embed`, `_final_norm` and `_logits`. Its `Block` is called as
  `block(x, masks, cos, sin, kv, index, sliding) -> (x, kv)`.
  """
  config: ModelConfig

  def __new__(cls, *args, **kwargs):
    if cls is CausalLM:
      config = args[0] if args else kwargs["config"]
      cls = registry.family_of(config).module
    return super().__new__(cls)

  def make_layers(self, block: type[nn.Module]):
    cfg = self.config
    if cfg.remat_policy != "none":
      # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      return nn.scan(
          block, variable_axes={"params": 0, "lora": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
          length=cfg.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    return [block(cfg) for _ in range(cfg.num_hidden_layers)]  # layers_0, ...

  def _embed(self, tokens: Array) -> Array:
    raise NotImplementedError

  def _final_norm(self, x: Array) -> Array:
    raise NotImplementedError

  def _logits(self, hidden: Array) -> Array:
    raise NotImplementedError

  def logits_from_hidden(self, hidden: Array) -> Array:
    """[..., D] final hidden states -> [..., V] logits in `config.dtype`."""
    # The family's `_logits`: callers pass `method=CausalLM.logits_from_hidden`, the base
    # class's function, so the override point is a separate name.
    return self._logits(hidden)

  def __call__(self, tokens: Array, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               cache: Cache | None = None, shared_segment: int | None = None,
               layout: tuple[int, int] | None = None, prefill: bool = False):
    """Next-token logits.

    Args:
      tokens: [B,L] int32.
      attention_mask: [B,L], 1 for real tokens, 0 for padding (HF convention). Default all 1.
      positions: [B,L] int32 rotary positions. Default: the count of real tokens before each
        token (within its segment when `segment_ids` is given; after the cached ones when
        `cache` is given), so left-padded rows get 0, 1, ... from their first real token.
      segment_ids: [B,L] int32; with packed rows a token attends only to earlier tokens of
        the same segment id. Not supported together with `cache`.
      cache: from `init_cache`; then L new tokens are written at `cache['index']` and
        attend to every valid cached token plus, causally, each other.
      shared_segment: with `segment_ids`, the id of a segment whose tokens every later
        token sees as well as its own segment, e.g. the prompt of `train/packing.py`'s
        `[prompt | chosen | rejected]` rows. The default positions then continue after the
        shared tokens a token sees (both responses start where the prompt ends).
      layout: static `(P, R)` of `train/fixed_layout.py`'s rows `[prompt P | chosen R |
        rejected R]` (with `segment_ids`, `shared_segment`): the same function; it lets
        `attention_impl='splash'` use one static mask for every row.
      prefill: static; the `cache` is fresh (`init_cache`, index 0) and the tokens are the
        whole prompts, so they attend only to each other: `attention_impl='splash'` then runs
        the prefill through its kernel (causal + padding, windows) while filling the cache.

    Returns:
      logits [B,L,V] in `config.dtype`; with `cache`, `(logits, new_cache)`.
    """
    hidden, new_cache = self._hidden(tokens, attention_mask, positions, segment_ids, cache,
                                     shared_segment, layout, prefill)
    logits = self.logits_from_hidden(hidden)
    return logits if cache is None else (logits, new_cache)

  def hidden_states(self, tokens: Array, attention_mask: Array | None = None,
                    positions: Array | None = None, segment_ids: Array | None = None,
                    cache: Cache | None = None, shared_segment: int | None = None,
                    layout: tuple[int, int] | None = None, prefill: bool = False):
    """Like `__call__` but returns the final (post final norm) hidden states [B,L,D].

    Use with `model.apply(..., method=CausalLM.hidden_states)`, e.g. for a reward head or to
    chunk the vocab projection through `CausalLM.logits_from_hidden`.
    """
    hidden, new_cache = self._hidden(tokens, attention_mask, positions, segment_ids, cache,
                                     shared_segment, layout, prefill)
    return hidden if cache is None else (hidden, new_cache)

  def _hidden(self, tokens, attention_mask, positions, segment_ids, cache, shared_segment,
              layout=None, prefill=False):
    cfg = self.config
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    valid = attention_mask.astype(bool)  # [B,T]
    if shared_segment is not None and segment_ids is None:
      raise ValueError("shared_segment needs segment_ids.")
    sliding = cfg.sliding_layers
    window = cfg.sliding_window if any(sliding) else 0
    if cache is None:
      masks, positions = self_mask(valid, positions, segment_ids, shared_segment, window)
      if cfg.attention_impl == "splash":  # the dense masks above are then dead code
        masks = splash_lib.make_masks(cfg, valid, segment_ids, shared_segment, layout)
      elif cfg.attention_impl == "gpu_flash":  # segment ids carry the fixed layout too
        masks = gpu_flash.make_masks(cfg, valid, segment_ids, shared_segment)
      index = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a KV cache.")
      masks, positions, cache = cache_mask(valid, positions, cache, window)
      if prefill and cfg.attention_impl == "splash":  # the prompts see only each other
        masks = splash_lib.make_masks(cfg, valid, None, None, None)
      index = cache["index"]
    cos, sin = rotary_cos_sin(positions, cfg)  # [B,T,R]

    x = self._embed(tokens.astype(jnp.int32))  # [B,T,D]
    x = constrain(x, ("act_batch", "act_len", "act_embed"))
    new_cache = None if cache is None else {"mask": cache["mask"], "index": index + t}
    if cfg.scan_layers:
      kv = None if cache is None else cache["layers"]
      x, kv = self.layers(x, masks, cos, sin, kv, index, jnp.asarray(sliding, bool))
      if cache is not None:
        new_cache["layers"] = kv
    else:
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else cache[f"layers_{i}"]
        x, kv = layer(x, masks, cos, sin, kv, index, sliding[i])
        if cache is not None:
          new_cache[f"layers_{i}"] = kv
    return self._final_norm(x), new_cache


# --- Helpers ---------------------------------------------------------------------------


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache, a plain pytree laid out like the params.

  Writing past `max_len` is not detected under jit (`dynamic_update_slice` clamps the
  start); size the cache for prompt plus generation.

  Args:
    config: the model config (its `scan_layers` decides the layout; `kv_heads` and
      `head_dim` the per-layer shape).
    batch_size: B.
    max_len: S, prompt plus generated tokens.
    dtype: cache dtype; default `config.dtype`.

  Returns:
    {'layers_i': {'k', 'v': [B,G,S,K]}} (or {'layers': {'k', 'v': [N,B,G,S,K]}} with
    scan_layers), plus 'mask' [B,S] bool (which slots hold real tokens) and 'index' int32
    scalar (the next slot to write).
  """
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch_size, config.kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    shape = (config.num_hidden_layers,) + shape
  def kv():
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  cache = {"mask": jnp.zeros((batch_size, max_len), bool), "index": jnp.zeros((), jnp.int32)}
  if config.scan_layers:
    cache["layers"] = kv()
  else:
    cache.update({f"layers_{i}": kv() for i in range(config.num_hidden_layers)})
  return cache


def _dummy_tokens():
  return jnp.zeros((1, 1), jnp.int32)


def abstract_params(config: ModelConfig, boxed: bool = False):
  """ShapeDtypeStructs of the params (boxed: with `nn.LogicallyPartitioned` metadata)."""
  def init_fn(rng):
    params = CausalLM(config).init(rng, _dummy_tokens())["params"]
    return params if boxed else nn.unbox(params)
  return jax.eval_shape(init_fn, jax.random.key(0))


def init_params(config: ModelConfig, rng: Array):
  """Fresh float32 params (HF's init: normal(0.02) weights, zero biases), unboxed."""
  # Jitted: op-by-op init compiles every small op separately, which is slower even on CPU.
  return jax.jit(lambda r: nn.unbox(CausalLM(config).init(r, _dummy_tokens())["params"]))(rng)


def param_count(params) -> int:
  """Number of scalars in a params tree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))


def to_scan_layout(params, num_layers: int):
  """`layers_0..N-1` subtrees -> one `layers` subtree with a leading [N] axis."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  stack = np.stack if isinstance(jax.tree_util.tree_leaves(per_layer[0])[0],
                                 np.ndarray) else jnp.stack
  params["layers"] = jax.tree_util.tree_map(lambda *xs: stack(xs), *per_layer)
  return params


def from_scan_layout(params, num_layers: int):
  """One `layers` subtree with a leading [N] axis -> `layers_0..N-1` subtrees."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree_util.tree_map(functools.partial(lambda i, x: x[i], i),
                                                   stacked)
  return params
