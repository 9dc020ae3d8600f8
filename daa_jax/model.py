"""GPT-NeoX (Pythia) as a Linen module, with a KV cache for decoding.

The module tree uses Hugging Face's names (`embed_in`, `layers_N.attention.query_key_value`,
...) so weight conversion is a transpose and a rename (see `hf_convert.py`). With
`config.scan_layers` the blocks are one `nn.scan` named `layers` whose params carry a leading
layer axis; `to_scan_layout` / `from_scan_layout` convert between the two layouts.

Axis letters: B batch, L length, T new tokens (decoding), S cache slots, D embed, H heads,
K head dim, R rotary dims, F mlp, V vocab, N layers.

Only logical axis names appear here: `vocab`, `embed`, `qkv`, `heads`, `mlp`, `norm`, `layers`
for weights and `act_*` for activations. `sharding.py` maps them onto the mesh.

Typical use:

  model = CausalLM(config)
  params = init_params(config, jax.random.key(0))
  logits = model.apply({'params': params}, tokens, attention_mask=mask)  # [B,L,V]

  # Decoding: prefill, then one token per step (same jitted function, two shapes).
  cache = init_cache(config, batch_size=B, max_len=P + G)
  logits, cache = model.apply({'params': params}, prompt, attention_mask=prompt_mask,
                              cache=cache)
  logits, cache = model.apply({'params': params}, next_token[:, None], cache=cache)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax import attention as attention_lib
from daa_jax.config_lib import ModelConfig

Array = jax.Array
Cache = dict[str, Any]

_INIT_STD = 0.02  # HF GPTNeoX `initializer_range`.


# --- Sharding helpers (logical names only) ---------------------------------------------


def fit_spec_to_shape(spec: Sequence[Any], shape: Sequence[int],
                      mesh_shape: dict[str, int]) -> tuple:
  """Drops mesh axes that do not divide the dimension they shard.

  jit refuses arrays whose dimension is not a multiple of its mesh axes' product (odd test
  sizes, 12 heads on 8-way tensor parallelism). Replicating that one dimension is still
  correct, only less memory-efficient, so we keep the longest prefix of the dimension's mesh
  axes whose product divides it.

  Args:
    spec: one entry per dimension: None, a mesh axis name or a tuple of names.
    shape: the array's shape.
    mesh_shape: mesh axis name -> size.

  Returns:
    A tuple usable as `jax.sharding.PartitionSpec(*result)`.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh_shape[name]):
        break
      size *= mesh_shape[name]
      kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return tuple(fitted)


def _constrain(x: Array, names: tuple[str | None, ...]) -> Array:
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


def _init(names: tuple[str, ...], init=nn.initializers.normal(_INIT_STD)):
  return nn.with_logical_partitioning(init, names)


# --- Rotary embedding ------------------------------------------------------------------


def rotary_cos_sin(positions: Array, rotary_dim: int, base: float) -> tuple[Array, Array]:
  """cos/sin tables of HF GPT-NeoX rotary embeddings, in float32.

  Computed in float32 from explicit positions: bf16 cannot represent positions above 256
  exactly, and the angles grow with position.

  Args:
    positions: [B,L] integer positions.
    rotary_dim: R, the number of rotated dims per head (even).
    base: the rotary base (`rotary_emb_base`, HF `rope_theta`).

  Returns:
    (cos, sin), each [B,L,R] float32, laid out as HF's `cat((freqs, freqs), -1)`.
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,L,R/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B,L,R]
  return jnp.cos(emb), jnp.sin(emb)


def _apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
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
  return jnp.concatenate([out.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


# --- Modules ---------------------------------------------------------------------------


class LayerNorm(nn.Module):
  """LayerNorm with float32 statistics; params `scale`, `bias` (HF `weight`, `bias`)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    pdt = self.config.param_dtype
    scale = self.param("scale", _init(("norm",), nn.initializers.ones), (d,), pdt)
    bias = self.param("bias", _init(("norm",), nn.initializers.zeros), (d,), pdt)
    # float32 statistics: the variance of a bf16 residual stream loses most of its digits.
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.config.layer_norm_eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.config.dtype)


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


def _dense(features: int, names: tuple[str, str], use_bias: bool, cfg: ModelConfig,
           name: str) -> nn.Dense:
  return _Dense(
      features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
      kernel_init=_init(names), bias_init=_init(names[1:], nn.initializers.zeros))


