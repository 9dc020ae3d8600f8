"""Memory-lean exact attention for long packed rows: `attention_impl='blockwise'`.

`models.layers.attend` materializes the float32 logits and probabilities `[B,H,L,L]` and keeps them
for the backward pass: at 2048 packed tokens, 32 heads and 8 rows that is 4 GiB per layer
before remat. `attend` here computes the same function (same signature) one block of keys at
a time with an online softmax (the flash-attention recurrence), so the largest temporary is
`[B,H,L,block]`, and the backward pass recomputes each block instead of storing it
(`jax.checkpoint` on the block body). It takes the model's boolean mask `[B,1,T,S]` as is, so
every attention rule the model builds stays exact: causal, padding, packed segments and the
prompt shared by both responses of a `[prompt | chosen | rejected]` row. Plain JAX (a scan of
two einsums), so it lowers for CPU, GPU and TPU alike; values equal `models.layers.attend`'s to
float32 rounding (tests/test_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from daa_jax.errors import ConfigError

Array = jax.Array

BLOCK = 256


def attend(q: Array, k: Array, v: Array, mask: Array, scale: float | None = None,
           softcap: float = 0.0, block: int = BLOCK) -> Array:
  """Softmax attention over key blocks. q [B,H,T,K]; k, v [B,G,S,K]; mask [B,1,T,S] bool.

  Same arithmetic contract as `models.layers.attend`: float32 logits times `scale` (default
  1/sqrt(K)), soft-capped as `cap * tanh(logits / cap)` when `softcap` > 0, masked keys
  excluded, float32 softmax statistics; the output is in `v.dtype`. Every query must see at
  least one key (the model lets each query see itself).

  Args:
    q: queries [B,H,T,K].
    k, v: keys and values [B,G,S,K]; H a multiple of G (grouped-query: query head h reads
      key/value head h // (H/G)).
    mask: [B,1,T,S] bool, True where query t may attend key s.
    scale: logit multiplier (None: 1/sqrt(K)).
    softcap: Gemma-2's attention logit soft-capping (0: off).
    block: keys per block (S is padded up to a multiple with masked keys).

  Returns:
    [B,H,T,K] in `v.dtype`.
  """
  b, h, t, kd = q.shape
  if k.shape[1] != h:  # grouped-query: each key/value head serves H/G query heads
    k = jnp.repeat(k, h // k.shape[1], axis=1)
    v = jnp.repeat(v, h // v.shape[1], axis=1)
  s = k.shape[2]
  block = min(block, s)
  nblocks = -(-s // block)
  pad = nblocks * block - s
  if pad:
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
  # Blocks first, for the scan: [N,B,H,blk,K] and [N,B,1,T,blk].
  kb = jnp.moveaxis(k.reshape(b, h, nblocks, block, kd), 2, 0)
  vb = jnp.moveaxis(v.reshape(b, h, nblocks, block, kd), 2, 0)
  mb = jnp.moveaxis(mask.reshape(b, 1, t, nblocks, block), 3, 0)
  scale = jnp.float32(kd ** -0.5 if scale is None else scale)

  @jax.checkpoint  # the backward pass recomputes a block's logits instead of storing them
  def body(carry, blk):
    m_prev, l_prev, acc = carry  # [B,H,T], [B,H,T] float32; [B,H,T,K] float32
    kk, vv, mm = blk
    logits = jnp.einsum("bhtk,bhsk->bhts", q, kk,
                        preferred_element_type=jnp.float32) * scale  # [B,H,T,blk]
    if softcap > 0:
      logits = softcap * jnp.tanh(logits / softcap)
    masked = jnp.where(mm, logits, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(masked, axis=-1))
    # A row with no visible key so far keeps m = -inf; use 0 there so the subtraction is finite.
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    # Mask before exp: a masked key's logit may exceed m_safe by far (a fully masked block,
    # padding with large logits), and where(mask, exp(overflow), 0) has gradient inf * 0 = nan.
    p = jnp.exp(jnp.where(mm, logits - m_safe[..., None], -jnp.inf))  # float32 [B,H,T,blk]
    correction = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev - m_safe, -jnp.inf))
    l_new = l_prev * correction + jnp.sum(p, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        "bhts,bhsk->bhtk", p.astype(v.dtype), vv, preferred_element_type=jnp.float32)
    return (m_new, l_new, acc), None

  init = (jnp.full((b, h, t), -jnp.inf, jnp.float32), jnp.zeros((b, h, t), jnp.float32),
          jnp.zeros((b, h, t, kd), jnp.float32))
  (_, l, acc), _ = jax.lax.scan(body, init, (kb, vb, mb))
  return (acc / l[..., None]).astype(v.dtype)


PAD_SEGMENT = -(2 ** 30)  # the fused kernels' segment id of padding (never a real segment's)


def padded_segment_ids(valid: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """int32 `[B,L]` segment ids for a segment-id kernel: the packed segments (0 without
  packing), `PAD_SEGMENT` on padding, so padding attends nothing real."""
  seg = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else segment_ids
  return jnp.where(valid, seg, PAD_SEGMENT).astype(jnp.int32)


def refuse_short_window(config, length: int, impl: str, why: str) -> None:
  """Raises ConfigError where `impl` (a fused kernel without windows) would run a model whose
  sliding-window layers are shorter than its rows of `length` tokens; `why` says why."""
  if any(config.sliding_layers) and config.sliding_window < length:
    raise ConfigError(
        f"config.model.attention_impl='{impl}' does not implement sliding-window layers "
        f"(sliding_window={config.sliding_window}, rows of {length} tokens): {why} Use "
        "attention_impl='xla' or 'blockwise' for this model (both exact with any window), or "
        "rows no longer than the window, where every layer is global.")
