"""`attention_impl='splash'`: the TPU's block-sparse flash-attention kernel (Pallas).

`jax.experimental.pallas.ops.tpu.splash_attention` computes exact softmax attention one
`[block_q, block_kv]` tile at a time and skips every tile its static mask rules out, so
neither the `[B,H,L,L]` logits nor the boolean mask are ever materialized. Its mask is the same
for every row; what varies per row goes through segment ids (a query sees a key only where both
ids are equal). Two masks are used here:

  * a `train/fixed_layout.py` row `[prompt P | chosen R | rejected R]` (DAA steps and the
    reference pass with `packing='fixed'`): causal, minus the rejected-query x chosen-key block
    (`static_mask`); segment id 1 on the prompt's left padding, 0 elsewhere;
  * any other forward without a cache (SFT, two-row DAA, teacher-forced scoring) and the
    sampler's prefill (`prefill=True`: the prompts into a fresh KV cache, which they fill
    while attending only to each other): causal; segment ids are the packed segments,
    padding its own id.

Queries are pre-multiplied by the family's scale; Gemma-2's logit soft-capping is the kernel's
`attn_logits_soft_cap`; grouped-query heads run the kernel's MQA form, one call per key/value
head. Rows are padded up to a multiple of 128 slots (the kernel's lane width) with their own
segment id. Under a mesh the kernel runs per shard (`jax.shard_map` over the batch and head
axes): a Pallas call cannot be partitioned by XLA. Decoding with the KV cache (one query) keeps
the dense `layers.attend`.

Sliding-window layers (Mistral, Qwen2, Gemma-2) get a second static mask. The window counts
rotary positions (`q_pos - k_pos < window`, the dense path's rule): in a causal row a real
token's slot and position advance together, so it is the kernel's `LocalMask`; in a fixed-layout
row the rejected response's positions restart after the prompt, R slots before its own slots,
so its window into the prompt is the same band shifted by R (`window_mask`: static again).
A model mixing global and sliding layers (Gemma-2, Qwen2's `max_window_layers`) runs the layer's
kernel: under `scan_layers` a `lax.cond` on the layer's flag picks one of the two. Off TPU the kernel runs in Pallas interpret
mode (slow; for tests and CPU runs, not a speed path): values and gradients equal the dense path to float32 rounding
(tests/models/test_splash.py).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.errors import ConfigError
from daa_jax.models import attention as attention_lib

Array = jax.Array

LANES = 128  # the kernel's block sizes are multiples of this
MAX_BLOCK = 512
_TAIL_SEGMENT = -(2 ** 30) + 1  # slots added to reach a multiple of LANES


@flax.struct.dataclass
class SplashMasks:
  """What the splash path carries instead of boolean masks: per-row segment ids `[B,L]` and
  the static layout `(P, R)` of a fixed-offset row (None: causal)."""
  segment_ids: Array
  layout: tuple | None = flax.struct.field(pytree_node=False, default=None)
  # The sliding window of the model's sliding layers (0: none shorter than the row), and
  # whether this layer slides (set per layer by `layers.layer_mask`; traced under scan).
  window: int = flax.struct.field(pytree_node=False, default=0)
  sliding: Array | bool = False


def static_mask(prompt_len: int, response_len: int, total: int | None = None) -> np.ndarray:
  """The fixed layout's `[L,L]` bool mask (query, key), the same for every row: causal, and no
  rejected query sees a chosen key. Slots past P + 2R (up to `total`) are causal padding."""
  length = prompt_len + 2 * response_len
  slot = np.arange(total or length)
  mask = slot[None, :] <= slot[:, None]
  rejected_q = (slot[:, None] >= prompt_len + response_len) & (slot[:, None] < length)
  chosen_k = (slot[None, :] >= prompt_len) & (slot[None, :] < prompt_len + response_len)
  return mask & ~(rejected_q & chosen_k)


def window_mask(prompt_len: int, response_len: int, window: int,
                total: int | None = None) -> np.ndarray:
  """`static_mask` with the sliding window on rotary positions: a query sees a key at most
  `window - 1` positions back. Prompt and chosen slots count positions as slots do; a rejected
  query's position is its slot minus R (its positions restart after the prompt), so against
  prompt keys its band is shifted by R, and against its own response it is the plain band."""
  mask = static_mask(prompt_len, response_len, total)
  slot = np.arange(mask.shape[0])
  rejected_q = (slot >= prompt_len + response_len) & (slot < prompt_len + 2 * response_len)
  prompt_k = slot < prompt_len
  q_pos = np.where(rejected_q[:, None] & prompt_k[None, :], slot[:, None] - response_len,
                   slot[:, None])
  return mask & (q_pos - slot[None, :] < window)


def make_masks(config, valid: Array, segment_ids: Array | None, shared_segment: int | None,
               layout: tuple | None) -> SplashMasks:
  """`SplashMasks` for a forward without cache (see the module docstring)."""
  b, length = valid.shape
  # Windows that cover every row change nothing: the layer is global then.
  window = int(config.sliding_window) if any(config.sliding_layers) and (
      config.sliding_window < length) else 0
  slot = jnp.arange(length)[None]
  if layout is not None:
    p, r = (int(x) for x in layout)
    if p + 2 * r != length or p < 0 or r < 1:
      raise ValueError(f"layout {layout} does not describe rows of {length} slots.")
    return SplashMasks(jnp.where(~valid & (slot < p), 1, 0).astype(jnp.int32), (p, r), window)
  if shared_segment is not None:
    raise ConfigError(
        "config.model.attention_impl='splash' needs config.train.packing='fixed' (or False): "
        "its mask is one static pattern for every row, and today's packed rows "
        "(packing=True) put the prompt/chosen/rejected boundaries at a different slot in each "
        "row. The fixed layout pads each part to the same offsets (train/fixed_layout.py).")
  return SplashMasks(attention_lib.padded_segment_ids(valid, segment_ids), window=window)


def _block(length: int) -> int:
  return next(b for b in (MAX_BLOCK, 256, LANES) if length % b == 0)


def _splash_module():
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"config.model.attention_impl='splash' needs jax's Pallas splash "
                      f"attention (jax.experimental.pallas.ops.tpu.splash_attention): {e}. Use "
                      "attention_impl='blockwise' (same memory profile, plain JAX).") from e
  return sa


def _kernel(layout, length: int, heads: int, mqa: bool, softcap: float, interpret: bool,
            window: int = 0):
  # Built per trace, not cached: the kernel holds the mask's block tables as arrays of the
  # trace it was made in.
  sa = _splash_module()
  if layout is None and window:
    one = sa.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  elif layout is None:
    one = sa.CausalMask((length, length))
  elif window:
    one = sa.NumpyMask(window_mask(*layout, window, total=length))
  else:
    one = sa.NumpyMask(static_mask(*layout, total=length))
  blk = _block(length)
  sizes = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  name = "make_splash_mqa" if mqa else "make_splash_mha"
  make = getattr(sa, name + "_single_device", None) or functools.partial(
      getattr(sa, name), head_shards=1, q_seq_shards=1)
  return make(sa.MultiHeadMask([one] * heads), block_sizes=sizes,
              attn_logits_soft_cap=softcap or None, interpret=interpret)


def _local(q, k, v, seg, *, layout, scale, softcap, interpret, window=0):
  """Per shard: q [b,H,L,K], k/v [b,G,L,K], seg [b,L] -> [b,H,L,K]."""
  sa = _splash_module()
  b, h, length, kd = q.shape
  g = k.shape[1]
  q = (q * jnp.asarray(scale, q.dtype))
  ids = jax.vmap(lambda s: sa.SegmentIds(q=s, kv=s))(seg)
  if g == h:
    kernel = _kernel(layout, length, h, False, softcap, interpret, window)
    return jax.vmap(kernel)(q, k, v, segment_ids=ids)
  kernel = _kernel(layout, length, h // g, True, softcap, interpret, window)
  per_group = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over key/value heads
  qg = q.reshape(b, g, h // g, length, kd)
  out = jax.vmap(lambda qq, kk, vv, ii: per_group(qq, kk, vv, ii))(qg, k, v, ids)
  return out.reshape(b, h, length, kd)


def attend(q: Array, k: Array, v: Array, masks: SplashMasks, scale: float,
           softcap: float = 0.0, fit=None) -> Array:
  """Splash attention. q [B,H,L,K]; k, v [B,G,L,K]; `masks` from `make_masks` -> [B,H,L,K].

  `fit`: `layers.fit_spec_to_shape`, which drops mesh axes that do not divide a dimension
  (passed in: this module sits below `layers`).
  """
  length = q.shape[2]
  seg = masks.segment_ids
  pad = -length % LANES
  if pad:
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=_TAIL_SEGMENT)
  def fn(*args, window=0):
    # The Mosaic kernel where the program is lowered for TPU (also when the planner compiles
    # for a TPU topology from a CPU host), Pallas interpret mode elsewhere.
    local = functools.partial(_local, layout=masks.layout, scale=scale, softcap=float(softcap),
                              window=window)
    return jax.lax.platform_dependent(
        *args, tpu=functools.partial(local, interpret=False),
        default=functools.partial(local, interpret=True))
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()

  def run(window):
    call = functools.partial(fn, window=window)
    if not mesh.empty and rules and fit is not None:
      call = _shard(call, mesh, rules, q.shape, k.shape, fit)
    return call(q, k, v, seg)

  sliding = masks.sliding
  if isinstance(sliding, (bool, np.bool_)) or not masks.window:
    out = run(masks.window if masks.window and sliding else 0)
  else:  # a scanned layer's traced flag: the layer's kernel, not both
    out = jax.lax.cond(sliding, lambda: run(masks.window), lambda: run(0))
  return out[:, :, :length] if pad else out


def _shard(fn, mesh, rules, q_shape, k_shape, fit):
  """`fn` under `jax.shard_map`: rows split over the batch axes, heads over 'tensor' where the
  key/value heads divide (each shard then holds whole groups of query heads)."""
  P = jax.sharding.PartitionSpec
  shape = dict(mesh.shape)
  batch = fit(nn.logical_to_mesh_axes(("act_batch",), rules), q_shape[:1],
                            shape)[0]
  heads = fit(nn.logical_to_mesh_axes(("act_heads",), rules), k_shape[1:2],
                            shape)[0]
  qkv = P(batch, heads, None, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None)),
                       out_specs=qkv, check_vma=False)
