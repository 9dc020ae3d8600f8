"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5.

Pre-norm blocks with RMSNorm, separate q/k/v/o projections with grouped-query attention
(G key/value heads for H query heads), full rotary with HF's rope scaling (linear, dynamic,
llama3), a gated SiLU MLP, tied or untied output embeddings. The variants differ only in
config fields: Qwen2 has q/k/v biases (`qkv_bias`), Mistral a sliding window on every
layer, Qwen2 optionally on the layers from `max_window_layers` on (`layer_types`).

Module names are HF's (`embed_tokens`, `layers_N.self_attn.q_proj`, `mlp.gate_proj`,
`norm`, `lm_head`), so conversion is a transpose and a rename; `hf_names` derives the HF
names from the param tree. Logical axes: `vocab`, `embed`, `heads` (query heads x K),
`kv_heads` (key/value heads x K, sharded only where the head count divides), `mlp`,
`norm`, `layers`. Gemma-2 (`gemma2.py`) reuses `Attention` and `GatedMlp`.
"""

from __future__ import annotations

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
  """q/k/v/o projections, rotary, grouped-query attention, optional logit soft-capping."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None):
    """x [B,T,D], mask [B,1,T,S], cos/sin [B,T,R], kv {'k','v': [B,G,S,K]} -> ([B,T,D], kv)."""
    cfg = self.config
    b, t, _ = x.shape
    h, g, k_dim = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
    qkv_bias = cfg.attention_bias or cfg.qkv_bias
    q = layers.dense(h * k_dim, ("embed", "heads"), qkv_bias, cfg, "q_proj")(x)
    k = layers.dense(g * k_dim, ("embed", "kv_heads"), qkv_bias, cfg, "k_proj")(x)
    v = layers.dense(g * k_dim, ("embed", "kv_heads"), qkv_bias, cfg, "v_proj")(x)
    q, k, v = q.reshape(b, t, h, k_dim), k.reshape(b, t, g, k_dim), v.reshape(b, t, g, k_dim)
    heads_first = layers.heads_first_layout(cfg, kv)
    if heads_first:
      q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B,H|G,T,K]
      cos, sin = cos[:, None], sin[:, None]  # [B,1,T,R]
    else:
      cos, sin = cos[:, :, None], sin[:, :, None]  # [B,T,1,R]
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    # Gemma-2 scales by query_pre_attn_scalar^-1/2 instead of K^-1/2.
    scale = (cfg.query_pre_attn_scalar or k_dim) ** -0.5
    out, kv = layers.attention_core(cfg, q, k, v, mask, kv, index, heads_first, scale)
    out = layers.dense(cfg.hidden_size, ("heads", "embed"), cfg.attention_bias, cfg,
                       "o_proj")(out)
    return out, kv


class GatedMlp(nn.Module):
  """`down(act(gate(x)) * up(x))`: SwiGLU (Llama) or GeGLU (Gemma-2) by `hidden_act`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    f = cfg.intermediate_size
    gate = layers.dense(f, ("embed", "mlp"), cfg.mlp_bias, cfg, "gate_proj")(x)
    up = layers.dense(f, ("embed", "mlp"), cfg.mlp_bias, cfg, "up_proj")(x)
    y = layers.activation(cfg.hidden_act, gate) * up
    y = layers.constrain(y, ("act_batch", "act_len", "act_mlp"))  # [B,L,F]
    return layers.dense(cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, cfg, "down_proj")(y)


class Block(nn.Module):
  """One Llama layer: x + attn(norm(x)), then + mlp(norm(.))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, masks, cos: Array, sin: Array,
               kv: dict[str, Array] | None, index: Array | None, sliding):
    cfg = self.config
    mask = layers.layer_mask(masks, sliding)
    attn, kv = Attention(cfg, name="self_attn")(
        layers.RMSNorm(cfg, name="input_layernorm")(x), mask, cos, sin, kv, index)
    x = x + attn
    x = x + GatedMlp(cfg, name="mlp")(layers.RMSNorm(cfg, name="post_attention_layernorm")(x))
    return layers.constrain(x, ("act_batch", "act_len", "act_embed")), kv


