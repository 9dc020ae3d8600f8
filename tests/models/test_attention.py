"""models/attention.py: blockwise attention equals the model's dense attention (values and
gradients) for causal, padded, packed and prompt-shared masks, and never forms [B,H,L,L]."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.models import attention
from daa_jax.models import model as model_lib
from daa_jax.models import layers
from daa_jax.train import packing
from daa_jax.train import step as step_lib
from tests.train.test_packing import CFG, SPEC, random_pairs, two_row_batch


def masks(b=3, length=23):
  """[B,1,L,L] masks built by the model's own rule: causal + padding, packed segments, and
  segments sharing segment 0 (a [prompt | chosen | rejected] row)."""
  rng = np.random.default_rng(0)
  valid = np.ones((b, length), bool)
  valid[1, -5:] = False
  segments = np.sort(rng.integers(0, 3, (b, length)), axis=1)
  out = []
  for seg, shared in ((None, None), (segments, None), (segments, 0)):
    mask, _ = model_lib._self_mask(jnp.asarray(valid), None,
                                   None if seg is None else jnp.asarray(seg), shared)
    out.append(mask)
  return out


@pytest.mark.parametrize("block", [7, 64])  # S = 23: ragged blocks; one block
def test_attend_equals_dense_attention_with_grads(block):
  b, h, length, k = 3, 5, 23, 8
  keys = jax.random.split(jax.random.key(1), 3)
  q, kk, v = (jax.random.normal(key, (b, h, length, k)) for key in keys)
  for mask in masks(b, length):
    dense = lambda q, k, v, mask=mask: jnp.sum(jnp.sin(layers.attend(q, k, v, mask)))  # noqa: E731
    blockwise = lambda q, k, v, mask=mask: jnp.sum(jnp.sin(  # noqa: E731
        attention.attend(q, k, v, mask, block=block)))
    np.testing.assert_allclose(
        jax.jit(functools.partial(attention.attend, block=block))(q, kk, v, mask),
        jax.jit(layers.attend)(q, kk, v, mask), atol=1e-5, rtol=1e-5)
    g_dense = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(q, kk, v)
    g_block = jax.jit(jax.grad(blockwise, argnums=(0, 1, 2)))(q, kk, v)
    for a, e in zip(g_block, g_dense):
      np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def test_packed_prompt_shared_logps_and_grads_match_the_xla_path():
  """The model with attention_impl='blockwise' on packed [prompt | chosen | rejected] rows:
  the same pair log-probs and parameter gradients as 'xla' (to 1e-5)."""
  params = model_lib.init_params(CFG, jax.random.key(3))
  packed = packing.pack_pairs(two_row_batch(random_pairs(np.random.default_rng(2), SPEC), 24),
                              pad_id=1)
  results = []
  for impl in ("xla", "blockwise"):
    model = model_lib.CausalLM(CFG.replace(attention_impl=impl))
    fn = jax.jit(jax.value_and_grad(lambda p, model=model: jnp.sum(
        jnp.sin(step_lib.pair_logps(model, p, packed, packing=True)))))
    logps = jax.jit(functools.partial(step_lib.pair_logps, model, packing=True))(params, packed)
    results.append((np.asarray(logps), jax.device_get(fn(params)[1])))
  (l0, g0), (l1, g1) = results
  np.testing.assert_allclose(l1, l0, atol=1e-5, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5), g1, g0)


def test_no_dense_logits_in_the_forward_or_backward():
  b, h, length, k = 2, 4, 64, 8
  q = jnp.zeros((b, h, length, k))
  mask = masks(b, length)[2]
  loss = lambda q: jnp.sum(attention.attend(q, q, q, mask, block=16))  # noqa: E731
  hlo = jax.jit(jax.grad(loss)).lower(q).as_text()
  assert f"{b}x{h}x{length}x16xf32" in hlo  # a block of logits
  assert f"{b}x{h}x{length}x{length}xf32" not in hlo  # never all of them
  dense = jax.jit(jax.grad(lambda q: jnp.sum(layers.attend(q, q, q, mask)))).lower(q)
  assert f"{b}x{h}x{length}x{length}xf32" in dense.as_text()  # what the check would catch


def test_blockwise_equals_dense_with_grouped_heads_scale_and_softcap():
  """The families' attention: 6 query heads over 2 key/value heads, a custom scale and
  Gemma-2's soft-capping, causal with padding — blockwise equals `layers.attend`."""
  rng = np.random.default_rng(5)
  b, h, g, t, kd = 2, 6, 2, 37, 8
  q = jnp.asarray(rng.normal(size=(b, h, t, kd)) * 3, jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, g, t, kd)) * 3, jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, g, t, kd)), jnp.float32)
  valid = np.ones((b, t), bool)
  valid[0, :5] = False
  mask, _ = model_lib._self_mask(jnp.asarray(valid), None, None)
  for scale, cap in ((None, 0.0), (0.3, 50.0), (0.3, 2.0)):
    want = layers.attend(q, k, v, mask, scale, cap)
    got = attention.attend(q, k, v, mask, scale, cap, block=16)
    np.testing.assert_allclose(np.asarray(got)[:, :, 5:], np.asarray(want)[:, :, 5:],
                               atol=1e-5, rtol=1e-5)


def test_fully_masked_key_blocks_have_finite_grads_equal_to_dense():
  # Left padding longer than a block: the first key blocks are entirely masked for row 0,
  # and the padded keys carry large logits (~1e3), so exp() of a masked logit overflows
  # unless the mask is applied before exp (inf * 0 = nan in the backward pass).
  b, h, length, k, block, pad = 2, 2, 16, 4, 4, 9
  keys = jax.random.split(jax.random.key(3), 3)
  q, kk, v = (jax.random.normal(key, (b, h, length, k)) for key in keys)
  valid = np.ones((b, length), bool)
  valid[0, :pad] = False  # blocks 0 and 1 fully masked, block 2 partly, for row 0
  kk = kk.at[0, :, :pad].multiply(100.0)
  q = q * 10.0
  causal = np.tril(np.ones((length, length), bool))
  mask = jnp.asarray((causal[None] & valid[:, None, :]) | np.eye(length, dtype=bool)[None])
  mask = mask[:, None]  # [B,1,T,S]; every query sees at least itself
  dense = lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, mask)))  # noqa: E731
  blockwise = lambda q, k, v: jnp.sum(jnp.sin(  # noqa: E731
      attention.attend(q, k, v, mask, block=block)))
  np.testing.assert_allclose(attention.attend(q, kk, v, mask, block=block),
                             layers.attend(q, kk, v, mask), atol=1e-5, rtol=1e-5)
  g_block = jax.grad(blockwise, argnums=(0, 1, 2))(q, kk, v)
  g_dense = jax.grad(dense, argnums=(0, 1, 2))(q, kk, v)
  for a, e in zip(g_block, g_dense):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
