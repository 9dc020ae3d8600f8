"""`ModelConfig` and the size tables: what model code receives.

`ModelConfig` is the frozen dataclass that model code receives (the ConfigDict stops at the
boundary). `sized(size)` (alias `pythia`) returns a published shape (Pythia, Gemma-2,
Llama-3.x, Qwen2.5, Mistral); the `tiny*` sizes are for tests and the synthetic task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from daa_jax.errors import ConfigError
from daa_jax.models import registry


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder's architecture (any supported family) plus daa_jax's execution options.

  `model_type` is HF's (gpt_neox, llama, mistral, qwen2, gemma2) and picks the family
  module (`daa_jax/models/`). Architecture fields use Hugging Face names so each family's
  `from_hf`/`to_hf` is nearly the identity; fields a family does not use keep their
  defaults (e.g. RMSNorm's epsilon is `layer_norm_eps`). Execution fields (`dtype`,
  `scan_layers`, `remat_policy`, `attention_impl`) do not change the function computed.
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
  eos_token_id: int | tuple = 0  # Llama 3 lists several
  model_type: str = "gpt_neox"
  num_key_value_heads: int = 0  # G; 0: = num_attention_heads (no grouping)
  attention_head_dim: int = 0  # HF `head_dim`; 0: hidden_size // num_attention_heads
  rope_scaling: tuple = ()  # sorted (key, value) pairs incl. rope_type; (): plain rotary
  qkv_bias: bool = False  # biases on q/k/v only (Qwen2); attention_bias: on q/k/v/o
  mlp_bias: bool = False
  sliding_window: int = 0  # 0: none
  layer_types: tuple = ()  # per layer full_attention | sliding_attention; (): all sliding
                           # when sliding_window > 0 (Mistral), else all full
  query_pre_attn_scalar: float = 0.0  # Gemma-2: logits scaled by its ^-1/2; 0: head_dim
  attn_logit_softcapping: float = 0.0  # 0: off
  final_logit_softcapping: float = 0.0  # 0: off
  # Execution options (not part of the HF architecture).
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  # xla | blockwise (models/attention.py) | cudnn | splash (TPU) | gpu_flash (CUDA) | None or
  # 'auto' (jax's choice; a run resolves 'auto' to a kernel first: train/attention_config.py)
  attention_impl: str = "xla"
  # Dropout rate on the input of LoRA adapters (PEFT's lora_dropout). In effect only where a
  # forward is given adapters as the 'lora' collection and a 'dropout' rng: the training step
  # of a LoRA run with config.model.lora.dropout > 0 (models/lora.py, `with_adapters`).
  lora_dropout: float = 0.0

  @property
  def head_dim(self) -> int:
    return self.attention_head_dim or self.hidden_size // self.num_attention_heads

  @property
  def kv_heads(self) -> int:
    """G, the number of key/value heads (the KV cache's head axis)."""
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: does it attend over a sliding window of `sliding_window` positions."""
    n = self.num_hidden_layers
    if not self.sliding_window:
      return (False,) * n
    if not self.layer_types:
      return (True,) * n
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def family(self):
    """The `daa_jax.models.common.Family` of `model_type` (its module, HF names, ...)."""
    return registry.family_of(self)

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def __post_init__(self):
    if not self.attention_head_dim and self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"config.model: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; pick sizes that divide.")
    if self.num_attention_heads % self.kv_heads:
      raise ConfigError(
          f"config.model: num_attention_heads={self.num_attention_heads} is not a multiple "
          f"of num_key_value_heads={self.num_key_value_heads}; each key/value head serves "
          "a whole group of query heads.")
    if self.rotary_dim % 2:
      # rotate_half pairs dim i with i + R/2; transformers fails on odd R as well.
      raise ConfigError(
          f"config.model: rotary_pct={self.rotary_pct} gives an odd rotary_dim="
          f"{self.rotary_dim} (head_dim {self.head_dim}); pick sizes giving an even one.")
    if self.hidden_act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu",
                               "silu"):
      raise ConfigError(f"config.model.hidden_act={self.hidden_act!r} is not supported; use "
                        "gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, relu or silu.")
    if self.remat_policy not in ("none", "full", "dots", "dots_with_no_batch_dims"):
      raise ConfigError(
          f"config.model.remat_policy={self.remat_policy!r}; use none, full, dots or "
          "dots_with_no_batch_dims.")
    kind = dict(self.rope_scaling).get("rope_type", "default")
    if kind not in ("default", "linear", "dynamic", "llama3"):
      raise ConfigError(f"config.model.rope_scaling has rope_type={kind!r}; daa_jax "
                        "implements default, linear, dynamic and llama3.")
    if self.layer_types and (len(self.layer_types) != self.num_hidden_layers or any(
        t not in ("full_attention", "sliding_attention") for t in self.layer_types)):
      raise ConfigError(
          f"config.model.layer_types={self.layer_types} must name full_attention or "
          f"sliding_attention for each of the {self.num_hidden_layers} layers.")

  # --- Hugging Face interop -------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> "ModelConfig":
    """From a `transformers` config object or its `config.json` dict, any supported family.

    Each family reads its own keys (`daa_jax/models/<family>.py`, `config_from_hf`),
    including the ones older transformers versions wrote (Pythia's `rotary_emb_base`,
    Llama's `rope_scaling`).

    Raises:
      ConfigError: an unsupported `model_type` or architecture option.
    """
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    model_type = d.get("model_type", "gpt_neox")
    if model_type not in registry.MODULES:
      raise ConfigError(
          f"HF config has model_type={model_type!r}; daa_jax loads "
          f"{', '.join(sorted(registry.MODULES))}.")
    kw = registry.family(model_type).config_from_hf(d)
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """The family's HF config dict: `transformers.AutoConfig.for_model(**cfg.to_hf())`."""
    return self.family.config_to_hf(self)


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


def _llama3_rope(factor):
  return (("factor", float(factor)), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))


def _gemma2(hidden, layers, heads, kv, inter):
  return dict(model_type="gemma2", vocab_size=256000, hidden_size=hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              attention_head_dim=256, intermediate_size=inter, query_pre_attn_scalar=256.0,
              sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              max_position_embeddings=8192, layer_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rotary_pct=1.0,
              use_parallel_residual=False, attention_bias=False, bos_token_id=2,
              eos_token_id=1,
              layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(layers)))


