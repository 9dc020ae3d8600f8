"""What every model family shares: the `CausalLM` base, attention with the KV cache and
`shared_segment` packing, masks and positions, rotary embeddings, norms, scan/remat.

A family (`gpt_neox.py`, `llama.py`, `gemma2.py`) subclasses `CausalLM`, names its modules
as its Hugging Face checkpoint does and implements three hooks: `_embed`, `_final_norm`,
`_logits`. Everything else (masks, positions, the cache, the layer stack with
scan and remat) is here, written once. `CausalLM(config)` hands over to the family's class
(`FAMILIES[config.model_type]`), so callers never name a family.

Axis letters: B batch, L length, T new tokens (decoding), S cache slots, D embed, H query
heads, G key/value heads, K head dim, R rotary dims, F mlp, V vocab, N layers.

Only logical axis names appear here (`sharding.py` maps them onto the mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.config_lib import ModelConfig
from daa_jax.errors import ConfigError

Array = jax.Array
Cache = dict[str, Any]

INIT_STD = 0.02  # HF `initializer_range` of every supported family.


# --- The family registry ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
  """What daa_jax needs to know about one model family, beyond its Linen modules.

  Attributes:
    module: the `CausalLM` subclass.
    model_types: HF `model_type`s it loads (e.g. llama, mistral, qwen2).
    config_from_hf: HF config.json dict -> `ModelConfig` keyword arguments.
    config_to_hf: `ModelConfig` -> HF config.json dict (with `model_type`, `architectures`).
    hf_names: config -> {our non-scan param path: HF tensor name as on the hub}.
    canonical: a tensor name as found in a checkpoint -> the hub name (prefix variants).
    ignored: config -> predicate on hub names that are skipped when loading (buffers,
      a stored copy of tied weights).
    aliases: config -> {hub name: hub name to use when the first is missing} (tied copies).
    mlp_matrices: matmuls in one MLP (2 for GELU, 3 for gated GLU): FLOP accounting.
  """

  module: type
  model_types: tuple[str, ...]
  config_from_hf: Callable[[dict], dict]
  config_to_hf: Callable[[ModelConfig], dict]
  hf_names: Callable[[ModelConfig], dict]
  canonical: Callable[[str], str] = lambda name: name
  ignored: Callable[[ModelConfig], Callable[[str], bool]] = lambda cfg: lambda name: False
  aliases: Callable[[ModelConfig], dict] = lambda cfg: {}
  mlp_matrices: int = 2


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  for model_type in family.model_types:
    FAMILIES[model_type] = family
  return family


def family_of(config: ModelConfig) -> Family:
  if config.model_type not in FAMILIES:
    raise ConfigError(
        f"config.model.model_type={config.model_type!r} is not supported; supported: "
        f"{', '.join(sorted(FAMILIES))}.")
  return FAMILIES[config.model_type]


# --- Sharding helpers (logical names only) ---------------------------------------------


def fit_spec_to_shape(spec: Sequence[Any], shape: Sequence[int], mesh_shape: dict[str, int],
                      units: Sequence[int] | None = None) -> tuple:
  """Drops mesh axes that do not divide the dimension they shard.

  jit refuses arrays whose dimension is not a multiple of its mesh axes' product (odd test
  sizes, 12 heads on 8-way tensor parallelism). Replicating that one dimension is still
  correct, only less memory-efficient, so we keep the longest prefix of the dimension's mesh
  axes whose product divides it.

  Args:
    spec: one entry per dimension: None, a mesh axis name or a tuple of names.
    shape: the array's shape.
    mesh_shape: mesh axis name -> size.
    units: per dimension, the size of one indivisible unit (e.g. K for a [D, G*K] key
      projection: a head is never split); the dimension's unit count must divide. Default 1.

  Returns:
    A tuple usable as `jax.sharding.PartitionSpec(*result)`.
  """
  units = tuple(units or ()) + (1,) * (len(shape) - len(tuple(units or ())))
  fitted = []
  for dim, unit, axes in zip(shape, units, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for name in names:
      if dim % unit or (dim // unit) % (size * mesh_shape[name]):
        break
      size *= mesh_shape[name]
      kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return tuple(fitted)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  """`nn.with_logical_constraint` that skips mesh axes not dividing `x`'s dims.

  A no-op unless logical axis rules and a mesh are active (`sharding.activate`).
  """
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  spec = tuple(nn.logical_to_mesh_axes(names, rules))
  fitted = fit_spec_to_shape(spec, x.shape, dict(mesh.shape))
  if fitted == spec:
    return nn.with_logical_constraint(x, names)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*fitted))


def init(names: tuple[str, ...], initializer=nn.initializers.normal(INIT_STD)):
  return nn.with_logical_partitioning(initializer, names)


# --- Rotary embedding ------------------------------------------------------------------


def rotary_inv_freq(config: ModelConfig, positions: Array) -> Array:
  """[R/2] float32 inverse frequencies, with HF's rope scaling (`rope_scaling` type).

  linear: positions / factor. llama3: low frequencies / factor, high ones kept, a smooth
  ramp between (Llama 3.1/3.2). dynamic (NTK): the base grows once the longest position
  in the batch passes `max_position_embeddings` (what a freshly loaded HF model does).
  """
  dim = config.rotary_dim
  base = jnp.float32(config.rotary_emb_base)
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  scaling = dict(config.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "dynamic":
    max_pos = config.max_position_embeddings
    seq = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1, max_pos)
    factor = scaling["factor"]
    base = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
  inv_freq = 1.0 / (base ** exponents)
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def rotary_cos_sin(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
  """cos/sin tables of HF rotary embeddings, in float32.

  Computed in float32 from explicit positions: bf16 cannot represent positions above 256
  exactly, and the angles grow with position.

  Args:
    positions: [B,L] integer positions.
    config: gives R (`rotary_dim`), the base and the rope scaling.

  Returns:
    (cos, sin), each [B,L,R] float32, laid out as HF's `cat((freqs, freqs), -1)`.
  """
  inv_freq = rotary_inv_freq(config, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,L,R/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B,L,R]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the first R dims of each head (HF `rotate_half` convention).

  x: [..., K] per-head vectors; cos, sin: [..., R] broadcastable to x's leading dims.
  """
  rotary_dim = cos.shape[-1]
  if rotary_dim == 0:
    return x
  x_rot = x[..., :rotary_dim].astype(jnp.float32)
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x_rot * cos + rotated * sin
  if rotary_dim == x.shape[-1]:
    return out.astype(x.dtype)
  return jnp.concatenate([out.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


# --- Norms and dense layers ------------------------------------------------------------


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics; params `scale`, `bias` (HF `weight`, `bias`)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    pdt = self.config.param_dtype
    scale = self.param("scale", init(("norm",), nn.initializers.ones), (d,), pdt)
    bias = self.param("bias", init(("norm",), nn.initializers.zeros), (d,), pdt)
    # float32 statistics: the variance of a bf16 residual stream loses most of its digits.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.config.layer_norm_eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.config.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with float32 statistics; param `scale` (HF `weight`).

  `plus_one` (Gemma): the weight is stored centred on 0 and applied as `1 + weight`, in
  float32 before the cast back; Llama multiplies by the weight after the cast.
  """
  config: ModelConfig
  plus_one: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    init_fn = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", init(("norm",), init_fn), (d,), self.config.param_dtype)
    # float32 statistics, as for LayerNorm.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
                            + self.config.layer_norm_eps)
    if self.plus_one:
      return (y * (1.0 + scale.astype(jnp.float32))).astype(self.config.dtype)
    return scale.astype(self.config.dtype) * y.astype(self.config.dtype)


class _Dense(nn.Dense):
  """`nn.Dense` applied to `x` flattened to 2-D `[prod(lead), in]` (same params).

  A [B,L,D] input makes the kernel gradient a contraction over two dims, which XLA:CPU runs
  ~2.5x slower than the one GEMM of the flattened input (measured at [8,384,512] x [512,2048]
  fwd+bwd: 0.120 s vs 0.049 s; the whole Pythia-70m DAA step 1.4x faster). The reshape is a
  free bitcast on every backend.
  """

  def __call__(self, inputs: Array) -> Array:
    lead = inputs.shape[:-1]
    out = super().__call__(inputs.reshape((-1, inputs.shape[-1])))
    return out.reshape(lead + (out.shape[-1],))


def dense(features: int, names: tuple[str, str], use_bias: bool, cfg: ModelConfig,
          name: str | None) -> nn.Dense:
  return _Dense(
      features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      kernel_init=init(names), bias_init=init(names[1:], nn.initializers.zeros))


def activation(name: str, x: Array) -> Array:
  if name == "gelu":
    return nn.gelu(x, approximate=False)  # Pythia: exact erf GELU.
  if name == "relu":
    return nn.relu(x)
  if name == "silu":
    return nn.silu(x)
  return nn.gelu(x, approximate=True)  # gelu_new / gelu_fast / gelu_pytorch_tanh


# --- Attention -------------------------------------------------------------------------


def heads_first_layout(config: ModelConfig, kv) -> bool:
  """Whether attention runs with heads next to batch ([B,H,T,K]) or after length.

  'xla', soft-capping and the KV cache run `attend` with heads next to batch: QK^T and PV
  are then batched GEMMs over (B,H) whose operands need no transposes, forward or backward,
  and the cache is read in place when decoding. (jax.nn.dot_product_attention's 'xla' path
  takes [B,T,H,K] and transposes inside: on CPU its attention backward took 1.7x as long,
  Pythia-70m on 8 packed rows of 384 tokens.) 'cudnn' or jax's own choice go to
  jax.nn.dot_product_attention in [B,T,H,K]; its logits and softmax are float32 for bf16
  inputs too. The boolean mask (causal + padding + segments + window) is general; 'cudnn'
  turns it into a dense additive bias, so it is correct there but does not skip masked
  blocks.
  """
  return (kv is not None or config.attention_impl == "xla"
          or config.attn_logit_softcapping > 0)


def attention_core(config: ModelConfig, q: Array, k: Array, v: Array, mask: Array,
                   kv: dict[str, Array] | None, index: Array | None, heads_first: bool,
                   scale: float):
  """Scaled dot-product attention over the block itself or the KV cache.

  Args:
    config: the model config (attention_impl, soft-capping).
    q: [B,H,T,K] if `heads_first` else [B,T,H,K], rotated.
    k, v: [B,G,T,K] / [B,T,G,K] likewise; H is a multiple of G (grouped-query attention:
      query head h reads key/value head h // (H/G), as HF's `repeat_kv`).
    mask: [B,1,T,S] bool, True where query t may attend key s (S = T without a cache).
    kv: None, or this layer's cache {'k','v'}: [B,G,S,K] (needs `heads_first`).
    index: int32 scalar, the cache slot of the first new token (with `kv`).
    heads_first: the layout, from `heads_first_layout`.
    scale: multiplies the logits (HF `scaling`; 1/sqrt(K) unless the family says otherwise).

  Returns:
    ([B,T,H*K] output, updated kv or None).
  """
  if heads_first:
    act = ("act_batch", "act_heads", "act_len", "act_kv")
    q, k, v = (constrain(a, act) for a in (q, k, v))
    if kv is not None:
      start = (0, 0, index, 0)
      kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start),
            "v": jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)}
      k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)  # [B,G,S,K]
    out = attend(q, k, v, mask, scale, config.attn_logit_softcapping)  # [B,H,T,K]
    out = constrain(out, act).transpose(0, 2, 1, 3)  # [B,T,H,K]
  else:
    act = ("act_batch", "act_len", "act_heads", "act_kv")
    q, k, v = (constrain(a, act) for a in (q, k, v))
    impl = None if config.attention_impl in (None, "auto", "none") else config.attention_impl
    out = constrain(jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                                 implementation=impl), act)
  b, t = out.shape[:2]
  return out.reshape(b, t, -1), kv


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float | None = None,
           softcap: float = 0.0) -> Array:
  """Softmax attention. q [B,H,T,K]; k, v [B,G,S,K]; mask [B,1,T,S] bool -> [B,H,T,K].

  The arithmetic of `jax.nn.dot_product_attention`'s 'xla' implementation: float32 logits
  (also for bf16 inputs) times `scale` (default 1/sqrt(K)), soft-capped as
  `cap * tanh(logits / cap)` when `softcap` > 0 (Gemma-2), masked at the float32 minimum,
  float32 softmax.
  """
  h, g = q.shape[1], k.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if h == g:
    logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
  else:  # grouped: [B,G,H/G,T,K] queries against their group's key
    b, _, t, kd = q.shape
    qg = q.reshape(b, g, h // g, t, kd)
    logits = jnp.einsum("bgrtk,bgsk->bgrts", qg, k, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, h, t, -1)
  logits = logits * jnp.float32(scale)
  if softcap > 0:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  if h == g:
    return jnp.einsum("bhts,bhsk->bhtk", probs, v)
  b, _, t, s = probs.shape
  out = jnp.einsum("bgrts,bgsk->bgrtk", probs.reshape(b, g, h // g, t, s), v)
  return out.reshape(b, h, t, -1)


def layer_mask(masks: tuple[Array, Array | None], sliding) -> Array:
  """The mask of one layer: the sliding-window one where `sliding` (bool, traced under
  scan), else the full causal one."""
  full, window = masks
  if window is None:
    return full
  if isinstance(sliding, (bool, np.bool_)):
    return window if sliding else full
  return jnp.where(sliding, window, full)


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
      cls = family_of(config).module
    return super().__new__(cls)

  def make_layers(self, block: type[nn.Module]):
    cfg = self.config
    if cfg.remat_policy != "none":
      # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      return nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
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
               cache: Cache | None = None, shared_segment: int | None = None):
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
        token sees as well as its own segment, e.g. the prompt of `packing.py`'s
        `[prompt | chosen | rejected]` rows. The default positions then continue after the
        shared tokens a token sees (both responses start where the prompt ends).

    Returns:
      logits [B,L,V] in `config.dtype`; with `cache`, `(logits, new_cache)`.
    """
    hidden, new_cache = self._hidden(tokens, attention_mask, positions, segment_ids, cache,
                                     shared_segment)
    logits = self.logits_from_hidden(hidden)
    return logits if cache is None else (logits, new_cache)

  def hidden_states(self, tokens: Array, attention_mask: Array | None = None,
                    positions: Array | None = None, segment_ids: Array | None = None,
                    cache: Cache | None = None, shared_segment: int | None = None):
    """Like `__call__` but returns the final (post final norm) hidden states [B,L,D].

    Use with `model.apply(..., method=CausalLM.hidden_states)`, e.g. for a reward head or to
    chunk the vocab projection through `CausalLM.logits_from_hidden`.
    """
    hidden, new_cache = self._hidden(tokens, attention_mask, positions, segment_ids, cache,
                                     shared_segment)
    return hidden if cache is None else (hidden, new_cache)

  def _hidden(self, tokens, attention_mask, positions, segment_ids, cache, shared_segment):
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
      index = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a KV cache.")
      masks, positions, cache = cache_mask(valid, positions, cache, window)
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
