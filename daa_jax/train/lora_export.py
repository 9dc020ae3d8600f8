"""Exports of a LoRA run: merged Hugging Face weights, or the adapter in PEFT's format.

  python -m daa_jax.train.lora_export RUN_DIR[@STEP] --merged OUT_DIR   # config.json + safetensors
  python -m daa_jax.train.lora_export RUN_DIR[@STEP] --peft OUT_DIR     # adapter_config.json +
                                                                        # adapter_model.safetensors

`--merged`: `hf_convert.save_pretrained` of W + (alpha/rank)·A@B, loadable by
`transformers.AutoModelForCausalLM.from_pretrained`. `--peft`: PEFT's LoRA files (keys
`base_model.model.<HF module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
`target_modules` the adapted modules' HF names), for `peft.PeftModel.from_pretrained(base,
OUT_DIR)`. Its `base_model_name_or_path` is the run's `hf_model` when the base is one; any
other base (an `init_from` run, a scratch init) is written as HF weights to `OUT_DIR/base`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from daa_jax.errors import CheckpointError, ConfigError
from daa_jax.models import hf_convert
from daa_jax.models import lora as lora_lib
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.train import init as init_lib
from daa_jax.train import lora_state


def load_run(spec: str):
  """(run config, model config, base, adapters, step) of LoRA run `RUN_DIR[@STEP]`, on one
  device."""
  run_dir = str(spec).partition("@")[0]
  run_cfg = lora_state.run_lora(run_dir)
  if run_cfg is None:
    raise CheckpointError(f"{run_dir} is not a LoRA run (its config.json has no "
                          "model.lora.rank > 0); export a full run with hf_convert.save_pretrained.")
  model_cfg = init_lib.model_config(run_cfg)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  shardings = sharding.param_shardings(model_cfg, mesh)
  base, adapters, step = init_lib.lora_run_parts(str(spec), run_cfg, model_cfg, mesh, shardings)
  return run_cfg, model_cfg, base, adapters, step


def save_merged(model_cfg, base, adapters, scale: float, out_dir: str, dtype=np.float32):
  """Merged weights as a Hugging Face checkpoint (float32 by default)."""
  merged = jax.tree.map(lambda x: x.astype(np.float32), lora_lib.merge(base, adapters, scale))
  hf_convert.save_pretrained(model_cfg, merged, out_dir, dtype=dtype)


def peft_tensors(model_cfg, adapters) -> tuple[dict[str, np.ndarray], list[str]]:
  """PEFT's adapter tensors and the adapted modules' HF names."""
  adapters = jax.device_get(adapters)
  if "layers" in adapters:
    adapters = model_lib.from_scan_layout(adapters, model_cfg.num_hidden_layers)
  hf_names = model_cfg.family.hf_names(model_cfg.replace(scan_layers=False))
  flat = lora_lib.flatten(adapters)
  tensors, modules = {}, []
  for path in lora_lib.adapted_modules(adapters):
    module = hf_names[path + ("kernel",)].removesuffix(".weight")
    modules.append(module)
    # ours: a [in, r], b [r, out]; torch Linear: lora_A.weight [r, in], lora_B.weight [out, r].
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
        np.asarray(flat[path + ("a",)], np.float32).T)
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
        np.asarray(flat[path + ("b",)], np.float32).T)
  return tensors, modules


def save_peft(model_cfg, adapters, rank: int, alpha: float, out_dir: str,
              base_name_or_path: str | None, dropout: float = 0.0) -> None:
  """`adapter_config.json` + `adapter_model.safetensors` as PEFT's `save_pretrained` writes
  (`lora_dropout`: the run's training rate; PEFT applies it in training mode only)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors, modules = peft_tensors(model_cfg, adapters)
  os.makedirs(out_dir, exist_ok=True)
  config = dict(
      peft_type="LORA", task_type="CAUSAL_LM", r=int(rank), lora_alpha=float(alpha),
      lora_dropout=float(dropout), target_modules=sorted(modules), bias="none",
      fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
      modules_to_save=None,
      base_model_name_or_path=base_name_or_path, inference_mode=True)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
            metadata={"format": "pt"})


def export(spec: str, merged_dir: str | None = None, peft_dir: str | None = None) -> dict:
  """Writes the requested exports of LoRA run `spec`; returns what was written where."""
  if not merged_dir and not peft_dir:
    raise ConfigError("lora_export: give --merged OUT_DIR and/or --peft OUT_DIR.")
  run_cfg, model_cfg, base, adapters, step = load_run(spec)
  lo, out = run_cfg.model.lora, {"step": step}
  if merged_dir:
    save_merged(model_cfg, base, adapters, lora_state.scale(run_cfg), merged_dir)
    out["merged"] = merged_dir
  if peft_dir:
    base_name = run_cfg.get("hf_model") if not run_cfg.get("init_from") else None
    if not base_name:
      base_name = os.path.abspath(os.path.join(peft_dir, "base"))
      hf_convert.save_pretrained(model_cfg, jax.tree.map(lambda x: x.astype(np.float32), base),
                                 base_name)
      out["base"] = base_name
    save_peft(model_cfg, adapters, int(lo.rank), float(lo.alpha), peft_dir, base_name,
              float(lo.get("dropout", 0.0)))
    out["peft"] = peft_dir
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m daa_jax.train.lora_export",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("run", help="RUN_DIR or RUN_DIR@STEP of a LoRA run")
  parser.add_argument("--merged", help="write merged HF weights here")
  parser.add_argument("--peft", help="write the adapter in PEFT's format here")
  args = parser.parse_args(argv)
  try:
    out = export(args.run, args.merged, args.peft)
  except (ConfigError, CheckpointError) as e:
    print(f"daa_jax: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