class Attention(nn.Module):
  """Causal self-attention with HF's fused, per-head-interleaved QKV projection."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None):
    """Attends over the block itself, or over the KV cache when `kv` is given.

    Args:
      x: [B,T,D] normalized inputs.
      mask: [B,1,T,S] bool, True where query t may attend key s (S = T without a cache).
      cos, sin: [B,T,R] float32 rotary tables.
      kv: None, or this layer's cache {'k','v'}: [B,H,S,K].
      index: int32 scalar, the cache slot of the first new token (with `kv`).

    Returns:
      ([B,T,D] output, updated kv or None).
    """
    cfg = self.config
    b, t, d = x.shape
    h, k_dim = cfg.num_attention_heads, cfg.head_dim
    qkv = _dense(3 * d, ("embed", "qkv"), cfg.attention_bias, cfg, "query_key_value")(x)
    # HF lays the 3D outputs out per head: [H, (q|k|v), K]; not [(q|k|v), H, K].
    qkv = qkv.reshape(b, t, h, 3 * k_dim)
    impl = None if cfg.attention_impl in (None, "auto", "none") else cfg.attention_impl
    # 'xla' and the KV cache run `_attend` with heads next to batch, [B,H,T,K]: QK^T and PV
    # are then batched GEMMs over (B,H) whose operands need no transposes, forward or
    # backward, and the cache is read in place when decoding. (jax.nn.dot_product_attention's
    # 'xla' path takes [B,T,H,K] and transposes inside: on CPU its attention backward took
    # 1.7x as long, Pythia-70m on 8 packed rows of 384 tokens.) 'cudnn' or jax's own choice go
    # to jax.nn.dot_product_attention in [B,T,H,K]; its logits and softmax are float32 for
    # bf16 inputs too. The boolean mask (causal + padding + segments) is general; 'cudnn' turns
    # it into a dense additive bias, so it is correct there but does not skip masked blocks.
    heads_first = kv is not None or impl in ("xla", "blockwise")
    if heads_first:
      qkv = qkv.transpose(0, 2, 1, 3)  # [B,H,T,3K]
      cos, sin = cos[:, None], sin[:, None]  # [B,1,T,R]
      act = ("act_batch", "act_heads", "act_len", "act_kv")
    else:
      cos, sin = cos[:, :, None], sin[:, :, None]  # [B,T,1,R]
      act = ("act_batch", "act_len", "act_heads", "act_kv")
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    q, k, v = (_constrain(a, act) for a in (q, k, v))
    if not heads_first:
      out = _constrain(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl),
                       act)
    else:
      if kv is not None:
        start = (0, 0, index, 0)
        kv = {"k": jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), start),
              "v": jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), start)}
        k, v = kv["k"].astype(q.dtype), kv["v"].astype(q.dtype)  # [B,H,S,K]
      # 'blockwise' (daa_jax/attention.py): the same function one key block at a time,
      # without the [B,H,T,S] float32 logits; used without a cache (decoding is one query).
      attend = attention_lib.attend if impl == "blockwise" and kv is None else _attend
      out = attend(q, k, v, mask)  # [B,H,T,K]
      out = _constrain(out, act).transpose(0, 2, 1, 3)  # [B,T,H,K]
    out = out.reshape(b, t, d)
    out = _dense(d, ("heads", "embed"), cfg.attention_bias, cfg, "dense")(out)
    return out, kv


def _attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Softmax attention. q [B,H,T,K]; k, v [B,H,S,K]; mask [B,1,T,S] bool -> [B,H,T,K].

  The arithmetic of `jax.nn.dot_product_attention`'s 'xla' implementation: float32 logits
  (also for bf16 inputs) scaled by 1/sqrt(K), masked at the float32 minimum, float32 softmax.
  """
  logits = jnp.einsum("bhtk,bhsk->bhts", q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(q.shape[-1] ** -0.5)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bhsk->bhtk", probs, v)


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    y = _dense(cfg.intermediate_size, ("embed", "mlp"), True, cfg, "dense_h_to_4h")(x)
    y = _constrain(y, ("act_batch", "act_len", "act_mlp"))  # [B,L,F]
    if cfg.hidden_act == "gelu":
      y = nn.gelu(y, approximate=False)  # Pythia: exact erf GELU.
    elif cfg.hidden_act == "relu":
      y = nn.relu(y)
    else:  # gelu_new / gelu_fast / gelu_pytorch_tanh: the tanh approximation.
      y = nn.gelu(y, approximate=True)
    return _dense(cfg.hidden_size, ("mlp", "embed"), True, cfg, "dense_4h_to_h")(y)


class Block(nn.Module):
  """One GPT-NeoX layer. Call signature is scan-friendly: (carry, *broadcast/scanned)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None):
    cfg = self.config
    attn, kv = Attention(cfg, name="attention")(
        LayerNorm(cfg, name="input_layernorm")(x), mask, cos, sin, kv, index)
    mlp, post_ln = Mlp(cfg, name="mlp"), LayerNorm(cfg, name="post_attention_layernorm")
    if cfg.use_parallel_residual:
      x = x + attn + mlp(post_ln(x))
    else:
      x = x + attn
      x = x + mlp(post_ln(x))
    return _constrain(x, ("act_batch", "act_len", "act_embed")), kv


_REMAT_POLICIES = {
    "full": None,  # save nothing; recompute the whole layer.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class CausalLM(nn.Module):
  """Pythia: `embed_in` -> N blocks -> `final_layer_norm` -> untied `embed_out`.

  Params are `config.param_dtype` (float32); activations and returned logits are
  `config.dtype`. Callers take log_softmax in float32 (`logits.astype(jnp.float32)`).
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed_in = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_init(("vocab", "embed")))
    block = Block
    if cfg.remat_policy != "none":
      # Under scan, CSE across iterations cannot happen, so prevent_cse only costs speed.
      block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy],
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
          length=cfg.num_hidden_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]  # layers_0, ...
    self.final_layer_norm = LayerNorm(cfg)
    self.embed_out = _dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, None)

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
    """Like `__call__` but returns the final (post `final_layer_norm`) hidden states [B,L,D].

    Use with `model.apply(..., method=CausalLM.hidden_states)`, e.g. for a reward head or to
    chunk the vocab projection through `CausalLM.logits_from_hidden`.
    """
    hidden, new_cache = self._hidden(tokens, attention_mask, positions, segment_ids, cache,
                                     shared_segment)
    return hidden if cache is None else (hidden, new_cache)

  def logits_from_hidden(self, hidden: Array) -> Array:
    """[..., D] final hidden states -> [..., V] logits in `config.dtype`."""
    logits = self.embed_out(hidden)
    if logits.ndim == 3:
      logits = _constrain(logits, ("act_batch", "act_len", "act_vocab"))
    return logits

  def _hidden(self, tokens, attention_mask, positions, segment_ids, cache, shared_segment):
    cfg = self.config
    b, t = tokens.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    valid = attention_mask.astype(bool)  # [B,T]
    if shared_segment is not None and segment_ids is None:
      raise ValueError("shared_segment needs segment_ids.")
    if cache is None:
      mask, positions = _self_mask(valid, positions, segment_ids, shared_segment)
      index = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids cannot be combined with a KV cache.")
      mask, positions, cache = _cache_mask(valid, positions, cache)
      index = cache["index"]
    cos, sin = rotary_cos_sin(positions, cfg.rotary_dim, cfg.rotary_emb_base)  # [B,T,R]

    x = self.embed_in(tokens.astype(jnp.int32))  # [B,T,D]
    x = _constrain(x, ("act_batch", "act_len", "act_embed"))
    new_cache = None if cache is None else {"mask": cache["mask"], "index": index + t}
    if cfg.scan_layers:
      kv = None if cache is None else cache["layers"]
      x, kv = self.layers(x, mask, cos, sin, kv, index)
      if cache is not None:
        new_cache["layers"] = kv
    else:
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else cache[f"layers_{i}"]
        x, kv = layer(x, mask, cos, sin, kv, index)
        if cache is not None:
          new_cache[f"layers_{i}"] = kv
    return self.final_layer_norm(x), new_cache


