"""Layers every model family shares: rotary embeddings (with HF's rope scaling), LayerNorm
and RMSNorm, the 2-D dense layer, activations, and attention with the KV cache, grouped
query heads, soft-capping and the implementation switch (`heads_first_layout` /
`attention_core`).

Axis letters: B batch, T new tokens, S keys (cache slots), D embed, H query heads, G
key/value heads, K head dim, R rotary dims, F mlp. Only logical axis names appear here
(`models/sharding.py` maps them onto the mesh).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.models import attention as attention_lib
from daa_jax.models import gpu_flash
from daa_jax.models import splash as splash_lib
from daa_jax.models.config import ModelConfig

Array = jax.Array

INIT_STD = 0.02  # HF `initializer_range` of every supported family.


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
  """Float32 inverse frequencies, with HF's rope scaling (`rope_scaling` type): [R/2], or
  [B,L,R/2] (one set per token) for dynamic.

  linear: positions / factor. llama3: low frequencies / factor, high ones kept, a smooth
  ramp between (Llama 3.1/3.2). dynamic (NTK): a token at position p is rotated with the
  base of length `max(p + 1, max_position_embeddings)`, the length at which it is generated.
  That is causal and per token, so a sequence sampled with the KV cache is scored by teacher
  forcing with the rotations it was sampled with, and a row does not depend on its batch;
  it equals transformers' cached decoding one token at a time, and its teacher-forced
  forward up to `max_position_embeddings` (past it, transformers rotates every token with
  the base of the batch's longest position, so a token's probability there depends on the
  tokens after it).
  """
  dim = config.rotary_dim
  base = jnp.float32(config.rotary_emb_base)
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  scaling = dict(config.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "dynamic":
    max_pos = config.max_position_embeddings
    seq = jnp.maximum(positions.astype(jnp.float32) + 1, max_pos)[..., None]  # [B,L,1]
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

  With LoRA adapters given as the 'lora' collection (`a` [in, r], `b` [r, out], `b` already
  scaled by alpha/rank: `models/lora.py`'s `with_adapters`), the layer computes PEFT's
  activation-level form `x@W + dropout(x)@a@b`: inverted dropout at rate `lora_dropout` on
  the adapter's input only, one mask per module and call from the 'dropout' rng (none
  without that rng). The kept mask is sown as 'intermediates'/'lora_keep' for tests.
  """
  lora_dropout: float = 0.0

  def __call__(self, inputs: Array) -> Array:
    lead = inputs.shape[:-1]
    x = inputs.reshape((-1, inputs.shape[-1]))
    out = super().__call__(x)
    if self.has_variable("lora", "a"):
      out = out + self._adapter(x).astype(out.dtype)
    return out.reshape(lead + (out.shape[-1],))

  def _adapter(self, x: Array) -> Array:
    a, b = self.get_variable("lora", "a"), self.get_variable("lora", "b")
    rate = float(self.lora_dropout)
    if rate > 0.0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
      self.sow("intermediates", "lora_keep", keep)
      x = jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
    dt = self.dtype or x.dtype
    return jnp.dot(jnp.dot(x.astype(dt), a.astype(dt)), b.astype(dt))


def dense(features: int, names: tuple[str, str], use_bias: bool, cfg: ModelConfig,
          name: str | None) -> nn.Dense:
  return _Dense(
      features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      kernel_init=init(names), bias_init=init(names[1:], nn.initializers.zeros),
      lora_dropout=cfg.lora_dropout)


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
  blocks. 'gpu_flash' (models/gpu_flash.py) takes [B,T,H,K] too: jax's Triton kernel's layout.
  """
  return (kv is not None or config.attention_impl in ("xla", "blockwise", "splash")
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
      if not isinstance(mask, splash_lib.SplashMasks):  # splash: a prefill sees its own keys
        k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)  # [B,G,S,K]
    # 'blockwise' (daa_jax/attention.py): the same function one key block at a time, without
    # the [B,H,T,S] float32 logits; used without a cache (decoding is one query).
    fn = attention_lib.attend if config.attention_impl == "blockwise" and kv is None else attend
    if isinstance(mask, splash_lib.SplashMasks):  # 'splash' without a cache (models/splash.py)
      fn = functools.partial(splash_lib.attend, fit=fit_spec_to_shape)
    out = fn(q, k, v, mask, scale, config.attn_logit_softcapping)  # [B,H,T,K]
    out = constrain(out, act).transpose(0, 2, 1, 3)  # [B,T,H,K]
  else:
    act = ("act_batch", "act_len", "act_heads", "act_kv")
    q, k, v = (constrain(a, act) for a in (q, k, v))
    if isinstance(mask, gpu_flash.FlashMasks):  # 'gpu_flash' without a cache
      out = constrain(gpu_flash.attend(q, k, v, mask, scale, fit=fit_spec_to_shape), act)
    else:
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
  if isinstance(masks, splash_lib.SplashMasks):  # the layer's kernel: models/splash.py
    return masks.replace(sliding=sliding) if masks.window else masks
  if isinstance(masks, gpu_flash.FlashMasks):  # no window: gpu_flash.check_window
    return masks
  full, window = masks
  if window is None:
    return full
  if isinstance(sliding, (bool, np.bool_)):
    return window if sliding else full
  return jnp.where(sliding, window, full)
