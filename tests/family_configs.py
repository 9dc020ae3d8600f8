"""Tiny random configs of every family, without transformers (for the packing and attention
tests): GPT-NeoX, Llama with grouped-query heads, Mistral and Qwen2 with sliding windows,
Gemma-2 with soft-capping and alternating sliding/global layers."""

from daa_jax.models import gemma2, llama
from daa_jax.models.config import ModelConfig

V = 97
_LLAMA = dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, intermediate_size=72, max_position_embeddings=512,
              rms_norm_eps=1e-6)


def family_configs(window: int = 4) -> dict[str, ModelConfig]:
  """name -> ModelConfig; `window` is the sliding window of Mistral, Qwen2 and Gemma-2."""
  gemma = dict(_LLAMA, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
               head_dim=12, query_pre_attn_scalar=20, sliding_window=window,
               attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
  return {
      "gpt_neox": ModelConfig(vocab_size=V, hidden_size=40, num_hidden_layers=2,
                              num_attention_heads=5, intermediate_size=72,
                              max_position_embeddings=512),
      "llama_gqa3": ModelConfig(**llama.config_from_hf(_LLAMA)),
      "mistral_window": ModelConfig(**llama.config_from_hf(dict(
          _LLAMA, model_type="mistral", num_key_value_heads=3, sliding_window=window))),
      "qwen2_window": ModelConfig(**llama.config_from_hf(dict(
          _LLAMA, model_type="qwen2", tie_word_embeddings=True, use_sliding_window=True,
          sliding_window=window, max_window_layers=1))),
      "gemma2_softcap": ModelConfig(**gemma2.config_from_hf(gemma)),
  }
