"""models/sharding.py on 8 fake CPU devices: meshes, param specs, sharded forward == single device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.models.config import ModelConfig
from daa_jax.errors import ConfigError

# 5 heads, F=97, V=101: some dims divide the mesh axes, some do not (those replicate).
TINY = dict(vocab_size=101, hidden_size=120, num_hidden_layers=2, num_attention_heads=5,
            intermediate_size=97, max_position_embeddings=64)


def n_constraints(lowered) -> int:
  """Sharding constraints in lowered StableHLO (Shardy or GSPMD spelling)."""
  return len(re.findall(r"sdy\.sharding_constraint|@Sharding", lowered.as_text()))


def test_make_mesh():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh((-1, 2, 1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh((1, 1, 2), devices=jax.devices()[:2]).shape)["tensor"] == 2
  for bad in ((3, -1, 1), (2, 2, 1), (-1, -1, 1), (8, 1)):
    with pytest.raises(ConfigError, match="config.mesh"):
      sharding.make_mesh(bad)


def test_every_param_has_a_sharding():
  config = ModelConfig(**TINY)
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(config, mesh)
  abstract = model_lib.abstract_params(config)
  assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(abstract)
  assert all(isinstance(s, NamedSharding) for s in jax.tree_util.tree_leaves(shardings))
  layer = shardings["layers_0"]
  assert layer["attention"]["query_key_value"]["kernel"].spec == P("fsdp", "tensor")
  assert layer["attention"]["dense"]["kernel"].spec == P("tensor", "fsdp")
  assert layer["input_layernorm"]["scale"].spec == P(None)
  # 97 and 101 do not divide by 2: that axis is replicated rather than rejected by jit.
  assert layer["mlp"]["dense_h_to_4h"]["kernel"].spec == P("fsdp", None)
  assert shardings["embed_out"]["kernel"].spec == P("fsdp", None)
  scanned = sharding.param_shardings(config.replace(scan_layers=True), mesh)
  assert scanned["layers"]["attention"]["query_key_value"]["kernel"].spec == P(
      None, "fsdp", "tensor")


def test_init_params_sharded_equals_unsharded():
  config = ModelConfig(**TINY)
  mesh = sharding.make_mesh((1, 2, 4))
  params = sharding.init_params_sharded(config, mesh, jax.random.key(3))
  qkv = params["layers_1"]["attention"]["query_key_value"]["kernel"]
  assert qkv.sharding.spec == P("fsdp", "tensor")
  assert qkv.addressable_shards[0].data.shape == (60, 90)
  expected = model_lib.init_params(config, jax.random.key(3))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


@pytest.fixture(scope="module")
def reference():
  config = ModelConfig(**TINY)
  rng = np.random.default_rng(0)
  # Random biases and norms too, so a misplaced shard of any tensor shows.
  params = jax.tree_util.tree_map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32) + (x.ndim == 1),
      model_lib.abstract_params(config))
  tokens = rng.integers(0, 101, (8, 12)).astype(np.int32)
  mask = np.ones((8, 12), np.int32)
  mask[::2, :3] = 0  # left padding on half the rows
  single = jax.jit(lambda p, t, m: model_lib.CausalLM(config).apply(
      {"params": p}, t, attention_mask=m))
  return config, params, {"tokens": tokens, "mask": mask}, np.asarray(
      single(params, tokens, mask))


@pytest.mark.parametrize("mesh_shape,scan", [((8, 1, 1), False), ((2, 2, 2), False),
                                             ((1, 2, 4), False), ((2, 2, 2), True)])
def test_sharded_forward_matches_single_device(reference, mesh_shape, scan):
  config, host_params, host_batch, expected = reference
  if scan:
    config = config.replace(scan_layers=True, remat_policy="full")
    host_params = model_lib.to_scan_layout(host_params, config.num_hidden_layers)
  mesh = sharding.make_mesh(mesh_shape)
  p_shard = sharding.param_shardings(config, mesh)
  params = sharding.place_params(host_params, p_shard)
  batch = sharding.host_to_global(host_batch, mesh)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)

  def fwd(params, batch):
    return model_lib.CausalLM(config).apply({"params": params}, batch["tokens"],
                                           attention_mask=batch["mask"])

  b_shard = jax.tree_util.tree_map(lambda x: x.sharding, batch)
  out_shard = NamedSharding(mesh, P(("data", "fsdp")))
  fwd = jax.jit(fwd, in_shardings=(p_shard, b_shard), out_shardings=out_shard)
  with sharding.activate(mesh):
    logits = fwd(params, batch)
    assert n_constraints(fwd.lower(params, batch)) > 0  # activation constraints applied
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_constraints_are_noops_without_rules():
  config = ModelConfig(**TINY)
  params = model_lib.abstract_params(config)
  tokens = jax.ShapeDtypeStruct((8, 4), jnp.int32)
  fwd = jax.jit(lambda p, t: model_lib.CausalLM(config).apply({"params": p}, t))
  assert n_constraints(fwd.lower(params, tokens)) == 0
  with sharding.activate(sharding.make_mesh((2, 2, 2))):
    # Residual stream, q/k/v/attention out, MLP hidden per layer, embeddings, logits.
    assert n_constraints(fwd.lower(params, tokens)) >= 2 * 6


def test_sharded_decoding_matches_single_device(reference):
  config, host_params, host_batch, _ = reference
  mesh = sharding.make_mesh((2, 2, 2))
  params = sharding.place_params(host_params, sharding.param_shardings(config, mesh))
  tokens, mask = host_batch["tokens"], host_batch["mask"]

  def prefill(params, tokens, mask, cache):
    return model_lib.CausalLM(config).apply({"params": params}, tokens, attention_mask=mask,
                                           cache=cache)

  cache = model_lib.init_cache(config, 8, 16)
  expected, _ = jax.jit(prefill)(host_params, tokens, mask, cache)
  c_shard = sharding.cache_shardings(mesh, cache)
  assert c_shard["layers_0"]["k"].spec == P(("data", "fsdp"), None, None, None)  # 5 heads
  with sharding.activate(mesh):
    cache = jax.device_put(cache, c_shard)
    logits, cache = jax.jit(prefill, out_shardings=(None, c_shard))(
        params, sharding.host_to_global(tokens, mesh), sharding.host_to_global(mask, mesh),
        cache)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
  assert cache["layers_1"]["v"].sharding.spec == c_shard["layers_1"]["v"].spec
