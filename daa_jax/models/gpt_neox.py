"""GPT-NeoX (Pythia): fused per-head QKV, partial rotary, LayerNorm, parallel residual.

Module names are HF's (`embed_in`, `layers_N.attention.query_key_value`,
`mlp.dense_h_to_4h`, `final_layer_norm`, `embed_out`), so conversion is a transpose and a
rename. Logical axes: `vocab`, `embed`, `qkv`, `heads`, `mlp`, `norm`, `layers`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from daa_jax.models.config import ModelConfig
from daa_jax.errors import ConfigError
from daa_jax.models import common, layers
from daa_jax.models import registry

Array = jax.Array


class Attention(nn.Module):
  """Causal self-attention with HF's fused, per-head-interleaved QKV projection."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None):
    """x [B,T,D], mask [B,1,T,S], cos/sin [B,T,R], kv {'k','v': [B,H,S,K]} -> ([B,T,D], kv)."""
    cfg = self.config
    b, t, d = x.shape
    h, k_dim = cfg.num_attention_heads, cfg.head_dim
    qkv = layers.dense(3 * d, ("embed", "qkv"), cfg.attention_bias, cfg,
                       "query_key_value")(x)
    # HF lays the 3D outputs out per head: [H, (q|k|v), K]; not [(q|k|v), H, K].
    qkv = qkv.reshape(b, t, h, 3 * k_dim)
    heads_first = layers.heads_first_layout(cfg, kv)
    if heads_first:
      # One transpose of the fused projection instead of three after the split.
      qkv = qkv.transpose(0, 2, 1, 3)  # [B,H,T,3K]
      cos, sin = cos[:, None], sin[:, None]  # [B,1,T,R]
    else:
      cos, sin = cos[:, :, None], sin[:, :, None]  # [B,T,1,R]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    out, kv = layers.attention_core(cfg, q, k, v, mask, kv, index, heads_first,
                                    k_dim ** -0.5)
    out = layers.dense(d, ("heads", "embed"), cfg.attention_bias, cfg, "dense")(out)
    return out, kv


