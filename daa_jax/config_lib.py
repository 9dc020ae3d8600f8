"""Shared configuration pieces: `ModelConfig`, the Pythia size table, config helpers.

`ModelConfig` is the frozen dataclass that model code receives (the ConfigDict stops at the
boundary, STYLE.md rule 6). `pythia(size)` returns the published Pythia shape; the `tiny*`
sizes are for tests and the built-in synthetic task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from daa_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPT-NeoX (Pythia) architecture plus daa_jax's execution options.

  Architecture fields use Hugging Face `GPTNeoXConfig` names so `from_hf`/`to_hf` are nearly
  the identity. Execution fields (`dtype`, `scan_layers`, `remat_policy`, `attention_impl`) do
  not change the function the model computes.
  """

  vocab_size: int = 50304
  hidden_size: int = 512
  num_hidden_layers: int = 6
  num_attention_heads: int = 8
  intermediate_size: int = 2048
  rotary_pct: float = 0.25
  rotary_emb_base: float = 10000.0
  max_position_embeddings: int = 2048
  layer_norm_eps: float = 1e-5
  use_parallel_residual: bool = True
  attention_bias: bool = True
  hidden_act: str = "gelu"  # Pythia: exact (erf) GELU.
  tie_word_embeddings: bool = False
  bos_token_id: int = 0
  eos_token_id: int = 0
  # Execution options (not part of the HF architecture).
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  attention_impl: str = "xla"  # xla | cudnn | None (let jax choose)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"config.model: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; pick sizes that divide.")
    if self.hidden_act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"):
      raise ConfigError(f"config.model.hidden_act={self.hidden_act!r} is not supported.")
    if self.remat_policy not in ("none", "full", "dots", "dots_with_no_batch_dims"):
      raise ConfigError(
          f"config.model.remat_policy={self.remat_policy!r}; use none, full, dots or "
          "dots_with_no_batch_dims.")

  # --- Hugging Face interop -------------------------------------------------------------
  _HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "rotary_pct", "rotary_emb_base", "max_position_embeddings",
              "layer_norm_eps", "use_parallel_residual", "attention_bias", "hidden_act",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> "ModelConfig":
    """From a `transformers.GPTNeoXConfig` or its `config.json` dict.

    Accepts the keys that older transformers versions wrote for Pythia (e.g. `rotary_emb_base`
    at top level, no `attention_bias`, `rope_scaling: null`) as well as today's (`rope_theta`,
    `partial_rotary_factor`, `rope_parameters`).
    """
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if d.get("model_type", "gpt_neox") != "gpt_neox":
      raise ConfigError(
          f"HF config has model_type={d.get('model_type')!r}; daa_jax loads GPT-NeoX "
          "(Pythia) models only.")
    kw = {}
    for k in cls._HF_KEYS:
      if k in d and d[k] is not None:
        kw[k] = d[k]
    rope = d.get("rope_parameters") or {}
    if isinstance(rope, Mapping):
      if rope.get("rope_theta") is not None:
        kw["rotary_emb_base"] = rope["rope_theta"]
      if rope.get("partial_rotary_factor") is not None:
        kw["rotary_pct"] = rope["partial_rotary_factor"]
    if d.get("rope_theta") is not None:
      kw["rotary_emb_base"] = d["rope_theta"]
    if d.get("partial_rotary_factor") is not None and "rotary_pct" not in d:
      kw["rotary_pct"] = d["partial_rotary_factor"]
    if d.get("rope_scaling"):
      raise ConfigError(f"HF config has rope_scaling={d['rope_scaling']!r}; only plain "
                        "rotary embeddings (Pythia) are supported.")
    kw["rotary_emb_base"] = float(kw.get("rotary_emb_base", 10000.0))
    kw["rotary_pct"] = float(kw.get("rotary_pct", 0.25))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """Keyword arguments for `transformers.GPTNeoXConfig(**cfg.to_hf())`."""
    d = {k: getattr(self, k) for k in self._HF_KEYS}
    d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
             rope_theta=self.rotary_emb_base, partial_rotary_factor=self.rotary_pct,
             rope_scaling=None, initializer_range=0.02, use_cache=True,
             attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.1)
    return d


def _neox(hidden, layers, heads, vocab=50304):
  return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=4 * hidden, vocab_size=vocab)


# The Pythia suite (Biderman et al. 2023): all share rotary_pct 0.25, parallel residual,
# untied embeddings, max_position_embeddings 2048. Vocab sizes are the padded ones in the
# released checkpoints (6.9b and 12b are padded further for tensor parallelism).
PYTHIA_SIZES: dict[str, dict] = {
    "14m": _neox(128, 6, 4),
    "31m": _neox(256, 6, 8),
    "70m": _neox(512, 6, 8),
    "160m": _neox(768, 12, 12),
    "410m": _neox(1024, 24, 16),
    "1b": _neox(2048, 16, 8),
    "1.4b": _neox(2048, 24, 16),
    "2.8b": _neox(2560, 32, 32),
    "6.9b": _neox(4096, 32, 32, vocab=50432),
    "12b": _neox(5120, 36, 40, vocab=50688),
    # Test / synthetic-task sizes (odd-ish shapes catch layout bugs; vocab set by the data).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, vocab_size=264, max_position_embeddings=512),
    "tiny2": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=384, vocab_size=264, max_position_embeddings=512),
    "tiny4": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512, vocab_size=264, max_position_embeddings=512),
}


def pythia(size: str, **overrides) -> ModelConfig:
  """The `ModelConfig` of a Pythia size (e.g. `pythia("1b")`), with optional overrides."""
  key = size.lower().removeprefix("pythia-")
  if key not in PYTHIA_SIZES:
    raise ConfigError(
        f"config.model.size={size!r} is not a known size; choose one of "
        f"{', '.join(PYTHIA_SIZES)}.")
  return ModelConfig(**{**PYTHIA_SIZES[key], **overrides})


def hub_id(size: str) -> str:
  """The Hugging Face hub id of a Pythia size (the standard, non-deduped suite)."""
  return f"EleutherAI/pythia-{size.lower().removeprefix('pythia-')}"
