"""Gemma-2: the paper's appendix model.

What differs from Llama (whose `Attention` and `GatedMlp` it reuses): RMSNorm applied as
`1 + weight`; four norms per layer (pre and post attention, pre and post MLP); a GeGLU MLP
(tanh GELU); embeddings multiplied by sqrt(D) and tied to the output; attention logits
scaled by `query_pre_attn_scalar^-1/2` and soft-capped (`attn_logit_softcapping`), final
logits soft-capped (`final_logit_softcapping`); sliding-window layers alternating with
global ones (`layer_types`, sliding first).

Module names are HF's (`embed_tokens`, `layers_N.self_attn.q_proj`,
`pre_feedforward_layernorm`, `norm`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax

from daa_jax.models.config import ModelConfig
from daa_jax.models import layers, llama
from daa_jax.models import registry

Array = jax.Array


class Block(nn.Module):
  """x + post_norm(attn(pre_norm(x))), then + post_norm(mlp(pre_norm(.)))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, masks, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None, sliding):
    cfg = self.config
    def norm(name):
      return layers.RMSNorm(cfg, plus_one=True, name=name)
    mask = layers.layer_mask(masks, sliding)
    attn, kv = llama.Attention(cfg, name="self_attn")(
        norm("input_layernorm")(x), mask, cos, sin, kv, index)
    x = x + norm("post_attention_layernorm")(attn)
    mlp = llama.GatedMlp(cfg, name="mlp")(norm("pre_feedforward_layernorm")(x))
    x = x + norm("post_feedforward_layernorm")(mlp)
    return layers.constrain(x, ("act_batch", "act_len", "act_embed")), kv


class Gemma2(llama.TiedOrUntiedLM):
  block = Block
  plus_one_norm = True
  embed_scale = True


def config_from_hf(d: Mapping[str, Any]) -> dict:
  """`ModelConfig` kwargs from a Gemma-2 config.json."""
  kw = llama.common_from_hf(d)
  n = kw["num_hidden_layers"]
  kw.setdefault("tie_word_embeddings", True)
  kw.setdefault("attention_bias", False)
  kw.setdefault("layer_types", tuple("sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(n)))
  kw.update(
      model_type="gemma2",
      # `hidden_activation` is the key Gemma reads; old configs also carry `hidden_act`.
      hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
      sliding_window=int(d.get("sliding_window") or 0),
      query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or kw.get(
          "attention_head_dim", 256)),
      attn_logit_softcapping=float(d.get("attn_logit_softcapping") or 0.0),
      final_logit_softcapping=float(d.get("final_logit_softcapping") or 0.0))
  if not kw["sliding_window"]:
    kw.pop("layer_types")
  return kw


def config_to_hf(cfg: ModelConfig) -> dict:
  d = llama.common_to_hf(cfg)
  d.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"],
           hidden_activation=cfg.hidden_act, attention_bias=cfg.attention_bias,
           query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),  # HF: int
           sliding_window=cfg.sliding_window or None,
           layer_types=["sliding_attention" if s else "full_attention"
                        for s in cfg.sliding_layers],
           attn_logit_softcapping=cfg.attn_logit_softcapping or None,
           final_logit_softcapping=cfg.final_logit_softcapping or None)
  return d


FAMILY = registry.register(registry.Family(
    module=Gemma2, model_types=("gemma2",), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, hf_names=llama.hf_names, canonical=llama.canonical,
    ignored=llama.ignored, mlp_matrices=3, legacy_hf_keys=llama.legacy_hf_keys))
