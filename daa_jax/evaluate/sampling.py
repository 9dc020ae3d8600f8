"""Jitted autoregressive sampling with the KV cache, on the training mesh.

`sample` prefills the (left-padded) prompts once (`prefill`), then decodes one token per
`decode_step` in a `lax.while_loop` with fixed shapes that stops after `max_new_tokens` steps
or as soon as every row has ended, so one (batch, prompt length) shape compiles once. It returns
the tokens, their count up to and including EOS, and two per-token log-probs:

  * `logps`:        log π(y_t | x, y_<t) under the model itself (temperature 1, no
                    truncation): what KL(πθ‖π_ref) estimates need;
  * `sample_logps`: under the distribution actually sampled from (temperature, top-k,
                    top-p applied): equal to `logps` for exact samples, the default.

`score` gives the same per-token log-probs by teacher forcing (no cache), e.g. the reference
log-probs of policy samples; `score_both` scores under two param sets at once and adds the
exact per-step KL in both directions (over the whole vocabulary).

Randomness is `fold_in(rng, t)` at step t, so samples are a function of (rng, batch layout)
and not of the mesh: with `jax_threefry_partitionable` (the default) random bits do not
depend on sharding. Params keep their NamedShardings (weights are never gathered onto one
device); the batch and the KV cache are sharded over the data axes, heads over `tensor`.

  sampler = make_sampler(model, SamplingConfig(max_new_tokens=32, eos_id=tok.eos_id,
                                               pad_id=tok.pad_id), mesh)
  out = sampler(params, prompt_tokens, prompt_mask, jax.random.key(0))  # one compile per shape
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static settings of a sampler (hashable: part of the compiled function).

  Attributes:
    max_new_tokens: T, decoding steps (EOS included in the count).
    temperature: divides the logits; 0 means greedy (argmax).
    top_k: keep the k most likely tokens (0: off). Ties are broken toward the lower id, so
      exactly k tokens are kept.
    top_p: nucleus sampling, keep the smallest most-likely prefix whose probability (after
      temperature and top-k) reaches top_p (1: off). The most likely token always stays.
    eos_id: the token that ends a response.
    pad_id: written after EOS.
  """
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int = 0
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ConfigError(f"config.eval.max_new_tokens={self.max_new_tokens} must be >= 1.")
    if not self.temperature >= 0:
      raise ConfigError(f"config.eval.temperature={self.temperature} must be >= 0 (0: greedy).")
    if self.top_k < 0:
      raise ConfigError(f"config.eval.top_k={self.top_k} must be >= 0 (0: off).")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"config.eval.top_p={self.top_p} must lie in (0, 1] (1: off).")

  @property
  def exact(self) -> bool:
    """Samples come from the model's own distribution (what unbiased KL estimates need)."""
    return self.temperature == 1.0 and self.top_k == 0 and self.top_p >= 1.0

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "exact": self.exact}


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p on float32 logits `[B,V]`; dropped tokens get -inf.

  The support is exact: the k (or nucleus) most likely ids by a stable descending sort, not
  "every logit >= the k-th", which would keep extra tokens on ties.
  """
  if cfg.temperature not in (0.0, 1.0):
    logits = logits / cfg.temperature
  if not (cfg.top_k > 0 or cfg.top_p < 1.0):
    return logits
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1, stable=True)  # [B,V] ids by descending logit
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(vocab)[None, :]
  keep = jnp.ones(logits.shape, bool)
  if cfg.top_k > 0:
    keep &= rank < cfg.top_k
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  if cfg.top_p < 1.0:
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Exclusive cumsum (mass strictly before each token) without a subtraction, which would
    # round a boundary case like 0.5 + 0.3 vs top_p = 0.8 either way.
    before = jnp.concatenate([jnp.zeros_like(probs[:, :1]),
                              jnp.cumsum(probs, axis=-1)[:, :-1]], axis=-1)
    keep &= before < cfg.top_p
  inverse = jnp.argsort(order, axis=-1)  # back from sorted order to vocabulary order
  return jnp.where(jnp.take_along_axis(keep, inverse, axis=-1), logits, -jnp.inf)


def draw(rng: jax.Array, logp: jax.Array) -> jax.Array:
  """One token per row from `exp(logp)` `[B,V]` (float32, normalized, -inf allowed) -> `[B]`.

  Inverts the CDF with one uniform per row: token i is drawn when u ∈ [cdf[i-1], cdf[i]).
  `jax.random.categorical` instead draws V Gumbel variates per row, ~14% of a whole Pythia
  decoding step on CPU at V = 50k. A token of probability 0 owns an empty interval and is
  never drawn; rounding in the cumulative sum could leave it a sliver, which is caught and
  replaced by the most likely token.
  """
  probs = jnp.exp(logp)
  cdf = jnp.cumsum(probs, axis=-1)  # [B,V]
  u = jax.random.uniform(rng, (logp.shape[0], 1), jnp.float32) * cdf[:, -1:]
  tok = jnp.minimum(jnp.sum(cdf <= u, axis=-1), logp.shape[-1] - 1)
  ok = jnp.take_along_axis(probs, tok[:, None], axis=-1)[:, 0] > 0
  return jnp.where(ok, tok, jnp.argmax(logp, axis=-1)).astype(jnp.int32)


def _choose(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig):
  """Next tokens `[B]` and their log-probs under the model and under the sampler."""
  # Sampling statistics in float32: a bf16 log-softmax over 50k logits loses ~2 digits.
  logits = logits.astype(jnp.float32)
  model_logp = jax.nn.log_softmax(logits, axis=-1)  # [B,V]
  if cfg.temperature == 0.0:
    tok = jnp.argmax(logits, axis=-1)
    sample_logp = jnp.zeros(tok.shape, jnp.float32)  # a point mass
  else:
    filtered = filter_logits(logits, cfg)
    sample_logp_all = jax.nn.log_softmax(filtered, axis=-1)  # [B,V]
    tok = draw(rng, sample_logp_all)
    sample_logp = jnp.take_along_axis(sample_logp_all, tok[:, None], axis=-1)[:, 0]
  return tok, jnp.take_along_axis(model_logp, tok[:, None], axis=-1)[:, 0], sample_logp


def _constrain_cache(cache, mesh):
  if mesh is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(mesh, cache))


def _prompt_positions(prompt_mask: jax.Array) -> jax.Array:
  """0, 1, ... from each row's first real token (the trainer's positions)."""
  return jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)


def prefill(model: model_lib.CausalLM, params, prompt_tokens: jax.Array,
            prompt_mask: jax.Array, max_new_tokens: int,
            mesh: jax.sharding.Mesh | None = None):
  """Runs the prompts through the model once, filling a KV cache of `P + max_new_tokens` slots.

  Args:
    model, params: as for `sample`.
    prompt_tokens, prompt_mask: `[B,P]`, LEFT-padded.
    max_new_tokens: T, the cache slots kept free for decoding.
    mesh: as for `sample`.

  Returns:
    `(cache, last_logits [B,V], next_pos [B])`: the cache after the prompt, the logits of
    the last prompt position and the rotary position of the first new token.
  """
  batch, prompt_len = prompt_tokens.shape
  variables = {"params": params}
  prompt_mask = prompt_mask.astype(jnp.int32)
  cache = _constrain_cache(
      model_lib.init_cache(model.config, batch, prompt_len + max_new_tokens), mesh)
  hidden, cache = model.apply(variables, prompt_tokens, attention_mask=prompt_mask,
                              positions=_prompt_positions(prompt_mask), cache=cache,
                              prefill=True,  # a fresh cache: splash runs the prompts
                              method=model_lib.CausalLM.hidden_states)  # [B,P,D]
  # Only the last prompt position's logits are needed: [B,P,V] would be large for Pythia.
  last_logits = model.apply(variables, hidden[:, -1:],
                            method=model_lib.CausalLM.logits_from_hidden)[:, 0]  # [B,V]
  return cache, last_logits, jnp.sum(prompt_mask, axis=-1)


def decode_step(model: model_lib.CausalLM, params, cache, last_logits: jax.Array,
                done: jax.Array, next_pos: jax.Array, t: jax.Array, rng: jax.Array,
                cfg: SamplingConfig, mesh: jax.sharding.Mesh | None = None):
  """Chooses token t of every row from `last_logits [B,V]` and feeds it through the model.

  Rows already `done` [B] get `pad_id`, log-probs 0 and attention mask 0 (their cache slots
  stay invisible). Returns `(cache, logits [B,V], done, (tok, logp, sample_logp, alive))`,
  each of the last four `[B]`.
  """
  tok, logp, slogp = _choose(last_logits, jax.random.fold_in(rng, t), cfg)
  alive = ~done
  tok = jnp.where(alive, tok, cfg.pad_id).astype(jnp.int32)
  logp = jnp.where(alive, logp, 0.0)
  slogp = jnp.where(alive, slogp, 0.0)
  done = done | (alive & (tok == cfg.eos_id))
  logits, cache = model.apply(
      {"params": params}, tok[:, None], attention_mask=alive[:, None].astype(jnp.int32),
      positions=(next_pos + t)[:, None], cache=cache)
  return _constrain_cache(cache, mesh), logits[:, -1], done, (tok, logp, slogp, alive)


def sample(model: model_lib.CausalLM, params, prompt_tokens: jax.Array,
           prompt_mask: jax.Array, rng: jax.Array, cfg: SamplingConfig,
           mesh: jax.sharding.Mesh | None = None,
           return_steps: bool = False) -> dict[str, jax.Array]:
  """Samples continuations of left-padded prompts; stops once every row has produced EOS.

  Decoding is a `lax.while_loop` that ends after `cfg.max_new_tokens` steps or as soon as
  every row is finished, whichever comes first; the outputs are the same as running all
  steps (the columns after the end hold pad, log-prob 0).

  Args:
    model: the `CausalLM`.
    params: its params (any sharding; kept).
    prompt_tokens: `[B,P]` int32, LEFT-padded (the last column is every row's last prompt
      token).
    prompt_mask: `[B,P]` 1 on real prompt tokens.
    rng: a PRNG key; step t uses `fold_in(rng, t)`.
    cfg: `SamplingConfig` (static).
    mesh: when given, the KV cache is constrained to `sharding.cache_shardings` (batch over
      data x fsdp, heads over tensor); trace under `sharding.activate(mesh)`.
    return_steps: also return `steps`, the int32 number of decoding steps run (<= T).

  Returns:
    dict with `tokens [B,T]` int32 (pad after EOS), `lengths [B]` int32 (tokens up to and
    including EOS; T if no EOS), `finished [B]` bool (EOS produced), `logps [B,T]` and
    `sample_logps [B,T]` float32 (0 after the end); T = cfg.max_new_tokens.
  """
  batch = prompt_tokens.shape[0]
  steps = cfg.max_new_tokens
  cache, last_logits, next_pos = prefill(model, params, prompt_tokens, prompt_mask, steps,
                                         mesh)
  out = (jnp.full((batch, steps), cfg.pad_id, jnp.int32), jnp.zeros((batch, steps)),
         jnp.zeros((batch, steps)), jnp.zeros((batch, steps), bool))  # tok, logp, slogp, alive

  def cond(carry):
    t, _, _, done, _ = carry
    return (t < steps) & ~jnp.all(done)

  def body(carry):
    t, cache, last_logits, done, out = carry
    cache, logits, done, new = decode_step(model, params, cache, last_logits, done, next_pos,
                                           t, rng, cfg, mesh)
    out = tuple(jax.lax.dynamic_update_slice(o, n.astype(o.dtype)[:, None], (0, t))
                for o, n in zip(out, new))
    return t + 1, cache, logits, done, out

  init = (jnp.zeros((), jnp.int32), cache, last_logits, jnp.zeros((batch,), bool), out)
  t, _, _, done, (toks, logps, slogps, alive) = jax.lax.while_loop(cond, body, init)
  result = {"tokens": toks, "lengths": jnp.sum(alive, axis=-1).astype(jnp.int32),
            "finished": done, "logps": logps.astype(jnp.float32),
            "sample_logps": slogps.astype(jnp.float32)}
  if return_steps:
    result["steps"] = t
  return result


def make_sampler(model: model_lib.CausalLM, cfg: SamplingConfig,
                 mesh: jax.sharding.Mesh | None = None):
  """`sampler(params, prompt_tokens, prompt_mask, rng) -> dict` (see `sample`), jitted.

  One compile per (batch, prompt length) shape and params sharding. With `mesh`, every call
  runs (and the first one traces) under `sharding.activate(mesh)`, so the model's activation
  constraints apply; pass prompts placed with `sharding.host_to_global`. The jitted function
  itself is `sampler.jitted` either way.
  """
  fn = jax.jit(functools.partial(sample, model, cfg=cfg, mesh=mesh))
  if mesh is None:
    fn.jitted = fn
    return fn

  def sampler(params, prompt_tokens, prompt_mask, rng):
    with sharding.activate(mesh):
      return fn(params, prompt_tokens, prompt_mask, rng)
  sampler.jitted = fn  # for inspection, e.g. `sampler.jitted._cache_size()` (compiles)
  return sampler


def _response_log_softmax(model, params, prompt_tokens, prompt_mask, response_tokens,
                          response_mask):
  """Teacher-forced float32 log-softmax `[B,T,V]` at each response position."""
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)  # [B,P+T]
  mask = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask], axis=1)
  variables = {"params": params}
  hidden = model.apply(variables, tokens, attention_mask=mask, positions=_prompt_positions(mask),
                       method=model_lib.CausalLM.hidden_states)  # [B,P+T,D]
  p, steps = prompt_tokens.shape[1], response_tokens.shape[1]
  # Position p-1+t predicts response token t; the prompt's own logits are never computed.
  logits = model.apply(variables, hidden[:, p - 1:p - 1 + steps],
                       method=model_lib.CausalLM.logits_from_hidden)  # [B,T,V]
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # float32: see _choose


def _response_mask(response_tokens, response_lengths):
  steps = response_tokens.shape[1]
  return (jnp.arange(steps)[None, :] < response_lengths[:, None]).astype(jnp.int32)


def _pick(logp, tokens, mask):
  picked = jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.where(mask > 0, picked, 0.0)


def score(model: model_lib.CausalLM, params, prompt_tokens, prompt_mask, response_tokens,
          response_lengths) -> jax.Array:
  """Per-token log-probs of given responses after left-padded prompts (teacher forcing).

  Args:
    model: the `CausalLM`.
    params: its params.
    prompt_tokens, prompt_mask: `[B,P]`, left-padded as for `sample`.
    response_tokens: `[B,T]` int32 (e.g. `sample(...)['tokens']`).
    response_lengths: `[B]` tokens that count (incl. EOS).

  Returns:
    `[B,T]` float32 log π(y_t | x, y_<t); 0 at t >= response_lengths.
  """
  mask = _response_mask(response_tokens, response_lengths)
  logp = _response_log_softmax(model, params, prompt_tokens, prompt_mask, response_tokens, mask)
  return _pick(logp, response_tokens, mask)


def score_both(model: model_lib.CausalLM, params, ref_params, prompt_tokens, prompt_mask,
               response_tokens, response_lengths) -> dict[str, jax.Array]:
  """Teacher-forced log-probs under the policy and the reference, and the exact per-step KLs.

  The same function scores both param sets, so with `params` equal to `ref_params` the
  log-ratios are exactly 0.

  Returns:
    dict of `[B,T]` float32, 0 at t >= response_lengths:
      `policy_logps`, `ref_logps`: log πθ(y_t|·), log π_ref(y_t|·);
      `kl_step`: KL(πθ(·|x,y_<t) ‖ π_ref(·|x,y_<t)) summed over the whole vocabulary;
      `forward_kl_step`: KL(π_ref(·|·) ‖ πθ(·|·)) likewise.
    Summed over t on samples from πθ (resp. π_ref), the step KLs are Rao-Blackwellized
    estimators of the sequence-level reverse (resp. forward) KL.
  """
  mask = _response_mask(response_tokens, response_lengths)
  logp = _response_log_softmax(model, params, prompt_tokens, prompt_mask, response_tokens, mask)
  ref_logp = _response_log_softmax(model, ref_params, prompt_tokens, prompt_mask,
                                   response_tokens, mask)
  diff = logp - ref_logp  # [B,T,V]; finite: the model's logits are finite
  kl = jnp.sum(jnp.exp(logp) * diff, axis=-1)  # [B,T]
  fkl = -jnp.sum(jnp.exp(ref_logp) * diff, axis=-1)
  live = mask > 0
  return {"policy_logps": _pick(logp, response_tokens, mask),
          "ref_logps": _pick(ref_logp, response_tokens, mask),
          "kl_step": jnp.where(live, kl, 0.0), "forward_kl_step": jnp.where(live, fkl, 0.0)}
