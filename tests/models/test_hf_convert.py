"""Parity with transformers' GPTNeoXForCausalLM, both directions, and checkpoint errors."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from daa_jax.models import hf_convert
from daa_jax.models import model as model_lib
from daa_jax.models.config import ModelConfig
from daa_jax.errors import CheckpointError

# Odd sizes catch layout bugs: 5 heads of 24 dims (rotary 6 at 0.25), prime F and V.
TINY = dict(vocab_size=101, hidden_size=120, num_hidden_layers=2, num_attention_heads=5,
            intermediate_size=97, max_position_embeddings=64)


def make_hf(config: ModelConfig, seed: int = 0) -> transformers.GPTNeoXForCausalLM:
  """A random HF model in eval mode; every tensor randomized so biases and norms matter."""
  torch.manual_seed(seed)
  hf = transformers.GPTNeoXForCausalLM(
      transformers.GPTNeoXConfig(**config.to_hf(), attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "layernorm" in name or "layer_norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)
  return hf


def hf_logits(hf, tokens, mask=None, positions=None) -> np.ndarray:
  with torch.no_grad():
    out = hf(torch.tensor(np.asarray(tokens), dtype=torch.long),
             attention_mask=None if mask is None else torch.tensor(np.asarray(mask)),
             position_ids=None if positions is None else torch.tensor(np.asarray(positions)))
  return out.logits.float().numpy()


def padded_batch(seed=0, vocab=101):
  """Rows: unpadded, right-padded, left-padded. Pad slots hold random (not pad) tokens."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (3, 9)).astype(np.int32)
  mask = np.ones((3, 9), np.int32)
  mask[1, 6:] = 0
  mask[2, :3] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def ours(config, params, tokens, mask=None, positions=None):
  fn = jax.jit(lambda p, t, m, pos: model_lib.CausalLM(config).apply(
      {"params": p}, t, attention_mask=m, positions=pos))
  return np.asarray(fn(params, tokens, mask, positions))


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_logits_match_transformers(parallel, rotary_pct):
  config = ModelConfig(**TINY, use_parallel_residual=parallel, rotary_pct=rotary_pct)
  hf = make_hf(config)
  params = hf_convert.params_from_hf_state_dict(config, hf.state_dict())
  tokens, mask, positions = padded_batch()
  expected = hf_logits(hf, tokens, mask, positions)
  got = ours(config, params, tokens, mask)  # default positions = cumsum(mask) - 1
  real = mask.astype(bool)
  assert np.abs(got[real] - expected[real]).max() <= 1e-4
  # The default positions are the HF ones passed explicitly.
  np.testing.assert_array_equal(got, ours(config, params, tokens, mask, positions))
  # No mask at all is HF's default too.
  np.testing.assert_allclose(ours(config, params, tokens), hf_logits(hf, tokens), atol=1e-4,
                             rtol=0)


def test_export_loads_in_transformers(tmp_path):
  config = ModelConfig(**TINY, rotary_pct=1.0, use_parallel_residual=False)
  hf = make_hf(config, seed=1)
  params = hf_convert.params_from_hf_state_dict(config, hf.state_dict())
  hf_convert.save_pretrained(config, params, str(tmp_path))
  reloaded, info = transformers.GPTNeoXForCausalLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  reloaded.eval()
  assert reloaded.config.rope_parameters["partial_rotary_factor"] == 1.0
  assert reloaded.config.use_parallel_residual is False
  tokens, mask, positions = padded_batch(seed=3)
  real = mask.astype(bool)
  got = hf_logits(reloaded, tokens, mask, positions)
  assert np.abs(got[real] - hf_logits(hf, tokens, mask, positions)[real]).max() <= 1e-5
  assert np.abs(got[real] - ours(config, params, tokens, mask)[real]).max() <= 1e-5
  # import -> export -> import is the identity, config included.
  config2, params2 = hf_convert.load_pretrained(str(tmp_path))
  assert config2 == config == hf_convert.load_config(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  config3, scanned = hf_convert.load_pretrained(str(tmp_path),
                                                config_overrides={"scan_layers": True})
  assert config3 == config.replace(scan_layers=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned,
                         model_lib.to_scan_layout(params, 2))
  state = hf_convert.hf_state_dict_from_params(config, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         hf_convert.params_from_hf_state_dict(config, state), params)


def test_scan_layout_roundtrip():
  config = ModelConfig(**TINY)
  hf = make_hf(config, seed=2)
  params = hf_convert.params_from_hf_state_dict(config, hf.state_dict())
  scan_config = config.replace(scan_layers=True)
  scanned = hf_convert.params_from_hf_state_dict(scan_config, hf.state_dict())
  assert scanned["layers"]["attention"]["query_key_value"]["kernel"].shape == (2, 120, 360)
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned,
                         model_lib.to_scan_layout(params, 2))
  # Export accepts either layout and gives the same tensors.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         hf_convert.hf_state_dict_from_params(scan_config, scanned),
                         hf_convert.hf_state_dict_from_params(config, params))