def _llama(hidden, layers, heads, kv, inter, vocab, tie, model_type="llama", theta=500000.0,
           rope=(), max_pos=131072, eps=1e-5, bos=128000, eos=128001, **extra):
  return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
              intermediate_size=inter, rotary_emb_base=theta, rope_scaling=rope,
              max_position_embeddings=max_pos, layer_norm_eps=eps, hidden_act="silu",
              tie_word_embeddings=tie, rotary_pct=1.0, use_parallel_residual=False,
              attention_bias=False, bos_token_id=bos, eos_token_id=eos, **extra)


def _qwen25(hidden, layers, heads, kv, inter, tie, vocab=151936):
  return _llama(hidden, layers, heads, kv, inter, vocab, tie, model_type="qwen2",
                theta=1e6, max_pos=32768, eps=1e-6, bos=151643, eos=151643, qkv_bias=True)


# Published shapes of common checkpoints in other families (their config.json files), for
# `size=` and FLOP/MFU accounting; load the weights with `--config.hf_model=PATH`.
FAMILY_SIZES: dict[str, dict] = {
    "gemma-2-2b": _gemma2(2304, 26, 8, 4, 9216),
    "gemma-2-9b": _gemma2(3584, 42, 16, 8, 14336),
    "llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, rope=_llama3_rope(32),
                           attention_head_dim=64),
    "llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, True, rope=_llama3_rope(32),
                           attention_head_dim=128),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, False, rope=_llama3_rope(8)),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, True),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, True),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944, False, vocab=152064),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32000, False, model_type="mistral",
                         theta=10000.0, max_pos=32768, bos=1, eos=2, sliding_window=4096),
    # Test sizes of the other families (tokenizer-sized vocab, odd GQA ratios).
    "tiny-llama": _llama(64, 2, 4, 2, 160, 264, False, theta=10000.0, max_pos=512, bos=0,
                         eos=0),
    "tiny-gemma2": dict(_gemma2(64, 2, 4, 2, 160), vocab_size=264, attention_head_dim=16,
                        query_pre_attn_scalar=16.0, sliding_window=16,
                        max_position_embeddings=512, bos_token_id=0, eos_token_id=0),
}
SIZES: dict[str, dict] = {**PYTHIA_SIZES, **FAMILY_SIZES}

_HUB_IDS = {"gemma-2-2b": "google/gemma-2-2b", "gemma-2-9b": "google/gemma-2-9b",
            "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
            "llama-3.1-8b": "meta-llama/Llama-3.1-8B", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
            "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "qwen2.5-3b": "Qwen/Qwen2.5-3B",
            "qwen2.5-7b": "Qwen/Qwen2.5-7B", "mistral-7b": "mistralai/Mistral-7B-v0.1"}


def size_key(size: str) -> str:
  return size.lower().removeprefix("pythia-")


def sized(size: str, **overrides) -> ModelConfig:
  """The `ModelConfig` of a size-table entry (`pythia("1b")`, `sized("gemma-2-2b")`)."""
  key = size_key(size)
  if key not in SIZES:
    raise ConfigError(
        f"config.model.size={size!r} is not a known size; choose one of "
        f"{', '.join(SIZES)}.")
  return ModelConfig(**{**SIZES[key], **overrides})


pythia = sized  # the name every Pythia-era caller uses; takes every family's sizes


def hub_id(size: str) -> str:
  """The Hugging Face hub id of a size (Pythia: the standard, non-deduped suite)."""
  key = size_key(size)
  return _HUB_IDS.get(key, f"EleutherAI/pythia-{key}")