class Mlp(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    y = layers.dense(cfg.intermediate_size, ("embed", "mlp"), True, cfg, "dense_h_to_4h")(x)
    y = layers.constrain(y, ("act_batch", "act_len", "act_mlp"))  # [B,L,F]
    y = layers.activation(cfg.hidden_act, y)
    return layers.dense(cfg.hidden_size, ("mlp", "embed"), True, cfg, "dense_4h_to_h")(y)


class Block(nn.Module):
  """One GPT-NeoX layer. Call signature is scan-friendly: (carry, *broadcast/scanned)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, masks, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None, sliding):
    cfg = self.config
    mask = layers.layer_mask(masks, sliding)
    attn, kv = Attention(cfg, name="attention")(
        layers.LayerNorm(cfg, name="input_layernorm")(x), mask, cos, sin, kv, index)
    mlp, post_ln = Mlp(cfg, name="mlp"), layers.LayerNorm(cfg, name="post_attention_layernorm")
    if cfg.use_parallel_residual:
      x = x + attn + mlp(post_ln(x))
    else:
      x = x + attn
      x = x + mlp(post_ln(x))
    return layers.constrain(x, ("act_batch", "act_len", "act_embed")), kv


class GPTNeoX(common.CausalLM):
  """Pythia: `embed_in` -> N blocks -> `final_layer_norm` -> untied `embed_out`.

  A tied GPT-NeoX checkpoint (rare) is loaded as an untied copy.
  """

  def setup(self):
    cfg = self.config
    self.embed_in = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=layers.init(("vocab", "embed")))
    self.layers = self.make_layers(Block)
    self.final_layer_norm = layers.LayerNorm(cfg)
    self.embed_out = layers.dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, None)

  def _embed(self, tokens: Array) -> Array:
    return self.embed_in(tokens)

  def _final_norm(self, x: Array) -> Array:
    return self.final_layer_norm(x)

  def _logits(self, hidden: Array) -> Array:
    """[..., D] final hidden states -> [..., V] logits in `config.dtype`."""
    logits = self.embed_out(hidden)
    if logits.ndim == 3:
      logits = layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))
    return logits


# --- Hugging Face config and tensor names ----------------------------------------------

_HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "rotary_pct", "rotary_emb_base", "max_position_embeddings",
            "layer_norm_eps", "use_parallel_residual", "attention_bias", "hidden_act",
            "tie_word_embeddings", "bos_token_id", "eos_token_id")


def config_from_hf(d: Mapping[str, Any]) -> dict:
  """`ModelConfig` kwargs from a GPT-NeoX config.json.

  Accepts the keys that older transformers versions wrote for Pythia (e.g. `rotary_emb_base`
  at top level, no `attention_bias`, `rope_scaling: null`) as well as today's (`rope_theta`,
  `partial_rotary_factor`, `rope_parameters`).
  """
  kw: dict[str, Any] = {"model_type": "gpt_neox"}
  for k in _HF_KEYS:
    if k in d and d[k] is not None:
      kw[k] = d[k]
  rope = d.get("rope_parameters") or {}
  if isinstance(rope, Mapping):
    if rope.get("rope_theta") is not None:
      kw["rotary_emb_base"] = rope["rope_theta"]
    if rope.get("partial_rotary_factor") is not None:
      kw["rotary_pct"] = rope["partial_rotary_factor"]
    if rope.get("rope_type", "default") != "default":
      raise ConfigError(f"HF config has rope_parameters={dict(rope)!r}; GPT-NeoX loads "
                        "plain rotary embeddings only (rope_type 'default').")
  if d.get("rope_theta") is not None:
    kw["rotary_emb_base"] = d["rope_theta"]
  if d.get("partial_rotary_factor") is not None and "rotary_pct" not in d:
    kw["rotary_pct"] = d["partial_rotary_factor"]
  if d.get("rope_scaling"):
    raise ConfigError(f"HF config has rope_scaling={d['rope_scaling']!r}; GPT-NeoX loads "
                      "plain rotary embeddings only (Pythia).")
  kw["rotary_emb_base"] = float(kw.get("rotary_emb_base", 10000.0))
  kw["rotary_pct"] = float(kw.get("rotary_pct", 0.25))
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = tuple(kw["eos_token_id"])
  return kw


def config_to_hf(cfg: ModelConfig) -> dict:
  """Keyword arguments for `transformers.GPTNeoXConfig(**...)`."""
  d = {k: getattr(cfg, k) for k in _HF_KEYS}
  if isinstance(d["eos_token_id"], tuple):
    d["eos_token_id"] = list(d["eos_token_id"])
  d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
           rope_theta=cfg.rotary_emb_base, partial_rotary_factor=cfg.rotary_pct,
           rope_scaling=None, initializer_range=layers.INIT_STD, use_cache=True,
           attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.1)
  return d


_LAYER_PARTS = {  # HF module path inside a layer -> our module path.
    "input_layernorm": ("input_layernorm",),
    "post_attention_layernorm": ("post_attention_layernorm",),
    "attention.query_key_value": ("attention", "query_key_value"),
    "attention.dense": ("attention", "dense"),
    "mlp.dense_h_to_4h": ("mlp", "dense_h_to_4h"),
    "mlp.dense_4h_to_h": ("mlp", "dense_4h_to_h"),
}


def hf_names(config: ModelConfig) -> dict[tuple[str, ...], str]:
  """Our (non-scan) param path -> hub tensor name (`gpt_neox.` prefix, top `embed_out`)."""
  names = {("embed_in", "embedding"): "gpt_neox.embed_in.weight",
           ("final_layer_norm", "scale"): "gpt_neox.final_layer_norm.weight",
           ("final_layer_norm", "bias"): "gpt_neox.final_layer_norm.bias",
           ("embed_out", "kernel"): "embed_out.weight"}
  for i in range(config.num_hidden_layers):
    for hf, ours in _LAYER_PARTS.items():
      is_norm = hf.endswith("layernorm")
      hub = f"gpt_neox.layers.{i}.{hf}"
      names[(f"layers_{i}", *ours, "scale" if is_norm else "kernel")] = f"{hub}.weight"
      if is_norm or config.attention_bias:
        names[(f"layers_{i}", *ours, "bias")] = f"{hub}.bias"
  return names


def canonical(name: str) -> str:
  """The hub name: transformers>=5 writes `lm_head`, some exports drop `gpt_neox.`."""
  if name in ("lm_head.weight", "embed_out.weight"):
    return "embed_out.weight"
  return name if name.startswith("gpt_neox.") else "gpt_neox." + name


# Buffers that old checkpoints (transformers 4.2x-4.3x) saved next to the weights: the
# causal-mask `attention.bias`, `attention.masked_bias` and rotary `inv_freq`. All are
# recomputed from the config, so they are skipped.
_IGNORED = re.compile(r"^gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\."
                      r"inv_freq)|rotary_emb\.inv_freq)$")


def ignored(config: ModelConfig):
  del config
  return lambda name: bool(_IGNORED.match(name))


def aliases(config: ModelConfig) -> dict[str, str]:
  # Tied checkpoints store the input embedding only; daa_jax keeps an untied copy.
  return {"embed_out.weight": "gpt_neox.embed_in.weight"} if config.tie_word_embeddings else {}


FAMILY = registry.register(registry.Family(
    module=GPTNeoX, model_types=("gpt_neox",), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, hf_names=hf_names, canonical=canonical, ignored=ignored,
    aliases=aliases, mlp_matrices=2,
    legacy_hf_keys=lambda cfg: dict(rotary_pct=cfg.rotary_pct,
                                    rotary_emb_base=cfg.rotary_emb_base)))
