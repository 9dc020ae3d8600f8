"""attention_impl='splash' (models/splash.py) in Pallas interpret mode on CPU: values and
gradients equal the dense path on every family, for the fixed layout's static mask (DAA) and
causal + segment ids (two rows, SFT); KV-cache decoding, scanned layers, a mesh; the
refusals."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.train import fixed_layout, packing
from daa_jax.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from family_configs import family_configs  # noqa: E402
from train.test_packing import two_row_batch  # noqa: E402

PAD_ID = 1
SPEC = [(5, 3, 7), (1, 6, 2), (9, 1, 4)]
# Windows at least the row: splash refuses shorter ones (test_short_windows_are_refused).
CONFIGS = family_configs(window=512)


def pairs(seed=0, vocab=97):
  rng = np.random.default_rng(seed)
  tok = lambda n: list(rng.integers(2, vocab, n))  # noqa: E731
  return [(tok(p), tok(c), tok(r)) for p, c, r in SPEC]


def _values_and_grads(config, params, fn):
  model = model_lib.CausalLM(config)
  value = jax.jit(lambda p: fn(model, p))(params)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(fn(model, p) * jnp.array([1.0, -0.5]))))(params)
  return value, grads


def _assert_same(config, fn, seed=2):
  params = model_lib.init_params(config, jax.random.key(seed))
  dense = _values_and_grads(config, params, fn)
  splash = _values_and_grads(config.replace(attention_impl="splash"), params, fn)
  np.testing.assert_allclose(np.asarray(splash[0]), np.asarray(dense[0]), rtol=0, atol=1e-5)
  for a, b in zip(jax.tree.leaves(splash[1]), jax.tree.leaves(dense[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fixed_layout_values_and_gradients_equal_dense(name):
  fixed = fixed_layout.pack_fixed(two_row_batch(pairs(), 16, left_pad=True), pad_id=PAD_ID,
                                  block=8)
  _assert_same(CONFIGS[name], lambda m, p: packing.packed_pair_logps(m, p, fixed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_rows_causal_with_padding_equal_dense(name):
  batch = two_row_batch(pairs(1), 16, left_pad=name.endswith("window"))
  _assert_same(CONFIGS[name], lambda m, p: step_lib.pair_logps(m, p, batch))


def test_scanned_remat_layers_and_a_mesh_equal_dense():
  config = CONFIGS["llama_gqa3"].replace(scan_layers=True, remat_policy="full")
  fixed = fixed_layout.pack_fixed(two_row_batch(pairs(), 16), pad_id=PAD_ID, block=8)
  _assert_same(config, lambda m, p: packing.packed_pair_logps(m, p, fixed))
  # Rows over data x fsdp, the 2 key/value heads over tensor: the kernel runs per shard.
  mesh = sharding.make_mesh((2, 2, 2))
  params = model_lib.init_params(config, jax.random.key(2))
  four = {k: np.concatenate([v, v[:1]]) for k, v in fixed.items()}  # 4 rows: divisible
  with sharding.activate(mesh):
    got = jax.jit(functools.partial(packing.packed_pair_logps,
                                    model_lib.CausalLM(config.replace(attention_impl="splash"))))(
                                        params, four)
  want = jax.jit(functools.partial(packing.packed_pair_logps, model_lib.CausalLM(config)))(
      params, four)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_kv_cache_decoding_keeps_the_dense_path():
  config = CONFIGS["gemma2_softcap"]
  params = model_lib.init_params(config, jax.random.key(4))
  tokens = jnp.asarray(np.random.default_rng(3).integers(2, 97, (2, 9)), jnp.int32)
  outs = []
  for impl in ("xla", "splash"):
    model = model_lib.CausalLM(config.replace(attention_impl=impl))
    cache = model_lib.init_cache(config, 2, 12)
    logits, cache = model.apply({"params": params}, tokens[:, :8], cache=cache)
    step, _ = model.apply({"params": params}, tokens[:, 8:], cache=cache)
    outs.append(np.asarray(step))
  np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


def test_short_windows_and_variable_packing_are_refused():
  batch = two_row_batch(pairs(), 16)
  short = family_configs(window=4)["mistral_window"].replace(attention_impl="splash")
  params = model_lib.init_params(short, jax.random.key(0))
  with pytest.raises(ConfigError, match="sliding_window=4, rows of 16 tokens"):
    step_lib.pair_logps(model_lib.CausalLM(short), params, batch)
  config = CONFIGS["gpt_neox"].replace(attention_impl="splash")
  params = model_lib.init_params(config, jax.random.key(0))
  with pytest.raises(ConfigError, match="packing='fixed'"):
    packing.packed_pair_logps(model_lib.CausalLM(config), params,
                              packing.pack_pairs(batch, pad_id=PAD_ID))