def _self_mask(valid: Array, positions: Array | None, segment_ids: Array | None,
               shared_segment: int | None = None):
  """Mask [B,1,L,L] and positions [B,L] for a forward without cache."""
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
  mask |= (slot[:, None] == slot[None, :])[None]
  if positions is None:
    count = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # real tokens up to and incl. t
    if segment_ids is not None:
      # Subtract the count before the segment's first token (running max over starts).
      starts = jnp.concatenate(
          [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
      before = jnp.where(starts, count - valid.astype(jnp.int32), 0)
      count = count - jax.lax.cummax(before, axis=1)
    positions = jnp.maximum(count - 1, 0)
  return mask[:, None], positions


def _cache_mask(valid: Array, positions: Array | None, cache: Cache):
  """Mask [B,1,T,S], positions [B,T] and the cache with the new tokens' validity written."""
  b, t = valid.shape
  index = cache["index"]
  if positions is None:
    seen = jnp.sum(cache["mask"].astype(jnp.int32), axis=1, keepdims=True)  # [B,1]
    positions = jnp.maximum(seen + jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
  key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, index))  # [B,S]
  q_slot = index + jnp.arange(t)  # [T]
  k_slot = jnp.arange(key_valid.shape[1])  # [S]
  mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & key_valid[:, None, :]
  mask |= (k_slot[None, :] == q_slot[:, None])[None]  # as in `_self_mask`
  return mask[:, None], positions, {**cache, "mask": key_valid}


# --- Helpers ---------------------------------------------------------------------------


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache, a plain pytree laid out like the params.

  Writing past `max_len` is not detected under jit (`dynamic_update_slice` clamps the
  start); size the cache for prompt plus generation.

  Args:
    config: the model config (its `scan_layers` decides the layout).
    batch_size: B.
    max_len: S, prompt plus generated tokens.
    dtype: cache dtype; default `config.dtype`.

  Returns:
    {'layers_i': {'k', 'v': [B,H,S,K]}} (or {'layers': {'k', 'v': [N,B,H,S,K]}} with
    scan_layers), plus 'mask' [B,S] bool (which slots hold real tokens) and 'index' int32
    scalar (the next slot to write).
  """
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch_size, config.num_attention_heads, max_len, config.head_dim)
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
  def init(rng):
    params = CausalLM(config).init(rng, _dummy_tokens())["params"]
    return params if boxed else nn.unbox(params)
  return jax.eval_shape(init, jax.random.key(0))


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
