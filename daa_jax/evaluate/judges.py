"""Judges that decide whether a policy sample beats the reference, and win rates with intervals.

Every judge has the same contract:

  judge.judge(prompts, samples, references) -> (outcomes [N] float64, info dict)

with outcome 1 when the policy sample wins, 0 when the reference wins and 0.5 on a tie.
`win_rate(outcomes)` turns outcomes into a win rate with a 95% interval. In a multi-process
job, `judge_once` asks a judge once (on process 0) and gives its answer to every process.

* `GoldJudge` compares a programmatic gold reward (the synthetic task's).
* `llm_judge.LLMJudge` asks an OpenAI-compatible chat-completions endpoint (GPT-4 in the
  paper); it lives in `evaluate/llm_judge.py`.
* `RewardModelJudge` scores both responses with a learned reward model (a Hugging Face
  `*ForSequenceClassification` of any supported family) run by daa_jax's own model.

Importing this module imports neither jax nor anything that touches devices; only building a
`RewardModelJudge` does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from daa_jax.errors import ConfigError, DataError


# --- Win rates ------------------------------------------------------------------------------


def win_rate(outcomes: Sequence[float], method: str = "wilson", confidence: float = 0.95,
             n_bootstrap: int = 2000, seed: int = 0, groups=None) -> dict[str, float]:
  """Win rate of the policy with a confidence interval; ties count half.

  Methods:
    * 'wilson': the Wilson score interval applied to the mean outcome p̂ = mean(outcomes) with
      n = number of comparisons:
        center = (p̂ + z²/2n) / (1 + z²/n),
        half   = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²).
      With ties as half-wins the outcome variance is at most p̂(1 − p̂), so the interval is
      conservative when there are ties. Unlike the normal interval it stays inside [0, 1].
    * 'bootstrap': percentile bootstrap of the mean over `n_bootstrap` resamples drawn with
      `numpy.random.default_rng(seed)` (deterministic for a given seed).

  Several samples of one prompt are not independent comparisons (a hard prompt is lost by all
  its samples). With `groups` (the prompt of each outcome) the interval treats prompts as the
  independent units: the win rate is the mean of the prompt means (each prompt counts once),
  'bootstrap' resamples prompts, and 'wilson' uses the effective number of comparisons
  n_eff = G · p̂(1 − p̂) / s², with G prompts and s² the variance of the prompt means around
  p̂ (the design effect), capped at n so that it is never narrower than the interval that
  treats every outcome as independent. Both stay inside [0, 1] by construction.

  Args:
    outcomes: [N] values in [0, 1]: 1 policy wins, 0 reference wins, 0.5 tie. Values strictly
      between 0 and 1 (e.g. 0.75 when one of the LLM judge's two orders was a tie) count as ties
      in the `ties` count and by value in the mean.
    method: 'wilson' or 'bootstrap'.
    confidence: two-sided confidence level.
    n_bootstrap: resamples for 'bootstrap'.
    seed: RNG seed for 'bootstrap'.
    groups: [N] the prompt (any hashable id) of each outcome, or None: every outcome is its
      own prompt.

  Returns:
    dict with win_rate, lo, hi (floats) and n, wins, ties, losses (ints); with `groups` also
    num_prompts and n_eff ('wilson': the effective number of comparisons).

  Raises:
    DataError: no outcomes, or an outcome outside [0, 1] or not finite.
  """
  x = np.asarray(outcomes, dtype=np.float64).reshape(-1)
  n = x.size
  if n == 0:
    raise DataError("win_rate: got no outcomes; judge at least one comparison.")
  if not np.all(np.isfinite(x)) or np.any((x < 0) | (x > 1)):
    bad = x[~np.isfinite(x) | (x < 0) | (x > 1)][:5]
    raise DataError(f"win_rate: outcomes must lie in [0, 1] (1 win, 0.5 tie, 0 loss); got {bad}.")
  if not 0 < confidence < 1:
    raise ConfigError(f"win_rate: confidence={confidence} must lie in (0, 1).")
  if method not in ("wilson", "bootstrap"):
    raise ConfigError(f"win_rate: method={method!r}; use 'wilson' or 'bootstrap'.")
  extra: dict[str, float] = {}
  if groups is not None:
    groups = np.asarray(groups).reshape(-1)
    if groups.size != n:
      raise DataError(f"win_rate: got {n} outcomes but {groups.size} groups; pass the prompt "
                      "of every outcome.")
    _, index = np.unique(groups, return_inverse=True)
    units = np.bincount(index, weights=x) / np.bincount(index)  # [G] prompt means
  else:
    units = x
  g = units.size
  p = float(units.mean())
  n_eff = float(n)
  if groups is not None:
    s2 = float(np.mean((units - p) ** 2))
    if s2 > 0:
      n_eff = min(float(n), g * p * (1 - p) / s2)
    extra = {"num_prompts": int(g), "n_eff": n_eff}
  if method == "wilson":
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n_eff
    center = (p + z * z / (2 * n_eff)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n_eff + z * z / (4 * n_eff * n_eff))
    lo, hi = max(0.0, center - half), min(1.0, center + half)
    # At p̂ = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave 1e-17.
    lo, hi = (0.0 if p == 0 else lo), (1.0 if p == 1 else hi)
  else:
    rng = np.random.default_rng(seed)
    means = []
    # Chunked so that memory stays O(chunk · g) for large evaluations.
    for start in range(0, n_bootstrap, 500):
      b = min(500, n_bootstrap - start)
      means.append(units[rng.integers(0, g, size=(b, g))].mean(axis=1))
    means = np.concatenate(means)
    alpha = 1 - confidence
    lo, hi = (float(v) for v in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
  return dict(win_rate=p, lo=float(lo), hi=float(hi), n=int(n),
              wins=int(np.sum(x == 1)), ties=int(np.sum((x > 0) & (x < 1))),
              losses=int(np.sum(x == 0)), **extra)


class Judge(Protocol):
  """What the evaluation loop needs from a judge.

  In a multi-process job, evaluation calls a judge on process 0 alone and shares its result,
  unless the judge has `collective = True` (it runs jax computations on a mesh spanning the
  processes, so every process must call it).
  """

  def judge(self, prompts: Sequence[Any], samples: Sequence[Any],
            references: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    ...


def judge_once(judge: Judge, prompts: Sequence[Any], samples: Sequence[Any],
               references: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
  """`judge.judge(...)`, judged once per job: the same (outcomes, info) on every process.

  A collective judge (`RewardModelJudge`: a forward pass on a mesh spanning the processes)
  runs on every process. Any other judge runs on process 0 alone and its answer is broadcast,
  so an LLM judge is asked once per job and only process 0 writes its cache. Single-process,
  this is `judge.judge(...)`.
  """
  if getattr(judge, "collective", False):
    return judge.judge(prompts, samples, references)
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  outcomes, info = sharding.share_from_process_0(
      lambda: list(judge.judge(prompts, samples, references)))
  return np.asarray(outcomes, np.float64), info


def check_lengths(prompts, samples, references):
  if not len(prompts) == len(samples) == len(references):
    raise DataError(
        f"judge: got {len(prompts)} prompts, {len(samples)} samples and {len(references)} "
        "references; pass one sample and one reference per prompt.")


def outcomes_from_rewards(sample_rewards, reference_rewards, tie_tol: float = 0.0) -> np.ndarray:
  """The outcome rule of reward judges: 1 if the sample's reward is higher, 0 if lower, 0.5
  when |r(sample) − r(reference)| ≤ tie_tol. [N] float64."""
  diff = np.asarray(sample_rewards, np.float64) - np.asarray(reference_rewards, np.float64)
  return np.where(np.abs(diff) <= tie_tol, 0.5, np.where(diff > 0, 1.0, 0.0))


# --- Gold reward ----------------------------------------------------------------------------


class GoldJudge:
  """Compares a programmatic gold reward of the policy sample and of the reference.

  Used with the synthetic task, whose gold reward is known exactly.
  """

  def __init__(self, reward_fn: Callable[[Any, Any], float], tie_tol: float = 0.0):
    """Args:
      reward_fn: reward_fn(prompt, response) -> float (texts or token lists; passed through).
      tie_tol: |r(sample) − r(reference)| ≤ tie_tol counts as a tie. 0 suits rewards on a grid
        (the synthetic reward moves in steps of 0.5).
    """
    self.reward_fn = reward_fn
    self.tie_tol = float(tie_tol)

  def judge(self, prompts, samples, references):
    """Returns (outcomes [N], {'sample_rewards': [N], 'reference_rewards': [N]})."""
    check_lengths(prompts, samples, references)
    r_sample = np.array([float(self.reward_fn(p, s)) for p, s in zip(prompts, samples)])
    r_ref = np.array([float(self.reward_fn(p, r)) for p, r in zip(prompts, references)])
    return (outcomes_from_rewards(r_sample, r_ref, self.tie_tol),
            {"sample_rewards": r_sample, "reference_rewards": r_ref})


# --- Reward-model judge ---------------------------------------------------------------------


def reward_sequences(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                     max_length: int, append_eos: bool = True) -> list[list[int]]:
  """Token ids a reward model scores: `rm_tokenizer(prompt + response)` (its BOS first, if it
  has one, once) then EOS, the prompt and response encoded apart as in the training data.

  Too long: the end is kept (the response is what is judged), with BOS still first.
  """
  eos = [tokenizer.eos_id] if append_eos else []
  bos = list(getattr(tokenizer, "bos_prefix", ()))
  seqs = []
  for p, r in zip(prompts, responses):
    seq = list(tokenizer.encode(p)) + list(tokenizer.encode(r)) + eos
    body = seq[len(bos):] if bos and seq[:len(bos)] == bos else seq  # a prompt with its own
    seqs.append(bos + body[max(len(body) - (int(max_length) - len(bos)), 0):])
  return seqs


class RewardModelJudge:
  """Scores both responses with a learned reward model and compares like `GoldJudge`.

  The reward model is a Hugging Face `*ForSequenceClassification` (GPT-NeoX, Llama, Mistral,
  Qwen2, Gemma-2) with one label: the trunk (`gpt_neox.*` / `model.*`, converted by
  `hf_convert`, so the trunk is exactly `model.CausalLM`'s) and a bias-free
  `score.weight [1, D]`. The reward of a sequence is `score · h`, with h the final (post
  final norm) hidden state at the pooled token.
  Pooling follows transformers: the rightmost real token whose id is not the config's
  `pad_token_id` (so with pad = EOS, as in Pythia, a trailing EOS is skipped exactly as HF
  skips it); without a `pad_token_id`, the last real token.

  A scored sequence is prompt tokens + response tokens (+ EOS with `append_eos`), tokenized
  separately like the training data; longer than `max_length`, it keeps its end.

  jax, the model and the converter are imported when a judge is built, so importing this
  module never touches devices.

  With a mesh that spans processes, `judge` is a collective: every process calls it with the
  same inputs (`collective`) and gets the same rewards.
  """

  collective = True  # evaluation calls it on every process (other judges: process 0 only)

  def __init__(self, path: str, tokenizer: Any = None, max_length: int = 512,
               batch_size: int = 8, tie_tol: float = 0.0, append_eos: bool = True,
               mesh: Any = None, dtype: str = "float32"):
    """Loads the reward model.

    Args:
      path: a local HF model directory (config.json plus safetensors or pytorch_model.bin).
      tokenizer: an object with `encode` and `eos_id` (`data.get_tokenizer`), a name for
        `data.get_tokenizer`, or None for the tokenizer saved in `path`.
      max_length: longest scored sequence in tokens.
      batch_size: sequences per forward (rounded up to the mesh's data-parallel size).
      tie_tol: |r(sample) - r(reference)| <= tie_tol counts as a tie.
      append_eos: end every response with the tokenizer's EOS (as in the training data).
      mesh: a `sharding` mesh to shard the weights and batch over; None: default device.
      dtype: compute dtype of the trunk (params stay float32).

    Raises:
      CheckpointError: missing files, no `score.weight`, more than one label, or weights
        that do not fit config.json.
    """
    # pylint: disable=g-import-not-at-top
    import jax
    import jax.numpy as jnp
    from daa_jax.models import hf_convert
    from daa_jax.models import model as model_lib
    from daa_jax.models import sharding
    from daa_jax.models.config import ModelConfig
    from daa_jax.data.tokenize import get_tokenizer
    from daa_jax.errors import CheckpointError
    # pylint: enable=g-import-not-at-top
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
      raise CheckpointError(f"config.judge.reward_model={path!r}: no config.json there; give a "
                            "local *ForSequenceClassification directory (GPT-NeoX, Llama, "
                            "Mistral, Qwen2 or Gemma-2).")
    with open(config_file, encoding="utf-8") as f:
      hf_config = json.load(f)
    self.config = ModelConfig.from_hf(hf_config, dtype=dtype)
    self.pad_token_id = hf_config.get("pad_token_id")
    tensors, sources = hf_convert._read_weights(path)  # pylint: disable=protected-access
    score_name = next((k for k in ("score.weight", "gpt_neox.score.weight") if k in tensors),
                      None)
    if score_name is None:
      raise CheckpointError(
          f"{path}: no 'score.weight' tensor; a reward model must be a "
          "*ForSequenceClassification checkpoint (a trunk plus a [1, hidden] score head).")
    # pylint: disable-next=protected-access
    score = np.asarray(hf_convert._to_numpy(tensors.pop(score_name)), np.float32)
    if score.shape != (1, self.config.hidden_size):
      raise CheckpointError(
          f"{sources.get(score_name, path)}: 'score.weight' has shape {score.shape}; a reward "
          f"model needs one label, shape (1, {self.config.hidden_size}).")
    # The classifier has no LM head. Read it as a tied model (the head is the embedding);
    # a family that keeps a tied head as a copy (GPT-NeoX's embed_out) gets it dropped
    # again: hidden_states never reads it.
    self.config = self.config.replace(tie_word_embeddings=True)
    family = self.config.family
    copies = set(family.aliases(self.config))
    head_keys = {path[0] for path, hub in family.hf_names(self.config).items() if hub in copies}
    params = hf_convert.params_from_hf_state_dict(self.config, tensors, source=sources)
    for key in head_keys:
      params.pop(key)
    self.mesh = mesh
    self._dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if mesh is None:
      self.params = jax.device_put(params)
    else:
      shardings = sharding.param_shardings(self.config, mesh)
      for key in head_keys:
        shardings.pop(key)
      self.params = sharding.place_params(params, shardings)
    self.score_weight = score[0]  # [D]
    if tokenizer is None or isinstance(tokenizer, str):
      tokenizer = get_tokenizer(tokenizer or path)
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.batch_size = -(-max(int(batch_size), 1) // self._dp) * self._dp
    self.tie_tol = float(tie_tol)
    self.append_eos = bool(append_eos)
    model = model_lib.CausalLM(self.config)
    pad = -1 if self.pad_token_id is None else int(self.pad_token_id)

    def rewards(params, score_weight, tokens, mask):
      hidden = model.apply({"params": params}, tokens, attention_mask=mask,
                           method=model_lib.CausalLM.hidden_states)  # [B,L,D]
      index = jnp.arange(tokens.shape[1])[None, :]
      real = mask > 0
      poolable = real & (tokens != pad)
      # HF: the rightmost non-pad token; a row of only pad ids falls back to its last token.
      last = jnp.where(poolable.any(-1), jnp.max(jnp.where(poolable, index, -1), -1),
                       jnp.maximum(jnp.sum(real, -1) - 1, 0))  # [B]
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B,D]
      # The head in float32: a bf16 dot over D loses the small reward differences we compare.
      return pooled.astype(jnp.float32) @ score_weight

    self._jax = jax
    self._sharding = sharding
    self._fn = jax.jit(rewards)

  def reward_tokens(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rewards `[N]` float64 of token rows `[N, L]` with a 0/1 `mask` (right-padded)."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.asarray(mask, np.int32)
    n, length = tokens.shape
    out = np.zeros(n, np.float64)
    for start in range(0, n, self.batch_size):
      rows = np.arange(start, min(start + self.batch_size, n))
      # Pad the last batch with copies of its first row: one compile per (batch, length).
      rows = np.concatenate([rows, np.full(self.batch_size - len(rows), rows[0])])
      t, m = tokens[rows], mask[rows]
      if self.mesh is None:
        got = self._jax.device_get(self._fn(self.params, self.score_weight, t, m))
      else:
        # Every process holds the whole batch; each device takes its rows, and the rewards
        # come back whole on every process (an all-gather when the mesh spans processes).
        with self._sharding.activate(self.mesh):
          batch = self._sharding.host_to_global({"t": t, "m": m}, self.mesh, whole=True)
          r = self._fn(self.params, self.score_weight, batch["t"], batch["m"])
        got = self._sharding.global_to_host(r)
      got = np.asarray(got, np.float64)
      keep = min(self.batch_size, n - start)
      out[start:start + keep] = got[:keep]
    return out

  def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """Rewards `[N]` of (prompt, response) texts."""
    if len(prompts) != len(responses):
      raise DataError(f"reward model: {len(prompts)} prompts but {len(responses)} responses.")
    seqs = reward_sequences(self.tokenizer, prompts, responses, self.max_length,
                            self.append_eos)
    if not seqs:
      return np.zeros(0, np.float64)
    # Round the length up to a multiple of 32 so that calls rarely compile anew.
    length = min(self.max_length, -(-max(max(len(s) for s in seqs), 1) // 32) * 32)
    tokens = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
      mask[i, :len(s)] = 1
    return self.reward_tokens(tokens, mask)

  def judge(self, prompts, samples, references):
    """Returns (outcomes [N], {'sample_rewards': [N], 'reference_rewards': [N]})."""
    check_lengths(prompts, samples, references)
    r_sample = self.rewards(prompts, samples)
    r_ref = self.rewards(prompts, references)
    return (outcomes_from_rewards(r_sample, r_ref, self.tie_tol),
            {"sample_rewards": r_sample, "reference_rewards": r_ref})
