"""LoRA exports (`train/lora_export.py`): merged weights in transformers, and the adapter in
PEFT's format loaded by `peft.PeftModel.from_pretrained` onto the HF base."""

import json
import os

import numpy as np
import jax
import pytest
import torch
import transformers

from daa_jax.errors import CheckpointError
from daa_jax.models import lora
from daa_jax.models import model as model_lib
from daa_jax.train import loop as train
from daa_jax.models import sharding
from daa_jax.train import init as init_lib
from daa_jax.train import lora_export
from daa_jax.train import lora_state

from test_train import tiny  # noqa: E402  (tests/train on sys.path)

peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=264, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=128)
HF = {
    "llama": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2,
                                              tie_word_embeddings=False),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
}


def _hf_base(tmp_path, family):
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(HF[family]())
  path = str(tmp_path / f"{family}_base")
  hf.save_pretrained(path)
  return path


def _logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("family", list(HF))
def test_merged_and_peft_exports_give_the_merged_forwards_logits(tmp_path, family):
  base_dir = _hf_base(tmp_path, family)
  run = str(tmp_path / "run")
  train.run(tiny("job=sft", **{"model.lora.rank": 4, "model.lora.alpha": 8.0,
                               "model.lora.target": "all_linear", "train.max_steps": 3,
                               "optim.lr": 1e-2, "hf_model": base_dir, "model.size": "auto"}),
            run)
  run_cfg, model_cfg, base, adapters, step = lora_export.load_run(run)
  assert step == 3
  assert all(np.abs(np.asarray(v)).max() > 1e-4 for p, v in lora.flatten(adapters).items()
             if p[-1] == "b")  # trained: the adapters change the function
  tokens = np.random.default_rng(0).integers(0, 264, (2, 11)).astype(np.int32)
  merged = lora.merge(base, adapters, 2.0)
  ours = np.asarray(model_lib.CausalLM(model_cfg).apply({"params": merged}, tokens))
  plain = np.asarray(model_lib.CausalLM(model_cfg).apply({"params": base}, tokens))
  assert np.abs(ours - plain).max() > 1e-3
  out = lora_export.export(run, str(tmp_path / "merged"), str(tmp_path / "peft"))
  assert out == {"step": 3, "merged": str(tmp_path / "merged"), "peft": str(tmp_path / "peft")}
  hf_merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert np.abs(_logits(hf_merged, tokens) - ours).max() <= 1e-4
  cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
  assert cfg["base_model_name_or_path"] == base_dir and cfg["r"] == 4
  with_adapter = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "peft")).eval()
  assert np.abs(_logits(with_adapter, tokens) - ours).max() <= 1e-4
  # A scan_layers run starting from this one reads the adapters in its own layout (the HF
  # base is the same weights in either layout: same fingerprint).
  scan_cfg = model_cfg.replace(scan_layers=True)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  scan_base, scan_adapters, _ = init_lib.lora_run_parts(
      run, run_cfg, scan_cfg, mesh, sharding.param_shardings(scan_cfg, mesh))
  assert "layers" in scan_adapters
  scanned = np.asarray(model_lib.CausalLM(scan_cfg).apply(
      {"params": lora.merge(scan_base, scan_adapters, 2.0)}, tokens))
  np.testing.assert_allclose(scanned, ours, atol=1e-5)
  # Every tensor was read: the adapter's lora_B weights are those we wrote (not fresh zeros).
  loaded = {k for k, _ in with_adapter.named_parameters() if "lora_B" in k}
  assert len(loaded) == len(lora.adapted_modules(adapters))


def test_peft_export_of_a_scanned_scratch_run_writes_the_base_and_a_full_run_is_refused(
    tmp_path):
  run = str(tmp_path / "run")
  train.run(tiny("job=sft", **{"model.lora.rank": 2, "train.max_steps": 2, "optim.lr": 1e-2,
                               "model.scan_layers": True}), run)
  _, model_cfg, base, adapters, _ = lora_export.load_run(run)
  assert model_cfg.scan_layers and "layers" in adapters  # [N, ...] adapters
  out = lora_export.export(run, peft_dir=str(tmp_path / "peft"))
  assert out["base"] == str(tmp_path / "peft" / "base")
  model = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(out["base"]),
      str(tmp_path / "peft")).eval()
  keys = [k for k, _ in model.named_parameters() if "lora_A" in k]
  assert len(keys) == 4 and all("attention" in k for k in keys)
  tokens = np.random.default_rng(1).integers(0, 264, (2, 9)).astype(np.int32)
  ours = np.asarray(model_lib.CausalLM(model_cfg).apply(
      {"params": lora.merge(base, adapters, 16.0 / 2)}, tokens))
  assert np.abs(_logits(model, tokens) - ours).max() <= 1e-4
  # A scratch init is another base in the other layout (nn.scan draws other numbers): a run
  # without scan_layers refuses these adapters.
  flat_cfg = model_cfg.replace(scan_layers=False)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with pytest.raises(CheckpointError, match="fingerprint"):
    init_lib.lora_run_parts(run, lora_state.run_lora(run), flat_cfg, mesh,
                            sharding.param_shardings(flat_cfg, mesh))
  full = str(tmp_path / "full")
  train.run(tiny("job=sft", **{"train.max_steps": 1}), full)
  with pytest.raises(CheckpointError, match="is not a LoRA run"):
    lora_export.export(full, merged_dir=str(tmp_path / "m"))
  assert lora_export.main([full, "--merged", str(tmp_path / "m")]) == 2
  assert not os.path.exists(tmp_path / "m")
