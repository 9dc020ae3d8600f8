"""attention_impl='splash' (models/splash.py) in Pallas interpret mode on CPU: values and
gradients equal the dense path on every family, for the fixed layout's static mask (DAA) and
causal + segment ids (two rows, SFT), with and without sliding windows shorter than the rows;
KV-cache decoding, scanned layers, a mesh; the refusal."""

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
from daa_jax.models import splash
from daa_jax.train import fixed_layout, packing
from daa_jax.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from family_configs import family_configs  # noqa: E402
from train.test_packing import two_row_batch  # noqa: E402

PAD_ID = 1
SPEC = [(5, 3, 7), (1, 6, 2), (9, 1, 4)]
# Windows at least the row (every layer global) and windows of 4 tokens, shorter than every
# row here: Mistral slides in every layer, Qwen2 in layer 0 only (max_window_layers=1), Gemma-2
# in every other layer.
CONFIGS = {**family_configs(window=512), **{
    f"{name}4": cfg for name, cfg in family_configs(window=4).items() if "window" in name
    or name.startswith("gemma2")}}


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
  batch = two_row_batch(pairs(1), 16, left_pad="window" in name)
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


def test_the_window_masks_are_the_dense_rule_on_positions():
  # Fixed layout P=4, R=3: prompt slots 0-3 (positions 0-3), chosen 4-6 (4-6), rejected 7-9
  # with positions 4-6. Window 2: a token sees itself and one position back.
  mask = splash.window_mask(4, 3, 2)
  assert mask[5].nonzero()[0].tolist() == [4, 5]  # chosen: the previous slot
  assert mask[4].nonzero()[0].tolist() == [3, 4]  # first chosen token: the last prompt token
  assert mask[7].nonzero()[0].tolist() == [3, 7]  # first rejected token (position 4): the
  assert mask[8].nonzero()[0].tolist() == [7, 8]  # last prompt token (3), not chosen slot 6
  full = splash.static_mask(4, 3)
  assert not (mask & ~full).any()
  assert (splash.window_mask(4, 3, 100) == full).all()
  # The dense path's mask on the same row (positions from the layout) is the same pattern.
  pos = np.array([0, 1, 2, 3, 4, 5, 6, 4, 5, 6])
  near = pos[:, None] - pos[None, :] < 2
  np.testing.assert_array_equal(mask, full & near)


@pytest.mark.parametrize("name", ["gemma2_softcap4", "qwen2_window4"])
def test_scanned_sliding_layers_pick_their_kernel(name):
  """Under scan_layers the layer's sliding flag is traced: a cond picks the window kernel."""
  config = CONFIGS[name].replace(scan_layers=True, remat_policy="full")
  fixed = fixed_layout.pack_fixed(two_row_batch(pairs(3), 16, left_pad=True), pad_id=PAD_ID,
                                  block=8)
  _assert_same(config, lambda m, p: packing.packed_pair_logps(m, p, fixed))
  # The window matters here: the same model with a global window gives other log-probs.
  params = model_lib.init_params(config, jax.random.key(2))
  wide = config.replace(sliding_window=512, attention_impl="splash")
  got = jax.jit(lambda p: packing.packed_pair_logps(
      model_lib.CausalLM(config.replace(attention_impl="splash")), p, fixed))(params)
  other = jax.jit(lambda p: packing.packed_pair_logps(model_lib.CausalLM(wide), p, fixed))(params)
  assert np.abs(np.asarray(got) - np.asarray(other)).max() > 1e-3


def test_variable_packing_is_refused():
  batch = two_row_batch(pairs(), 16)
  config = CONFIGS["gpt_neox"].replace(attention_impl="splash")
  params = model_lib.init_params(config, jax.random.key(0))
  with pytest.raises(ConfigError, match="packing='fixed'"):
    packing.packed_pair_logps(model_lib.CausalLM(config), params,
                              packing.pack_pairs(batch, pad_id=PAD_ID))


@pytest.mark.parametrize("name", ["gpt_neox", "llama_gqa3", "mistral_window4", "gemma2_softcap4"])
def test_sampling_prefill_runs_the_kernel_and_samples_as_dense(name):
  """The sampler's prefill (a fresh cache) goes through splash; decoding stays dense."""
  from daa_jax.evaluate import sampling  # pylint: disable=g-import-not-at-top
  config = CONFIGS[name]
  params = model_lib.init_params(config, jax.random.key(5))
  rng = np.random.default_rng(6)
  tokens = np.asarray(rng.integers(2, 97, (3, 11)), np.int32)
  mask = np.ones_like(tokens)
  mask[0, :4] = 0  # left padding
  mask[2, :9] = 0
  cfg = sampling.SamplingConfig(max_new_tokens=6, eos_id=0, pad_id=PAD_ID)
  outs, caches = [], []
  for impl in ("xla", "splash"):
    model = model_lib.CausalLM(config.replace(attention_impl=impl))
    outs.append(jax.jit(functools.partial(sampling.sample, model, cfg=cfg))(
        params, tokens, mask, jax.random.key(7)))
    prefill = functools.partial(sampling.prefill, model, max_new_tokens=6)
    caches.append(jax.jit(prefill)(params, tokens, mask))
    jaxpr = str(jax.make_jaxpr(prefill)(params, tokens, mask))
    assert ("pallas_call" in jaxpr) == (impl == "splash")
  np.testing.assert_array_equal(outs[1]["tokens"], outs[0]["tokens"])
  np.testing.assert_allclose(outs[1]["logps"], outs[0]["logps"], rtol=0, atol=1e-5)
  # The cache on real prompt slots (padding slots hold what padding queries computed, which
  # the cache's mask hides from every later query).
  (cache_s, logits_s, pos_s), (cache_d, logits_d, pos_d) = caches
  np.testing.assert_array_equal(cache_s["mask"], cache_d["mask"])
  np.testing.assert_array_equal(pos_s, pos_d)
  np.testing.assert_allclose(logits_s, logits_d, rtol=0, atol=1e-5)
  real = np.asarray(cache_d["mask"], bool)[:, None, :, None]  # [B,1,S,1]
  leaves = [(k, v) for k, v in jax.tree_util.tree_flatten_with_path(cache_d)[0]
            if np.ndim(v) == 4]
  assert len(leaves) == 2 * config.num_hidden_layers
  for (path, want), got in zip(leaves, [v for v in jax.tree.leaves(cache_s) if np.ndim(v) == 4]):
    np.testing.assert_allclose(np.where(real, np.asarray(got, np.float32), 0),
                               np.where(real, np.asarray(want, np.float32), 0), rtol=0,
                               atol=1e-5, err_msg=str(path))