class TiedOrUntiedLM(common.CausalLM):
  """`embed_tokens` -> blocks -> `norm` -> `lm_head` (or the embedding, when tied).

  Subclasses set `block`, `plus_one_norm` and `embed_scale`.
  """
  block = Block
  plus_one_norm = False
  embed_scale = False

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=layers.init(("vocab", "embed")))
    self.layers = self.make_layers(self.block)
    self.norm = layers.RMSNorm(cfg, plus_one=self.plus_one_norm)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, None)

  def _embed(self, tokens: Array) -> Array:
    x = self.embed_tokens(tokens)
    if self.embed_scale:
      # HF multiplies by sqrt(D) rounded to the compute dtype (55.5 for D=3072 in bf16).
      x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
    return x

  def _final_norm(self, x: Array) -> Array:
    return self.norm(x)

  def _logits(self, hidden: Array) -> Array:
    """[..., D] final hidden states -> [..., V] logits in `config.dtype` (soft-capped as
    `cap * tanh(logits / cap)` when `final_logit_softcapping` is set)."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      lead = hidden.shape[:-1]
      # 2-D as in `layers._Dense`: one GEMM for the embedding's gradient.
      logits = self.embed_tokens.attend(hidden.reshape(-1, hidden.shape[-1]))
      logits = logits.reshape(lead + (cfg.vocab_size,))
    else:
      logits = self.lm_head(hidden)
    if cfg.final_logit_softcapping > 0:
      cap = cfg.final_logit_softcapping
      # float32 tanh: the cap compresses large logits, where bf16 has few digits left.
      logits = (jnp.tanh(logits.astype(jnp.float32) / cap) * cap).astype(cfg.dtype)
    if logits.ndim == 3:
      logits = layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))
    return logits


class Llama(TiedOrUntiedLM):
  """Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5."""


# --- Hugging Face config and tensor names ----------------------------------------------

_SCALING_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}


def rope_from_hf(d: Mapping[str, Any]) -> dict:
  """`rotary_emb_base` and `rope_scaling` from config.json's rope_parameters (transformers
  5) or rope_theta + rope_scaling (4.x)."""
  rope = dict(d.get("rope_parameters") or {})
  if not rope.get("rope_type") and d.get("rope_scaling"):
    rope.update(d["rope_scaling"])
  base = rope.get("rope_theta") or d.get("rope_theta") or 10000.0
  kind = rope.get("rope_type") or rope.get("type") or "default"
  if kind == "default":
    return dict(rotary_emb_base=float(base), rope_scaling=())
  if kind not in _SCALING_KEYS:
    raise ConfigError(
        f"HF config has rope type {kind!r}; daa_jax implements default, "
        f"{', '.join(_SCALING_KEYS)}. Use a checkpoint with one of these or add the type "
        "to models/layers.py's rotary_inv_freq.")
  missing = [k for k in _SCALING_KEYS[kind] if rope.get(k) is None]
  if missing:
    raise ConfigError(f"HF config's {kind} rope scaling lacks {', '.join(missing)}; "
                      "fix rope_parameters in config.json.")
  params = tuple(sorted((k, rope[k]) for k in _SCALING_KEYS[kind]))
  return dict(rotary_emb_base=float(base), rope_scaling=(("rope_type", kind),) + params)


def rope_to_hf(cfg: ModelConfig) -> dict:
  scaling = dict(cfg.rope_scaling) or {"rope_type": "default"}
  return dict(rope_parameters={"rope_theta": cfg.rotary_emb_base, **scaling},
              rope_theta=cfg.rotary_emb_base)


def common_from_hf(d: Mapping[str, Any]) -> dict:
  """Fields every Llama-like config.json shares (also Gemma-2's)."""
  kw: dict[str, Any] = {}
  for ours, theirs in (("vocab_size",) * 2, ("hidden_size",) * 2, ("num_hidden_layers",) * 2,
                       ("num_attention_heads",) * 2, ("num_key_value_heads",) * 2,
                       ("intermediate_size",) * 2, ("max_position_embeddings",) * 2,
                       ("layer_norm_eps", "rms_norm_eps"), ("tie_word_embeddings",) * 2,
                       ("bos_token_id",) * 2, ("eos_token_id",) * 2,
                       ("attention_head_dim", "head_dim"), ("attention_bias",) * 2,
                       ("mlp_bias",) * 2):
    if d.get(theirs) is not None:
      kw[ours] = d[theirs]
  if isinstance(kw.get("eos_token_id"), list):
    kw["eos_token_id"] = tuple(kw["eos_token_id"])
  if kw.get("attention_head_dim") == kw["hidden_size"] // kw["num_attention_heads"]:
    del kw["attention_head_dim"]  # the default: one config, however config.json spells it
  if kw.get("num_key_value_heads") == kw["num_attention_heads"]:
    del kw["num_key_value_heads"]
  kw.update(rope_from_hf(d), rotary_pct=1.0, use_parallel_residual=False)
  if d.get("layer_types"):
    kw["layer_types"] = tuple(d["layer_types"])
  return kw


def config_from_hf(d: Mapping[str, Any]) -> dict:
  """`ModelConfig` kwargs from a Llama, Mistral or Qwen2 config.json."""
  model_type = d.get("model_type", "llama")
  kw = common_from_hf(d)
  kw.update(model_type=model_type, hidden_act=d.get("hidden_act", "silu"))
  kw.setdefault("attention_bias", False)
  kw.setdefault("tie_word_embeddings", False)
  if model_type == "qwen2":
    kw["qkv_bias"] = True
    kw["attention_bias"] = False
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    if window and "layer_types" not in kw:
      first = d.get("max_window_layers", kw["num_hidden_layers"])
      kw["layer_types"] = tuple("sliding_attention" if i >= first else "full_attention"
                                for i in range(kw["num_hidden_layers"]))
  else:
    window = d.get("sliding_window")
    kw.pop("layer_types", None)  # Mistral and Llama: one kind of layer
  kw["sliding_window"] = int(window or 0)
  if not kw["sliding_window"]:
    kw.pop("layer_types", None)
  return kw


def legacy_hf_keys(cfg: ModelConfig) -> dict:
  """transformers 4.x reads rope_theta and rope_scaling, not rope_parameters."""
  keys = dict(rope_theta=cfg.rotary_emb_base)
  if cfg.rope_scaling:
    keys["rope_scaling"] = dict(cfg.rope_scaling)
  return keys


def common_to_hf(cfg: ModelConfig) -> dict:
  d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
           num_hidden_layers=cfg.num_hidden_layers,
           num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
           head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
           max_position_embeddings=cfg.max_position_embeddings,
           rms_norm_eps=cfg.layer_norm_eps, hidden_act=cfg.hidden_act,
           tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
           eos_token_id=(list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                         else cfg.eos_token_id),
           initializer_range=layers.INIT_STD, attention_dropout=0.0, use_cache=True)
  d.update(rope_to_hf(cfg))
  return d


