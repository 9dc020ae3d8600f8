"""The model families: which module implements each HF `model_type`, and what daa_jax
needs to know about it (`Family`).

Adding a family: a module in `daa_jax/models/` that subclasses `common.CausalLM`, names its
modules as its HF checkpoint does and calls `registry.register(registry.Family(...))`, plus
one line in `MODULES` below. Modules are imported on first use, so nothing here imports a
family (and `ModelConfig` can name its family without an import cycle).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from daa_jax.errors import ConfigError

# daa_jax.models.config.ModelConfig, not imported: ModelConfig names its family through
# this module, so importing it here would be a cycle.
ModelConfig = Any

# HF model_type -> the module that registers it.
MODULES = {
    "gpt_neox": "daa_jax.models.gpt_neox",
    "llama": "daa_jax.models.llama",
    "mistral": "daa_jax.models.llama",
    "qwen2": "daa_jax.models.llama",
    "gemma2": "daa_jax.models.gemma2",
}

@dataclasses.dataclass(frozen=True)
class Family:
  """What daa_jax needs to know about one model family, beyond its Linen modules.

  Attributes:
    module: the `CausalLM` subclass.
    model_types: HF `model_type`s it loads (e.g. llama, mistral, qwen2).
    config_from_hf: HF config.json dict -> `ModelConfig` keyword arguments.
    config_to_hf: `ModelConfig` -> HF config.json dict (with `model_type`, `architectures`).
    hf_names: config -> {our non-scan param path: HF tensor name as on the hub}.
    canonical: a tensor name as found in a checkpoint -> the hub name (prefix variants).
    ignored: config -> predicate on hub names that are skipped when loading (buffers,
      a stored copy of tied weights).
    aliases: config -> {hub name: hub name to use when the first is missing} (tied copies).
    mlp_matrices: matmuls in one MLP (2 for GELU, 3 for gated GLU): FLOP accounting.
    legacy_hf_keys: config -> keys that older transformers versions read, written into
      config.json next to today's (transformers 5 would rename them if given directly).
  """

  module: type
  model_types: tuple[str, ...]
  config_from_hf: Callable[[dict], dict]
  config_to_hf: Callable[[ModelConfig], dict]
  hf_names: Callable[[ModelConfig], dict]
  canonical: Callable[[str], str] = lambda name: name
  ignored: Callable[[ModelConfig], Callable[[str], bool]] = lambda cfg: lambda name: False
  aliases: Callable[[ModelConfig], dict] = lambda cfg: {}
  mlp_matrices: int = 2
  legacy_hf_keys: Callable[[ModelConfig], dict] = lambda cfg: {}


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  for model_type in family.model_types:
    FAMILIES[model_type] = family
  return family


def family(model_type: str) -> Family:
  """The `Family` of an HF `model_type`, importing its module on first use."""
  if model_type not in MODULES:
    raise ConfigError(
        f"config.model.model_type={model_type!r} is not supported; supported: "
        f"{', '.join(sorted(MODULES))}.")
  if model_type not in FAMILIES:
    importlib.import_module(MODULES[model_type])  # the module registers itself
  return FAMILIES[model_type]


def family_of(config: ModelConfig) -> Family:
  return family(config.model_type)