def _old_state_dict(hf, config):
  """The tensors of a transformers-4.24-era Pythia checkpoint: float16, old names, buffers."""
  state = {}
  for name, value in hf.state_dict().items():
    name = "embed_out.weight" if name == "lm_head.weight" else name
    state[name] = value.detach().clone().half()
  mp, rot = config.max_position_embeddings, config.rotary_dim
  for i in range(config.num_hidden_layers):
    state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(
        torch.ones((mp, mp), dtype=torch.bool)).view(1, 1, mp, mp)
    state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
    state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rot, 2).float() / rot))
  return state


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "sharded_safetensors"])
def test_loads_hub_pythia_checkpoint(tmp_path, fmt):
  config = ModelConfig(**{**TINY, "max_position_embeddings": 2048})
  old_config = {
      "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
      "hidden_act": "gelu", "hidden_size": 120, "initializer_range": 0.02,
      "intermediate_size": 97, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
      "model_type": "gpt_neox", "num_attention_heads": 5, "num_hidden_layers": 2,
      "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
      "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
      "use_parallel_residual": True, "vocab_size": 101}
  hf = make_hf(config, seed=4)
  state = _old_state_dict(hf, config)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old_config, f)
  if fmt == "bin":
    torch.save(state, tmp_path / "pytorch_model.bin")
  else:
    from safetensors.torch import save_file
    names = sorted(state)
    shards = [names] if fmt == "safetensors" else [names[:10], names[10:]]
    weight_map = {}
    for j, shard in enumerate(shards):
      fname = ("model.safetensors" if len(shards) == 1
               else f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors")
      save_file({k: state[k].contiguous() for k in shard}, tmp_path / fname,
                metadata={"format": "pt"})
      weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
      with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)

  loaded_config, params = hf_convert.load_pretrained(str(tmp_path))
  assert loaded_config == config
  assert params["embed_in"]["embedding"].dtype == np.float32
  # The reference: the same float16-rounded weights in HF, run in float32.
  hf.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): v.float()
                      for k, v in state.items() if k in hf.state_dict() or k ==
                      "embed_out.weight"})
  tokens, mask, positions = padded_batch(seed=5)
  real = mask.astype(bool)
  expected = hf_logits(hf, tokens, mask, positions)
  got = ours(config, params, tokens, mask)
  assert np.abs(got[real] - expected[real]).max() <= 1e-4


def test_bfloat16_checkpoint_is_cast(tmp_path):
  config = ModelConfig(**TINY)
  hf = make_hf(config, seed=6)
  state = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
  params = hf_convert.params_from_hf_state_dict(config, state)
  np.testing.assert_array_equal(params["embed_in"]["embedding"],
                                state["gpt_neox.embed_in.weight"].float().numpy())
  # Writing bfloat16 safetensors and reading them back (numpy via ml_dtypes).
  hf_convert.save_pretrained(config, params, str(tmp_path), dtype=jax.numpy.bfloat16)
  _, again = hf_convert.load_pretrained(str(tmp_path))
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


@pytest.fixture(scope="module")
def tiny_state():
  config = ModelConfig(**TINY)
  return config, {k: v.numpy() for k, v in make_hf(config, seed=7).state_dict().items()}


def test_wrong_shape_names_the_tensor(tiny_state):
  config, state = tiny_state
  bad = dict(state)
  bad["gpt_neox.layers.1.attention.query_key_value.weight"] = np.zeros((360, 119), np.float32)
  with pytest.raises(CheckpointError,
                     match=r"gpt_neox\.layers\.1\.attention\.query_key_value\.weight.*"
                           r"\(360, 119\).*\(360, 120\)"):
    hf_convert.params_from_hf_state_dict(config, bad)


def test_missing_tensor_names_the_tensor(tiny_state):
  config, state = tiny_state
  bad = {k: v for k, v in state.items() if k != "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"}
  with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.bias"):
    hf_convert.params_from_hf_state_dict(config, bad)


def test_unknown_tensor_names_the_tensor(tiny_state):
  config, state = tiny_state
  bad = dict(state, **{"gpt_neox.layers.2.attention.dense.weight": np.zeros((120, 120))})
  with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.2\.attention\.dense\.weight"):
    hf_convert.params_from_hf_state_dict(config, bad)


def test_bad_file_names_tensor_and_file(tmp_path, tiny_state):
  config, state = tiny_state
  from safetensors.numpy import save_file
  bad = dict(state)
  bad["embed_out.weight"] = bad.pop("lm_head.weight")[:100]
  save_file(bad, tmp_path / "model.safetensors")
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config.to_hf(), f)
  with pytest.raises(CheckpointError,
                     match=r"embed_out\.weight.*model\.safetensors.*\(100, 120\).*\(101, 120\)"):
    hf_convert.load_pretrained(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(CheckpointError, match="has no model.safetensors"):
    hf_convert.load_pretrained(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="has no config.json"):
    hf_convert.load_pretrained(str(tmp_path))
  with pytest.raises(CheckpointError, match="neither a model directory nor a hub id"):
    hf_convert.load_pretrained(str(tmp_path / "nothing" / "here"))
