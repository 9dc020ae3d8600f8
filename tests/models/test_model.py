"""models/model.py: param counts, KV-cache decoding, packing, scan/remat, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.models import model as model_lib
from daa_jax.models.config import PYTHIA_SIZES, ModelConfig, pythia
from daa_jax.errors import ConfigError

TINY = dict(vocab_size=101, hidden_size=120, num_hidden_layers=2, num_attention_heads=5,
            intermediate_size=97, max_position_embeddings=64)
REAL_SIZES = [s for s in PYTHIA_SIZES if not s.startswith("tiny")]
# Total parameter counts published with the Pythia suite (Biderman et al. 2023, Table 1
# of the model card), independent of transformers.
PUBLISHED = {"70m": 70_426_624, "160m": 162_322_944, "410m": 405_334_016,
             "1b": 1_011_781_632, "1.4b": 1_414_647_808, "2.8b": 2_775_208_960,
             "6.9b": 6_857_302_016, "12b": 11_846_072_320}


def random_params(config, seed=0):
  """Random host params, every leaf random (the default init has zero biases, unit norms).

  Drawn with numpy from the abstract tree: no XLA compile of the initializers.
  """
  rng = np.random.default_rng(seed)

  def draw(path, x):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(
      draw, model_lib.abstract_params(config.replace(scan_layers=False)))
  if config.scan_layers:
    params = model_lib.to_scan_layout(params, config.num_hidden_layers)
  return params


def forward(config, params, tokens, **kw):
  return model_lib.CausalLM(config).apply({"params": params}, tokens, **kw)


def test_param_counts_match_transformers():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  assert len(REAL_SIZES) == 10
  for size in REAL_SIZES:
    config = pythia(size)
    with torch.device("meta"):  # shapes only, no memory
      hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf()))
    expected = sum(p.numel() for p in hf.parameters())  # parameters, not buffers
    assert model_lib.param_count(model_lib.abstract_params(config)) == expected, size
    assert model_lib.param_count(
        model_lib.abstract_params(config.replace(scan_layers=True))) == expected, size
    if size in PUBLISHED:
      assert expected == PUBLISHED[size], size


def test_param_tree_uses_hf_names():
  params = model_lib.abstract_params(ModelConfig(**TINY))
  assert set(params) == {"embed_in", "layers_0", "layers_1", "final_layer_norm", "embed_out"}
  assert set(params["layers_0"]) == {"input_layernorm", "post_attention_layernorm",
                                     "attention", "mlp"}
  assert params["layers_0"]["attention"]["query_key_value"]["kernel"].shape == (120, 360)
  assert params["layers_0"]["mlp"]["dense_4h_to_h"]["kernel"].shape == (97, 120)
  assert params["embed_in"]["embedding"].shape == (101, 120)
  assert params["embed_out"]["kernel"].shape == (120, 101)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  boxed = model_lib.abstract_params(ModelConfig(**TINY, scan_layers=True), boxed=True)
  assert boxed["layers"]["attention"]["query_key_value"]["kernel"].names == (
      "layers", "embed", "qkv")


def _decode_batch(seed=0):
  """Left-padded prompts of length P=6 (row 1 has 2 pads, row 2 has 5), then G=4 tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 101, (3, 10)).astype(np.int32)
  mask = np.ones((3, 10), np.int32)
  mask[1, :2] = 0
  mask[2, :5] = 0
  return tokens, mask


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_matches_full_forward(scan):
  config = ModelConfig(**TINY, scan_layers=scan)
  params = random_params(config)
  tokens, mask = _decode_batch()
  full = np.asarray(jax.jit(functools.partial(forward, config))(
      params, tokens, attention_mask=mask))
  real = mask.astype(bool)

  @jax.jit
  def step(params, tokens, mask, cache):
    return forward(config, params, tokens, attention_mask=mask, cache=cache)

  cache = model_lib.init_cache(config, batch_size=3, max_len=12)
  logits, cache = step(params, tokens[:, :6], mask[:, :6], cache)  # prefill
  np.testing.assert_allclose(np.asarray(logits)[real[:, :6]], full[:, :6][real[:, :6]],
                             atol=1e-5, rtol=0)
  assert int(cache["index"]) == 6
  for t in range(6, 10):
    logits, cache = step(params, tokens[:, t:t + 1], mask[:, t:t + 1], cache)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0)
  assert int(cache["index"]) == 10
  np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :10], real)
  assert not np.asarray(cache["mask"])[:, 10:].any()


