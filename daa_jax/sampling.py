"""Jitted autoregressive sampling with the KV cache, on the training mesh.

`sample` prefills the (left-padded) prompts once, then decodes `max_new_tokens` steps in a
`lax.scan` with fixed shapes, so one shape compiles once. It returns the tokens, their count
up to and including EOS, and two per-token log-probs:

  * `logps`:          log π(y_t | x, y_<t) under the model itself (temperature 1, no
                      truncation) — what KL(πθ‖π_ref) estimates need;
  * `sample_logps`:   under the distribution actually sampled from (temperature, top-k,
                      top-p applied) — equal to `logps` for exact samples, the default.

Randomness is `fold_in(rng, t)` per step, so samples are a function of the seed. Params and
the batch keep their shardings (the weights are never gathered onto one device).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from daa_jax import model as model_lib

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 64
  temperature: float = 1.0   # 0: greedy
  top_k: int = 0             # 0: off
  top_p: float = 1.0         # 1: off
  eos_id: int = 0
  pad_id: int = 0

  @property
  def exact(self) -> bool:
    """Samples come from the model's own distribution (what unbiased KL estimates need)."""
    return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0


def _filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus) on float32 logits `[B,V]`."""
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, _NEG, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = cum_before < cfg.top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, _NEG, logits)
  return logits


def _choose(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig):
  """Next tokens `[B]` and their log-probs under the model and under the sampler."""
  logits = logits.astype(jnp.float32)  # sampling statistics in float32
  model_logp = jax.nn.log_softmax(logits, axis=-1)
  if cfg.temperature <= 0.0:
    tok = jnp.argmax(logits, axis=-1)
    sample_logp = jnp.zeros(tok.shape, jnp.float32)  # a point mass
  else:
    filtered = _filter_logits(logits, cfg)
    tok = jax.random.categorical(rng, filtered, axis=-1)
    sample_logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tok[:, None],
                                      axis=-1)[:, 0]
  return tok, jnp.take_along_axis(model_logp, tok[:, None], axis=-1)[:, 0], sample_logp


def sample(model: model_lib.CausalLM, params, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> dict:
  """Samples continuations of left-padded prompts.

  Args:
    model: the `CausalLM`.
    params: its params (any sharding).
    prompt_tokens: `[B,P]` int32, left-padded.
    prompt_mask: `[B,P]` 1 on real prompt tokens.
    rng: a PRNG key.
    cfg: `SamplingConfig` (static).

  Returns:
    dict with `tokens [B,T]` (pad after EOS), `lengths [B]` (tokens up to and including EOS;
    T if no EOS), `finished [B]` (EOS produced), `logps [B,T]` and `sample_logps [B,T]`
    (0 after the end), `T = cfg.max_new_tokens`.
  """
  batch, prompt_len = prompt_tokens.shape
  steps = cfg.max_new_tokens
  cache = model_lib.init_cache(model.config, batch, prompt_len + steps)
  prompt_mask = prompt_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  logits, cache = model.apply({"params": params}, prompt_tokens, attention_mask=prompt_mask,
                              positions=positions, cache=cache)
  next_pos = jnp.sum(prompt_mask, axis=-1)  # [B] position of the first new token

  def body(carry, t):
    cache, last_logits, done = carry
    tok, logp, slogp = _choose(last_logits, jax.random.fold_in(rng, t), cfg)
    alive = ~done
    tok = jnp.where(alive, tok, cfg.pad_id)
    logp = jnp.where(alive, logp, 0.0)
    slogp = jnp.where(alive, slogp, 0.0)
    done = done | (tok == cfg.eos_id)
    logits, cache = model.apply(
        {"params": params}, tok[:, None], attention_mask=alive[:, None].astype(jnp.int32),
        positions=(next_pos + t)[:, None], cache=cache)
    return (cache, logits[:, -1], done), (tok, logp, slogp, alive)

  init = (cache, logits[:, -1], jnp.zeros((batch,), bool))
  (_, _, done), (toks, logps, slogps, alive) = jax.lax.scan(body, init, jnp.arange(steps))
  toks, logps, slogps, alive = (x.T for x in (toks, logps, slogps, alive))  # [B,T]
  return {"tokens": toks.astype(jnp.int32), "lengths": jnp.sum(alive, axis=-1).astype(jnp.int32),
          "finished": done, "logps": logps, "sample_logps": slogps}


def make_sampler(model, cfg: SamplingConfig):
  """A jitted `sample(params, prompt_tokens, prompt_mask, rng)` (one compile per shape)."""
  return jax.jit(functools.partial(sample, model, cfg=cfg))


def score(model: model_lib.CausalLM, params, prompt_tokens, prompt_mask, response_tokens,
          response_lengths):
  """Per-token log-probs `[B,T]` of given responses after left-padded prompts (teacher
  forcing), e.g. reference log-probs of policy samples. Positions after `response_lengths`
  get 0."""
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  steps = response_tokens.shape[1]
  resp_mask = (jnp.arange(steps)[None, :] < response_lengths[:, None]).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask.astype(jnp.int32), resp_mask], axis=1)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  logits = model.apply({"params": params}, tokens, attention_mask=mask, positions=positions)
  p = prompt_tokens.shape[1]
  # Logits at p-1+t predict response token t; log-softmax in float32.
  logp = jax.nn.log_softmax(logits[:, p - 1:p - 1 + steps].astype(jnp.float32), axis=-1)
  tok_logp = jnp.take_along_axis(logp, response_tokens[..., None], axis=-1)[..., 0]
  return jnp.where(resp_mask > 0, tok_logp, 0.0)