def config_to_hf(cfg: ModelConfig) -> dict:
  d = common_to_hf(cfg)
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
  d.update(model_type=cfg.model_type, architectures=[arch])
  if cfg.model_type == "llama":
    d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "mistral":
    d.update(sliding_window=cfg.sliding_window or None)
  else:
    sliding = cfg.sliding_layers
    d.update(use_sliding_window=any(sliding), sliding_window=cfg.sliding_window or None,
             max_window_layers=(sliding.index(True) if any(sliding)
                                else cfg.num_hidden_layers),
             layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
  return d


def hf_names(config: ModelConfig) -> dict[tuple[str, ...], str]:
  """Our (non-scan) param path -> hub name, from the param tree: `model.` + the path with
  `layers_N` -> `layers.N`, kernel/embedding/scale -> weight; `lm_head` at the top."""
  flat = jax.tree_util.tree_flatten_with_path(common.abstract_params(
      config.replace(scan_layers=False)))[0]
  names = {}
  for path, _ in flat:
    keys = tuple(k.key for k in path)
    parts = [k.replace("layers_", "layers.") for k in keys[:-1]]
    leaf = "bias" if keys[-1] == "bias" else "weight"
    prefix = "" if keys[0] == "lm_head" else "model."
    names[keys] = prefix + ".".join(parts + [leaf])
  return names


def canonical(name: str) -> str:
  """Base-model exports (`LlamaModel`) drop the `model.` prefix."""
  if name == "lm_head.weight" or name.startswith("model."):
    return name
  return "model." + name


def ignored(config: ModelConfig):
  tied = config.tie_word_embeddings
  # Old checkpoints carry the rotary `inv_freq` buffer; tied ones sometimes a copy of the
  # embedding as lm_head.
  return lambda name: name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight")


FAMILY = registry.register(registry.Family(
    module=Llama, model_types=("llama", "mistral", "qwen2"), config_from_hf=config_from_hf,
    config_to_hf=config_to_hf, hf_names=hf_names, canonical=canonical, ignored=ignored,
    mlp_matrices=3, legacy_hf_keys=legacy_hf_keys))
