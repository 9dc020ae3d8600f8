"""`config.guard`: the over-optimization guard's fields and their checks (the guard itself is
`daa_jax.study.guard`, which measures and fits; this module is only the config, so that
training's `validate` checks it before any work starts).

The guard evaluates the policy during a DAA run with the evaluation's own code: every
`every` steps and at every schedule checkpoint (and at step 0, the reference: the fits' R0),
it samples on the fixed held-out prompts of `guard.eval`, estimates the KL to the reference,
scores the win rate with `guard.judge` and the held-out preference accuracy; from 4 distinct
KL points on it fits the paper's law and predicts d* and the peak win rate. `stop` decides:

  none       measure only
  kl_budget  stop once √KL exceeds `kl_budget`
  peak       stop once √KL is past the upper bound of the predicted d*'s interval and the win
             rate is below the best point's, by a one-sided paired test on the same prompts
             at level `alpha`

`peak` must hold at `patience` consecutive points (2: one noisy dip does not stop a run).
"""

from __future__ import annotations

import ml_collections

from daa_jax.errors import ConfigError

STOP_RULES = ("none", "kl_budget", "peak")
JUDGES = ("auto", "gold", "reward_model", "llm", "none")


def judge_fields() -> ml_collections.ConfigDict:
  """`config.judge` (evaluation) and `config.guard.judge`: who scores a sample against its
  reference (evaluate/setup.py's `make_judge`)."""
  return ml_collections.ConfigDict(dict(
      # auto (gold on the synthetic task, else llm) | gold | reward_model | llm | none (KL only)
      name="auto",
      # llm: an OpenAI-compatible chat-completions endpoint (llm_judge.LLMJudgeConfig).
      base_url="https://api.openai.com/v1",
      model="gpt-4-turbo-2024-04-09",
      api_key_env="OPENAI_API_KEY",  # the variable's name; keys never go in configs
      task="tldr",                   # tldr | dialogue
      max_concurrency=8,
      max_requests=ml_collections.config_dict.placeholder(int),  # a spending cap per checkpoint
      cache_path=ml_collections.config_dict.placeholder(str),  # None: <workdir>/eval/llm_judge_cache.jsonl
      # reward_model: a local *ForSequenceClassification directory (any supported family).
      reward_model="",
      tokenizer="",                  # "": the reward model's own, else the run's tokenizer
      max_length=512,
      batch_size=16))


def guard_eval_fields(num_prompts: int = 200) -> ml_collections.ConfigDict:
  """The evaluation settings of each guard point (the fields of `configs/eval.py`'s `eval`)."""
  return ml_collections.ConfigDict(dict(
      num_prompts=num_prompts, samples_per_prompt=1, max_new_tokens=0,
      reference_source=ml_collections.config_dict.placeholder(str),
      temperature=1.0, top_k=0, top_p=1.0, batch_size=64, seed=0, forward_kl=False,
      include_reference=True, num_pairs=200,
      steps=ml_collections.config_dict.placeholder(tuple)))


def guard_fields(enabled: bool = False) -> ml_collections.ConfigDict:
  """`config.guard` (see the module docstring)."""
  return ml_collections.ConfigDict(dict(
      enabled=enabled,
      every=0,            # also evaluate every N steps (0: only at schedule checkpoints)
      stop="none",        # none | kl_budget | peak
      kl_budget=0.0,      # kl_budget: the largest √KL (nats^½) the run may reach
      alpha=0.05,         # peak: level of the paired test against the best point
      patience=2,         # peak: stop once the rule holds at this many consecutive points
      num_bootstrap=300,  # replicates of the running fit's intervals
      # Record where the rule would stop (and which point it would keep), but train on: the
      # same decisions as a real stop (tests/study/test_guard.py), and the points past it
      # show what stopping saved and lost.
      dry_run=False,
      # Write each point as the evaluation's `eval/<step>/` too (same files as `daa-jax eval`
      # writes): a later evaluation with the same settings skips those steps.
      write_eval=True,
      eval=guard_eval_fields(),
      judge=judge_fields()))


def validate_guard(config, prefix: str = "config.") -> None:
  """Checks `config.guard` of a DAA run (absent or disabled: nothing to check)."""
  g = config.get("guard")
  if g is None or not g.get("enabled"):
    return
  # guard.stop and guard.judge.name: train/config.py's CHOICES (with the closest name).
  if int(g.every) < 0:
    raise ConfigError(f"{prefix}guard.every={g.every} must be >= 0 (0: only at the schedule "
                      "checkpoints).")
  if g.stop == "kl_budget" and not float(g.kl_budget) > 0:
    raise ConfigError(
        f"{prefix}guard.stop='kl_budget' needs {prefix}guard.kl_budget > 0 (the largest "
        f"sqrt(KL) the run may reach, e.g. 1.5); it is {g.kl_budget}.")
  if g.stop == "peak" and not 0 < float(g.alpha) < 0.5:
    raise ConfigError(f"{prefix}guard.alpha={g.alpha} must be in (0, 0.5): the level of the "
                      "one-sided paired test that the win rate fell below the best point's.")
  if g.stop == "peak" and g.judge.name == "none":
    raise ConfigError(f"{prefix}guard.stop='peak' needs a win rate: set {prefix}guard.judge.name "
                      "to gold (synthetic task), reward_model or llm, or use stop='kl_budget'.")
  if int(g.get("patience", 1)) < 1:
    raise ConfigError(f"{prefix}guard.patience={g.patience} must be >= 1 (consecutive points "
                      "at which the rule must hold before the run stops).")
  if int(g.num_bootstrap) < 100:
    raise ConfigError(f"{prefix}guard.num_bootstrap={g.num_bootstrap} must be >= 100 for a "
                      "95% interval.")
  for field in ("num_prompts", "samples_per_prompt", "batch_size"):
    if int(g.eval[field]) < 1:
      raise ConfigError(f"{prefix}guard.eval.{field}={g.eval[field]} must be >= 1.")
