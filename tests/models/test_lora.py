"""LoRA adapters over every family's params (`models/lora.py`): targets, init, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.models import lora
from daa_jax.models import model as model_lib
from daa_jax.models import config as model_configs

SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=64)
FAMILIES = {
    "gpt_neox": model_configs.pythia("tiny", **SMALL),
    "llama": model_configs.sized("tiny-llama", **SMALL),
    "mistral": model_configs.sized("tiny-llama", **SMALL, model_type="mistral",
                                   sliding_window=4),
    "qwen2": model_configs.sized("tiny-llama", **SMALL, model_type="qwen2", qkv_bias=True,
                                 tie_word_embeddings=True),
    "gemma2": model_configs.sized("tiny-gemma2", **SMALL),
}
# Per layer: the kernels each preset adapts.
ATTENTION = {"gpt_neox": {"attention/query_key_value", "attention/dense"}}
LLAMA_ATTN = {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj"}
ALL = {"gpt_neox": {"attention/query_key_value", "attention/dense", "mlp/dense_h_to_4h",
                    "mlp/dense_4h_to_h"}}
LLAMA_ALL = LLAMA_ATTN | {"mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}


def _modules(paths):
  return {"/".join(p[1:-1]) for p in paths}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_presets_select_each_familys_projections_and_never_the_head(family):
  cfg = FAMILIES[family]
  abstract = model_lib.abstract_params(cfg)
  attn = lora.target_paths(abstract, "attention")
  every = lora.target_paths(abstract, "all_linear")
  assert _modules(attn) == ATTENTION.get(family, LLAMA_ATTN)
  assert _modules(every) == ALL.get(family, LLAMA_ALL)
  assert {p[0] for p in every} == {"layers_0", "layers_1"}
  assert len(every) == 2 * len(ALL.get(family, LLAMA_ALL))
  # A regex: q/v projections of layer 1 only.
  if family != "gpt_neox":
    chosen = lora.target_paths(abstract, r"layers_1/self_attn/[qv]_proj")
    assert [("/".join(p)) for p in chosen] == ["layers_1/self_attn/q_proj/kernel",
                                               "layers_1/self_attn/v_proj/kernel"]


def test_bad_targets_are_config_errors_naming_the_kernels():
  abstract = model_lib.abstract_params(FAMILIES["llama"])
  with pytest.raises(ConfigError, match="selects no kernel.*layers_0/self_attn/q_proj/kernel"):
    lora.target_paths(abstract, "query_key_value")
  with pytest.raises(ConfigError, match="not a valid regex"):
    lora.target_paths(abstract, "q_proj(")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fresh_adapters_leave_the_forward_unchanged_and_merge_is_w_plus_scaled_ab(family):
  cfg = FAMILIES[family]
  params = model_lib.init_params(cfg, jax.random.key(0))
  adapters = lora.init_adapters(params, 4, "all_linear", jax.random.key(1))
  flat = lora.flatten(adapters)
  for path, x in flat.items():
    assert x.dtype == jnp.float32
    if path[-1] == "a":
      fan_in = x.shape[-2]
      assert x.shape[-1] == 4 and np.abs(np.asarray(x)).max() <= 1 / np.sqrt(fan_in)
      assert np.std(np.asarray(x)) > 0.2 / np.sqrt(fan_in)  # uniform, not zeros
    else:
      assert not np.asarray(x).any()  # B = 0
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)), jnp.int32)
  model = model_lib.CausalLM(cfg)
  fwd = jax.jit(lambda p: model.apply({"params": p}, tokens))
  merged = lora.merge(params, adapters, 2.0)
  np.testing.assert_array_equal(np.asarray(fwd(params)), np.asarray(fwd(merged)))
  assert lora.merge(params, None, 2.0) is params
  # Non-zero B: W + scale·A@B on targeted kernels, others the base's own arrays.
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)
  merged = lora.flatten(lora.merge(params, adapters, 0.5))
  base = lora.flatten(params)
  for path in lora.adapted_modules(adapters):
    a, b = (np.asarray(lora.flatten(adapters)[path + (k,)]) for k in "ab")
    np.testing.assert_allclose(np.asarray(merged[path + ("kernel",)]),
                               np.asarray(base[path + ("kernel",)]) + 0.5 * a @ b, atol=1e-6)
  untouched = [p for p in base if p[:-1] not in lora.adapted_modules(adapters)]
  assert untouched and all(merged[p] is base[p] for p in untouched)


def test_scan_layout_adapters_merge_as_the_per_layer_ones():
  cfg = FAMILIES["llama"]
  scan_cfg = cfg.replace(scan_layers=True)
  params = model_lib.init_params(cfg, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.02, lora.init_adapters(params, 3, "attention",
                                                                 jax.random.key(1)))
  scan_params = model_lib.to_scan_layout(params, 2)
  scan_adapters = model_lib.to_scan_layout(adapters, 2)
  assert lora.flatten(scan_adapters)[("layers", "self_attn", "q_proj", "a")].shape == (2, 32, 3)
  assert jax.tree.map(jnp.shape, lora.abstract_adapters(scan_params, 3, "attention")) == \
      jax.tree.map(jnp.shape, scan_adapters)
  tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  got = model_lib.CausalLM(scan_cfg).apply(
      {"params": lora.merge(scan_params, scan_adapters, 1.5)}, tokens)
  want = model_lib.CausalLM(cfg).apply({"params": lora.merge(params, adapters, 1.5)}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_a_bfloat16_base_merges_into_float32_kernels():
  cfg = FAMILIES["gpt_neox"]
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        model_lib.init_params(cfg, jax.random.key(0)))
  adapters = lora.init_adapters(params, 2, "attention", jax.random.key(1))
  merged = lora.flatten(lora.merge(params, adapters, 1.0))
  k = ("layers_0", "attention", "dense", "kernel")
  assert merged[k].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(merged[k]),
                                np.asarray(lora.flatten(params)[k]).astype(np.float32))


def _nonzero_adapters(params, target="all_linear", rank=4):
  adapters = lora.init_adapters(params, rank, target, jax.random.key(1))
  return {p: (v + 0.05 * jax.random.normal(jax.random.key(i), v.shape) if p[-1] == "b" else v)
          for i, (p, v) in enumerate(lora.flatten(adapters).items())}


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_activation_form_without_dropout_equals_the_merged_forward(family, scan):
  """`with_adapters` (x@W + x@A@(s·B) in each layer, the form dropout needs) computes the
  merged model W + s·A@B for every family, per layer or scanned."""
  cfg = FAMILIES[family].replace(scan_layers=scan)
  params = model_lib.init_params(FAMILIES[family], jax.random.key(0))
  adapters = lora.unflatten(_nonzero_adapters(params))
  if scan:
    params, adapters = (model_lib.to_scan_layout(t, 2) for t in (params, adapters))
  model = model_lib.CausalLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)), jnp.int32)
  merged = model.apply({"params": lora.merge(params, adapters, 1.5)}, tokens)
  base = model.apply({"params": params}, tokens)
  act = lora.with_adapters(model, adapters, 1.5, 0.0, jax.random.key(7))
  got = act.apply({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(merged), atol=2e-5)
  assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-3  # the adapters matter
  # With dropout: other logits, the same ones for the same key, others for another key.
  drop = lambda key: lora.with_adapters(model, adapters, 1.5, 0.3, key).apply(  # noqa: E731
      {"params": params}, tokens)
  d1, d1b, d2 = (np.asarray(drop(jax.random.key(k))) for k in (7, 7, 8))
  np.testing.assert_array_equal(d1, d1b)
  assert np.abs(d1 - np.asarray(merged)).max() > 1e-4 and np.abs(d1 - d2).max() > 1e-4


def test_dropout_is_inverted_on_the_adapter_input_only():
  """One adapted Dense with W = 0, A = B = I, scale 1: the output is exactly
  where(keep, x/(1-p), 0) for the layer's own mask, whose keep rate is 1-p."""
  from daa_jax.models import layers
  rate, d, n = 0.25, 16, 512
  dense = layers._Dense(d, use_bias=False, lora_dropout=rate)
  x = jax.random.normal(jax.random.key(0), (n, d))
  variables = {"params": {"kernel": jnp.zeros((d, d))},
               "lora": {"a": jnp.eye(d), "b": jnp.eye(d)}}
  out, state = dense.apply(variables, x, rngs={"dropout": jax.random.key(3)},
                           mutable=["intermediates"])
  keep = np.asarray(state["intermediates"]["lora_keep"][0])
  np.testing.assert_allclose(np.asarray(out), np.where(keep, np.asarray(x) / (1 - rate), 0),
                             rtol=1e-6)
  frac = keep.mean()  # n·d = 8192 draws: sd of the fraction 0.0048
  assert abs(frac - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / keep.size), frac
  # No rng (evaluation) or no adapters: no dropout, the plain layer.
  np.testing.assert_allclose(np.asarray(dense.apply(variables, x)), np.asarray(x), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(dense.apply({"params": variables["params"]}, x)),
                                np.zeros((n, d)))


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_each_adapted_module_and_layer_draws_its_own_dropout_mask(scan):
  cfg = FAMILIES["llama"].replace(scan_layers=scan)
  params = model_lib.init_params(FAMILIES["llama"], jax.random.key(0))
  adapters = lora.unflatten(_nonzero_adapters(params, "attention"))
  if scan:
    params, adapters = (model_lib.to_scan_layout(t, 2) for t in (params, adapters))
  model = model_lib.CausalLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (4, 16)), jnp.int32)
  _, state = lora.with_adapters(model, adapters, 1.0, 0.5, jax.random.key(0)).apply(
      {"params": params}, tokens, mutable=["intermediates"])
  masks = {}
  for path, (keep,) in lora.flatten(state["intermediates"]).items():
    keep = np.asarray(keep)
    for layer, m in enumerate(keep if scan else [keep]):
      masks[(layer if scan else path[0], path[-2])] = m
  assert len(masks) == 2 * 4  # q, k, v, o of two layers
  values = list(masks.values())
  for m in values:
    assert m.shape == (64, 32) and abs(m.mean() - 0.5) < 0.05
  for i in range(len(values)):
    for j in range(i):
      assert (values[i] != values[j]).mean() > 0.3  # independent masks differ in ~half


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_dropout_gradients_under_remat_equal_the_stored_forward_and_finite_differences(scan):
  """Full remat recomputes each layer in the backward pass: it must redraw the same masks,
  so loss and adapter gradients equal the no-remat ones, and the gradient along a direction
  equals the central difference of the loss (same key)."""
  base_cfg = FAMILIES["llama"]
  params = model_lib.init_params(base_cfg, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.05,
                          lora.init_adapters(params, 4, "all_linear", jax.random.key(1)))
  if scan:
    params, adapters = (model_lib.to_scan_layout(t, 2) for t in (params, adapters))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 9)), jnp.int32)

  def loss_fn(remat):
    model = model_lib.CausalLM(base_cfg.replace(scan_layers=scan, remat_policy=remat))
    def loss(a):
      logits = lora.with_adapters(model, a, 2.0, 0.3, jax.random.key(5)).apply(
          {"params": params}, tokens)
      return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 3])
    return loss

  (v0, g0), (v1, g1) = (jax.value_and_grad(loss_fn(r))(adapters) for r in ("none", "full"))
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
  d = jax.tree.map(lambda x: jax.random.normal(jax.random.key(9), x.shape), adapters)
  loss, eps = loss_fn("full"), 1e-3
  step = lambda s: jax.tree.map(lambda x, y: x + s * eps * y, adapters, d)  # noqa: E731
  fd = (loss(step(1.0)) - loss(step(-1.0))) / (2 * eps)
  analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(d)))
  np.testing.assert_allclose(float(fd), float(analytic), rtol=1e-3)