def test_kv_cache_chunked_prefill_and_explicit_positions():
  config = ModelConfig(**TINY)
  params = random_params(config, seed=3)
  tokens, mask = _decode_batch(seed=1)
  full = np.asarray(jax.jit(functools.partial(forward, config))(
      params, tokens, attention_mask=mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  cache = model_lib.init_cache(config, batch_size=3, max_len=10)
  step = jax.jit(lambda tokens, mask, positions, cache: forward(
      config, params, tokens, attention_mask=mask, positions=positions, cache=cache))
  outs = []
  for lo, hi in ((0, 5), (5, 10)):  # causal within each chunk, all cached before
    logits, cache = step(tokens[:, lo:hi], mask[:, lo:hi], positions[:, lo:hi], cache)
    outs.append(np.asarray(logits))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=1e-5, rtol=0)


def test_cache_layout():
  config = ModelConfig(**TINY)
  cache = model_lib.init_cache(config, 2, 7)
  assert cache["layers_1"]["k"].shape == (2, 5, 7, 24)  # [B,H,S,K]
  assert cache["mask"].shape == (2, 7) and cache["index"].dtype == jnp.int32
  scanned = model_lib.init_cache(config.replace(scan_layers=True), 2, 7, dtype=jnp.bfloat16)
  assert scanned["layers"]["v"].shape == (2, 2, 5, 7, 24)
  assert scanned["layers"]["v"].dtype == jnp.bfloat16


def test_segments_attend_only_within_themselves():
  config = ModelConfig(**TINY)
  params = random_params(config, seed=4)
  fn = jax.jit(lambda tokens, mask, segment_ids: forward(
      config, params, tokens, attention_mask=mask, segment_ids=segment_ids))
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, 101, (3, 10)).astype(np.int32)
  # Row 0 packs two sequences (5 + 4 tokens) and one pad; rows 1 and 2 hold each one alone.
  segment_ids = np.array([[1] * 5 + [2] * 4 + [0], [1] * 10, [1] * 10], np.int32)
  mask = np.array([[1] * 9 + [0], [1] * 5 + [0] * 5, [1] * 4 + [0] * 6], np.int32)
  tokens[1, :5], tokens[2, :4] = tokens[0, :5], tokens[0, 5:9]
  got = np.asarray(fn(tokens, mask, segment_ids))
  np.testing.assert_allclose(got[0, :5], got[1, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[0, 5:9], got[2, :4], atol=1e-5, rtol=0)
  # Without segment ids the second sequence does see the first.
  unpacked = np.asarray(fn(tokens, mask, np.ones_like(segment_ids)))
  assert np.abs(unpacked[0, 5:9] - got[0, 5:9]).max() > 1e-3
  # Default positions restart at 0 in each segment (counting real tokens only).
  _, positions = model_lib._self_mask(jnp.asarray(mask, bool), None, jnp.asarray(segment_ids))
  np.testing.assert_array_equal(positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
  np.testing.assert_array_equal(positions[1], [0, 1, 2, 3, 4, 4, 4, 4, 4, 4])


def test_hidden_states_then_logits_equals_call():
  config = ModelConfig(**TINY)
  params = random_params(config, seed=5)
  tokens, mask = _decode_batch()
  model = model_lib.CausalLM(config)

  @jax.jit
  def chunked(params, tokens, mask):
    hidden = model.apply({"params": params}, tokens, attention_mask=mask,
                         method=model_lib.CausalLM.hidden_states)  # [B,L,D]
    # Chunking the vocab projection over the length axis gives the same logits.
    chunks = [model.apply({"params": params}, hidden[:, i:i + 4],
                          method=model_lib.CausalLM.logits_from_hidden) for i in (0, 4, 8)]
    return hidden, jnp.concatenate(chunks, 1)

  hidden, logits = chunked(params, tokens, mask)
  assert hidden.shape == (3, 10, 120)
  full = jax.jit(functools.partial(forward, config))(params, tokens, attention_mask=mask)
  np.testing.assert_allclose(logits, full, atol=1e-6, rtol=0)


def test_scan_and_remat_do_not_change_values():
  config = ModelConfig(**TINY)
  params = random_params(config, seed=6)
  tokens, mask = _decode_batch(seed=3)

  def loss(config, params):
    logits = forward(config, params, tokens, attention_mask=mask).astype(jnp.float32)
    logps = jax.nn.log_softmax(logits)[:, :-1]
    return -jnp.mean(jnp.take_along_axis(logps, tokens[:, 1:, None], -1))

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(functools.partial(loss, config)))(params)
  for scan, remat in ((True, "full"), (False, "dots_with_no_batch_dims")):
    cfg = config.replace(scan_layers=scan, remat_policy=remat)
    p = model_lib.to_scan_layout(params, 2) if scan else params
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(p)
    if scan:
      grads = model_lib.from_scan_layout(jax.device_get(grads), 2)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, atol=1e-6, rtol=1e-5), grads, ref_grads)
  round_trip = model_lib.from_scan_layout(model_lib.to_scan_layout(params, 2), 2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, round_trip, params)


