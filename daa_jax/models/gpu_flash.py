"""`attention_impl='gpu_flash'`: fused flash attention on CUDA GPUs (Pallas Triton).

The kernel is jax's own `jax.experimental.pallas.ops.gpu.attention.mha` (a Triton flash
attention with a fused backward pass): exact softmax attention one `[block_q, block_k]` tile at
a time, causal (tiles above the diagonal are skipped) and segment ids (a query sees a key only
where both ids are equal), so neither the `[B,H,L,L]` logits nor a boolean mask are ever
materialized. When lowered for CUDA it is one `__gpu$xla.gpu.triton` custom call per direction.

Why not cuDNN: `jax.nn.dot_product_attention(implementation='cudnn')` takes `is_causal`,
sequence lengths and a local window but no segment ids (jax 0.10), so packed SFT rows and the
prompt-shared DAA rows would need its dense boolean mask, which it turns into a dense bias
(`attention_impl='cudnn'`, kept as it was).

Masks. Per-row segment ids carry everything; padding gets its own id. A prompt-shared row
(`shared_segment`: `[prompt | chosen | rejected]`, both `packing=True` and `packing='fixed'`)
is not "same segment": a response token sees the prompt and its own response. No single set of
segment ids says that, so such rows take two kernel calls, each exact for one response:

  * call A on the row as it is, the prompt given the first response's id: exact for the
    prompt and the first (chosen) response;
  * call B on the row with the first response's slots moved to the end (a stable per-row
    permutation of q, k, v), the prompt given the second response's id: causal order is kept
    among the others, so exact for the second (rejected) response, whose output is permuted
    back.

Rows with a shared segment hold at most two other segments (pair packing); a third would see
the prompt in neither call exactly. Queries and keys are rotated before the kernel, so moving
slots does not change what they compute.

Grouped-query heads repeat their key/value heads to the query heads (as HF's `repeat_kv`) —
the kernel takes one key/value head per query head. Gemma-2's logit soft-capping and
sliding-window layers whose window is shorter than the row are refused (`check_config`,
`check_window`, ConfigError): the kernel implements neither. Rows are padded up to a multiple
of `UNIT` slots with their own segment id. Under a mesh the kernel runs per shard
(`jax.shard_map` over batch and heads): a Pallas call cannot be partitioned by XLA. Decoding
with the KV cache (one query) keeps the dense `layers.attend`. Off CUDA the kernel runs in
Pallas interpret mode (slow; for tests, not a speed path): values and gradients equal the dense
path to float32 rounding (tests/models/test_gpu_flash.py).

Axis letters: B batch, L slots, H query heads, G key/value heads, K head dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from daa_jax.errors import ConfigError
from daa_jax.models import attention as attention_lib

Array = jax.Array

UNIT = 64  # rows are padded to a multiple of this; blocks divide it
_PAD_SEGMENT = attention_lib.PAD_SEGMENT  # padding (never a real segment)
_TAIL_SEGMENT = -(2 ** 30) + 1  # slots added to reach a multiple of UNIT


@flax.struct.dataclass
class FlashMasks:
  """What the gpu_flash path carries instead of boolean masks (all `[B,L]`).

  `ids`: call A's segment ids. For prompt-shared rows also `perm` (call B's slot order: the
  first response moved to the end), `inverse` (its inverse), `ids_b` (call B's ids, in B's
  order) and `second` (bool: slots whose output comes from call B); None otherwise.
  """
  ids: Array
  perm: Array | None = None
  inverse: Array | None = None
  ids_b: Array | None = None
  second: Array | None = None


def check_config(config) -> None:
  """Refuses model configs the kernel cannot compute exactly (ConfigError)."""
  if config.attn_logit_softcapping > 0:
    raise ConfigError(
        f"config.model.attention_impl='gpu_flash' does not implement attention logit "
        f"soft-capping (this model has attn_logit_softcapping="
        f"{config.attn_logit_softcapping}, Gemma-2): jax's Triton flash kernel has no cap. "
        "Use attention_impl='blockwise' (exact, memory-lean, plain JAX) or 'xla' for this "
        "model on GPUs, or 'splash' on TPUs (which caps in the kernel).")


def check_window(config, length: int) -> None:
  """Refuses sliding-window layers whose window is shorter than the row (ConfigError)."""
  attention_lib.refuse_short_window(
      config, length, "gpu_flash", "jax's Triton flash kernel takes causal + segment ids only.")


def make_masks(config, valid: Array, segment_ids: Array | None,
               shared_segment: int | None) -> FlashMasks:
  """`FlashMasks` for a forward without cache: valid, segment_ids `[B,L]` (module docstring)."""
  b, length = valid.shape
  check_config(config)
  check_window(config, length)
  if shared_segment is None:
    return FlashMasks(attention_lib.padded_segment_ids(valid, segment_ids))
  seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else segment_ids
  response = valid & (seg != shared_segment)
  first_id = jnp.take_along_axis(seg, jnp.argmax(response, axis=1)[:, None], axis=1)  # [B,1]
  first = response & (seg == first_id)  # the chosen response's slots
  second = response & ~first  # the rejected response's slots
  prompt = valid & (seg == shared_segment)
  ids = jnp.where(~valid, _PAD_SEGMENT, jnp.where(prompt | first, 0, 1))
  perm = jnp.argsort(first.astype(jnp.int32), axis=1, stable=True)
  inverse = jnp.argsort(perm, axis=1)
  ids_b = jnp.where(~valid, _PAD_SEGMENT, jnp.where(prompt | second, 0, 1))
  ids_b = jnp.take_along_axis(ids_b, perm, axis=1)
  return FlashMasks(ids.astype(jnp.int32), perm, inverse, ids_b.astype(jnp.int32), second)


def _kernel_module():
  try:
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"config.model.attention_impl='gpu_flash' needs jax's Pallas Triton "
                      f"attention (jax.experimental.pallas.ops.gpu.attention): {e}. Use "
                      "attention_impl='blockwise' (same memory profile, plain JAX).") from e
  return gpu_attention


def _mha(q, k, v, ids, *, scale, interpret):
  """One kernel call: q, k, v [b,L,H,K] (L a multiple of UNIT), ids [b,L] -> [b,L,H,K]."""
  ga = _kernel_module()
  length = q.shape[1]
  blk = 128 if length % 128 == 0 else UNIT
  sizes = ga.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=32, block_kv_dkv=32,
                        block_q_dq=32, block_kv_dq=32)
  return ga.mha(q, k, v, ids, sm_scale=scale, causal=True, block_sizes=sizes,
                interpret=interpret)


def _gather(x, order):  # x [b,L,...] reordered along L per row
  return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def _local(q, k, v, masks, *, scale, interpret):
  """Per shard: q [b,L,H,K], k/v [b,L,G,K] -> [b,L,H,K]."""
  h, g = q.shape[2], k.shape[2]
  if g != h:  # query head i reads key/value head i // (H/G)
    k, v = jnp.repeat(k, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
  mha = functools.partial(_mha, scale=scale, interpret=interpret)
  out = mha(q, k, v, masks.ids)
  if masks.perm is None:
    return out
  q, k, v = (_gather(a, masks.perm) for a in (q, k, v))
  out_b = _gather(mha(q, k, v, masks.ids_b), masks.inverse)
  return jnp.where(masks.second[:, :, None, None], out_b, out)


def _pad(masks: FlashMasks, pad: int) -> FlashMasks:
  """Masks for rows with `pad` slots added at the end (their own segment, never moved)."""
  widths = ((0, 0), (0, pad))
  ids = jnp.pad(masks.ids, widths, constant_values=_TAIL_SEGMENT)
  if masks.perm is None:
    return FlashMasks(ids)
  length = masks.ids.shape[1]
  tail = jnp.broadcast_to(jnp.arange(length, length + pad), masks.perm.shape[:1] + (pad,))
  return FlashMasks(ids, jnp.concatenate([masks.perm, tail], axis=1),
                    jnp.concatenate([masks.inverse, tail], axis=1),
                    jnp.pad(masks.ids_b, widths, constant_values=_TAIL_SEGMENT),
                    jnp.pad(masks.second, widths))


def attend(q: Array, k: Array, v: Array, masks: FlashMasks, scale: float, fit=None) -> Array:
  """Fused attention. q [B,L,H,K]; k, v [B,L,G,K]; `masks` from `make_masks` -> [B,L,H,K].

  `fit`: `layers.fit_spec_to_shape`, which drops mesh axes that do not divide a dimension
  (passed in: this module sits below `layers`).
  """
  length = q.shape[1]
  pad = -length % UNIT
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    masks = _pad(masks, pad)
  local = functools.partial(_local, scale=float(scale))
  # The Triton kernel where the program is lowered for CUDA (also when the planner lowers for
  # CUDA from a CPU host), Pallas interpret mode elsewhere.
  def fn(*args):
    return jax.lax.platform_dependent(
        *args, cuda=functools.partial(local, interpret=False),
        default=functools.partial(local, interpret=True))
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if not mesh.empty and rules and fit is not None:
    fn = _shard(fn, mesh, rules, q.shape, k.shape, masks, fit)
  out = fn(q, k, v, masks)
  return out[:, :length] if pad else out


def _shard(fn, mesh, rules, q_shape, k_shape, masks, fit):
  """`fn` under `jax.shard_map`: rows split over the batch axes, heads over 'tensor' where the
  key/value heads divide (each shard then holds whole groups of query heads)."""
  P = jax.sharding.PartitionSpec
  shape = dict(mesh.shape)
  batch = fit(nn.logical_to_mesh_axes(("act_batch",), rules), q_shape[:1], shape)[0]
  heads = fit(nn.logical_to_mesh_axes(("act_heads",), rules), k_shape[2:3], shape)[0]
  qkv = P(batch, None, heads, None)
  rows = jax.tree.map(lambda _: P(batch, None), masks)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv, qkv, qkv, rows), out_specs=qkv,
                       check_vma=False)
