"""attention_impl='gpu_flash' (models/gpu_flash.py): jax's Pallas Triton flash kernel in
interpret mode on CPU gives the dense path's values and gradients for causal + segment ids
(packed SFT rows, two-row DAA with padding), for prompt-shared rows (the fixed layout's static
mask and packing=True: two kernel calls), with grouped-query heads, scanned layers and a mesh;
KV-cache decoding keeps the dense path; soft-capping and short windows are refused."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.models import gpu_flash, sharding
from daa_jax.models import model as model_lib
from daa_jax.train import fixed_layout, packing
from daa_jax.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from family_configs import family_configs
from models.test_splash import pairs
from train.test_packing import two_row_batch

PAD_ID = 1
CONFIGS = family_configs(window=512)  # windows at least the row (shorter ones are refused)


def _values_and_grads(config, params, fn):
  model = model_lib.CausalLM(config)
  value = jax.jit(lambda p: fn(model, p))(params)
  weights = jnp.asarray(np.linspace(1.0, -0.5, value.size).reshape(value.shape), value.dtype)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fn(model, p) * weights)))(params)
  return value, grads


def _assert_same(config, fn, seed=2):
  params = model_lib.init_params(config, jax.random.key(seed))
  dense = _values_and_grads(config, params, fn)
  flash = _values_and_grads(config.replace(attention_impl="gpu_flash"), params, fn)
  np.testing.assert_allclose(np.asarray(flash[0]), np.asarray(dense[0]), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(flash[1]), jax.tree.leaves(dense[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt_neox", "llama_gqa3"])
def test_fixed_layout_values_and_gradients_equal_dense(name):
  fixed = fixed_layout.pack_fixed(two_row_batch(pairs(), 16, left_pad=True), pad_id=PAD_ID,
                                  block=8)
  _assert_same(CONFIGS[name], lambda m, p: packing.packed_pair_logps(m, p, fixed))


def test_variable_offset_packing_equals_dense():
  """packing=True: each row's prompt/chosen/rejected boundaries at its own slots."""
  packed = packing.pack_pairs(two_row_batch(pairs(3), 16), pad_id=PAD_ID)
  _assert_same(CONFIGS["mistral_window"], lambda m, p: packing.packed_pair_logps(m, p, packed))


def test_packed_segments_and_left_padded_rows_equal_dense():
  """SFT's packed rows (plain segment ids) and two-row DAA batches with left padding."""
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(2, 97, (2, 21)), jnp.int32)
  segments = jnp.asarray([[0] * 9 + [1] * 7 + [2] * 5, [0] * 4 + [1] * 15 + [-1] * 2])
  mask = (segments >= 0).astype(jnp.int32)

  def token_logps(m, p):  # [2,20]: log p(next token), as the SFT loss takes them
    out = m.apply({"params": p}, tokens, attention_mask=mask, segment_ids=segments)
    logps = jax.nn.log_softmax(out[:, :-1].astype(jnp.float32), axis=-1)
    logps = jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.where(segments[:, 1:] == segments[:, :-1], logps, 0.0) * mask[:, 1:]
  _assert_same(CONFIGS["llama_gqa3"], token_logps)
  batch = two_row_batch(pairs(1), 16, left_pad=True)
  _assert_same(CONFIGS["qwen2_window"], lambda m, p: step_lib.pair_logps(m, p, batch))


def test_scanned_remat_layers_and_a_mesh_equal_dense():
  config = CONFIGS["llama_gqa3"].replace(scan_layers=True, remat_policy="full")
  fixed = fixed_layout.pack_fixed(two_row_batch(pairs(), 16), pad_id=PAD_ID, block=8)
  four = {k: np.concatenate([v, v[:1]]) for k, v in fixed.items()}  # 4 rows: divisible
  mesh = sharding.make_mesh((2, 2, 2))  # rows over data x fsdp, 2 kv heads over tensor
  params = model_lib.init_params(config, jax.random.key(2))
  fn = lambda m, p: packing.packed_pair_logps(m, p, four)
  with sharding.activate(mesh):
    got = _values_and_grads(config.replace(attention_impl="gpu_flash"), params, fn)
  want = _values_and_grads(config, params, fn)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_kv_cache_decoding_keeps_the_dense_path():
  config = CONFIGS["llama_gqa3"]
  params = model_lib.init_params(config, jax.random.key(4))
  tokens = jnp.asarray(np.random.default_rng(3).integers(2, 97, (2, 9)), jnp.int32)
  outs = []
  for impl in ("xla", "gpu_flash"):
    model = model_lib.CausalLM(config.replace(attention_impl=impl))
    cache = model_lib.init_cache(config, 2, 12)
    _, cache = model.apply({"params": params}, tokens[:, :8], cache=cache)
    step, _ = model.apply({"params": params}, tokens[:, 8:], cache=cache)
    outs.append(np.asarray(step))
  np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_soft_capping_and_short_windows_are_refused():
  batch = two_row_batch(pairs(), 16)
  gemma = CONFIGS["gemma2_softcap"].replace(attention_impl="gpu_flash")
  with pytest.raises(ConfigError, match="attn_logit_softcapping=2.0"):
    gpu_flash.check_config(gemma)
  params = model_lib.init_params(CONFIGS["gemma2_softcap"], jax.random.key(0))
  with pytest.raises(ConfigError, match="soft-capping"):
    step_lib.pair_logps(model_lib.CausalLM(gemma), params, batch)
  short = family_configs(window=4)["mistral_window"].replace(attention_impl="gpu_flash")
  params = model_lib.init_params(short.replace(attention_impl="xla"), jax.random.key(0))
  with pytest.raises(ConfigError, match="sliding_window=4, rows of 16 tokens"):
    step_lib.pair_logps(model_lib.CausalLM(short), params, batch)