def test_bfloat16_compute():
  config = ModelConfig(**TINY)
  params = random_params(config, seed=7)
  tokens, mask = _decode_batch(seed=4)
  f32 = np.asarray(jax.jit(functools.partial(forward, config))(
      params, tokens, attention_mask=mask))
  bf16 = jax.jit(functools.partial(forward, config.replace(dtype="bfloat16")))(
      params, tokens, attention_mask=mask)
  assert bf16.dtype == jnp.bfloat16
  real = mask.astype(bool)
  err = np.abs(np.asarray(bf16, np.float32) - f32)[real]
  # bf16 keeps ~3 significant digits; a float32-path bug (e.g. softmax) would be far off.
  assert err.max() < 0.05 * np.abs(f32).max(), (err.max(), np.abs(f32).max())


def test_odd_rotary_dim_is_a_config_error():
  with pytest.raises(ConfigError, match="rotary"):
    ModelConfig(hidden_size=84, num_attention_heads=3, rotary_pct=0.25)  # 28 * 0.25 = 7


def test_own_attention_equals_jax_dot_product_attention_with_grads():
  """'xla' ([B,H,T,K] batched GEMMs) = jax.nn.dot_product_attention ('auto'), fwd and grads,
  with padding, packed segments and a shared segment."""
  config = ModelConfig(**TINY)
  params = random_params(config, seed=8)
  tokens, mask = _decode_batch(seed=5)
  segment_ids = np.array([[0] * 4 + [1] * 3 + [2] * 3] * 3, np.int32)
  results = []
  for impl in ("xla", "auto"):
    cfg = config.replace(attention_impl=impl)

    def loss(params, cfg=cfg):
      out = []
      for kw in ({}, {"segment_ids": segment_ids}, {"segment_ids": segment_ids,
                                                    "shared_segment": 0}):
        logits = forward(cfg, params, tokens, attention_mask=mask, **kw)
        out.append(jnp.sum(jnp.where(mask[..., None] > 0, jnp.sin(logits), 0.0)))
      return jnp.stack(out)

    value = jax.jit(loss)(params)
    grads = jax.jit(jax.grad(lambda p, loss=loss: jnp.sum(loss(p))))(params)
    results.append((np.asarray(value), jax.device_get(grads)))
  (v0, g0), (v1, g1) = results
  np.testing.assert_allclose(v0, v1, atol=1e-4, rtol=1e-6)
  assert len(set(np.round(v0, 3))) == 3  # the three masks really differ
  jax.tree_util.tree_map(
      functools.partial(np.testing.assert_allclose, atol=1e-5, rtol=1e-5), g0, g1)


def test_shared_segment_sees_the_prompt_and_restarts_positions():
  """A `[prompt | a | b]` row with shared_segment=0 equals the rows `[prompt | a]` and
  `[prompt | b]` at the response positions (default positions)."""
  config = ModelConfig(**TINY)
  params = random_params(config, seed=9)
  rng = np.random.default_rng(7)
  prompt, a, b = (rng.integers(0, 101, n).astype(np.int32) for n in (4, 3, 5))
  packed = np.concatenate([prompt, a, b, [0, 0]])[None]
  segment_ids = np.array([[0] * 4 + [1] * 3 + [2] * 5 + [-1] * 2], np.int32)
  mask = (segment_ids >= 0).astype(np.int32)
  got = np.asarray(jax.jit(functools.partial(forward, config))(
      params, packed, attention_mask=mask, segment_ids=segment_ids, shared_segment=0))[0]
  row_a = np.asarray(forward(config, params, np.concatenate([prompt, a])[None]))[0]
  row_b = np.asarray(forward(config, params, np.concatenate([prompt, b])[None]))[0]
  np.testing.assert_allclose(got[:7], row_a, atol=1e-5, rtol=0)
  np.testing.assert_allclose(got[7:12], row_b[4:], atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="shared_segment needs segment_ids"):
    forward(config, params, packed, shared_segment=0)
