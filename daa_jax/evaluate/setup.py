"""What evaluating a run needs, built once: its restored config, mesh, model, reference, prompts, judge and compiled functions."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any
from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from daa_jax.data import pipeline as data_pipeline
from daa_jax.evaluate import judges
from daa_jax.evaluate import llm_judge
from daa_jax.models import model as model_lib
from daa_jax.train import fixed_layout
from daa_jax.evaluate import sampling
from daa_jax.models import sharding
from daa_jax.train import step as step_lib
from daa_jax.errors import CheckpointError, ConfigError, warn_misfit
from daa_jax.data import synthetic as synthetic_lib
from daa_jax.data import tokenize as tokenize_lib
from daa_jax.train import init as init_lib
from daa_jax.evaluate import prompts as prompts_lib


def load_run_config(run_dir: str, eval_config) -> ml_collections.ConfigDict:
  """The run's `config.json` with `eval`, `judge` (and a set `mesh`) of the eval config."""
  path = epath.Path(run_dir) / "config.json"
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; config.run (or --workdir) must be the workdir "
                          "of a daa_jax training run, which writes config.json.")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  config.eval = ml_collections.ConfigDict(eval_config.eval.to_dict())
  config.judge = ml_collections.ConfigDict(eval_config.judge.to_dict())
  config.mesh = tuple(eval_config.get("mesh") or config.get("mesh") or (-1, 1, 1))
  return config


def _validate(e) -> None:
  for field in ("num_prompts", "samples_per_prompt", "batch_size"):
    if int(e[field]) < 1:
      raise ConfigError(f"config.eval.{field}={e[field]} must be >= 1.")


def steps_per_epoch(run_dir: str) -> float | None:
  """Optimizer steps per epoch of the run, from its metrics.jsonl (`data/epoch` = step/spe)."""
  path = epath.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return None
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
      epoch, step = float(row["data/epoch"]), float(row["step"])
    except (ValueError, KeyError, TypeError):
      continue
    if epoch > 0 and step > 0:
      return round(step / epoch, 6)
  return None


def make_judge(config, tokenizer, mesh, out_dir: str):
  """(name, judge) from `config.judge`; None for 'none'. Built first, so it fails fast."""
  j = config.judge
  name = j.name
  synthetic = config.data.source == "synthetic"
  if name == "auto":
    name = "gold" if synthetic else "llm" if os.environ.get(j.api_key_env) else "none"
    if name == "none":
      warn_misfit(
          f"config.judge.name=auto: no ${j.api_key_env} is set, so no LLM judge; this "
          "evaluation measures KL, held-out accuracy and drift but no win rate. For win rates "
          f"set ${j.api_key_env} (an OpenAI-compatible endpoint: config.judge.base_url), or "
          "score with a local reward model: --config.judge.name=reward_model "
          "--config.judge.reward_model=DIR.")
  if name == "none":
    return name, None
  if name == "gold":
    if not synthetic:
      raise ConfigError("config.judge.name='gold' needs the synthetic task (its gold reward); "
                        "use 'reward_model' or 'llm' for real data.")
    task = synthetic_lib.SyntheticTask(config.data.synthetic)
    # Samples come as (token ids, has_eos): ids are scored as they are (a decode would drop the
    # non-byte ids of a padded vocabulary), and a response that never ends is penalized.
    # References are texts of the task's own alphabet.
    return name, judges.GoldJudge(lambda p, s: task.gold_reward_ids(p, *s)
                                  if isinstance(s, tuple) else task.gold_reward(p, s))
  if name == "reward_model":
    if not j.reward_model:
      raise ConfigError("config.judge.reward_model is empty; give a local "
                        "GPTNeoXForSequenceClassification directory.")
    rm_tokenizer = j.get("tokenizer") or None
    if rm_tokenizer is None and not epath.Path(j.reward_model, "tokenizer.json").exists():
      rm_tokenizer = tokenizer  # the RM dir has no tokenizer: assume the run's
    return name, judges.RewardModelJudge(
        j.reward_model, tokenizer=rm_tokenizer, max_length=int(j.max_length),
        batch_size=int(j.batch_size), mesh=mesh)
  if name == "llm":
    fields = {f.name for f in dataclasses.fields(llm_judge.LLMJudgeConfig)}
    kw = {k: v for k, v in j.to_dict().items() if k in fields and v is not None}
    kw.setdefault("cache_path", str(epath.Path(out_dir) / "eval" / "llm_judge_cache.jsonl"))
    return name, llm_judge.LLMJudge(llm_judge.LLMJudgeConfig.from_dict(kw))
  raise ConfigError(f"config.judge.name={name!r}; use auto, gold, reward_model, llm or none.")


def row_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
  """Row indices per batch (fixed size: one compile); the last batch is padded with copies of
  its first row, which callers drop by slicing to `num_rows`."""
  out = []
  for start in range(0, num_rows, batch_size):
    rows = np.arange(start, min(start + batch_size, num_rows))
    out.append(np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]))
  return out


def to_mesh(host: dict, mesh) -> dict:
  """A global batch (identical on every process) -> global arrays; each device takes its rows.

  Whole, not split per process: which rows a process's devices hold depends on the mesh (with
  tensor spanning processes, both hold every row; with fsdp spanning them, half each).
  """
  return sharding.host_to_global(host, mesh, whole=True)


@dataclasses.dataclass
class Setup:
  """What every checkpoint's evaluation shares: compiled functions, data, the reference."""
  config: Any
  mesh: Any
  tokenizer: Any
  sampler: Any
  scorer: Any
  eval_fn: Any
  hparams: Any
  ref_params: Any
  prompts: prompts_lib.PromptSet
  rows: np.ndarray  # [N] prompt index of each sample
  batch_size: int
  pair_batches: list  # (host batch with ref_logps, valid [B] bool)
  judge_name: str
  judge: Any
  sampling_cfg: sampling.SamplingConfig
  forward_samples: dict | None = None


def prepare(config, run_dir: str, out_dir: str, mesh=None, ref_params=None) -> Setup:
  """Builds the mesh, judge, data, reference params and compiled functions, once per `run`.

  `mesh`, `ref_params`: given by a caller that already has them (the guard, inside
  training: the training mesh and the trainer's reference), else built from `config`.
  """
  e = config.eval
  _validate(e)
  if mesh is None:
    mesh = sharding.make_mesh(tuple(config.mesh))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  tokenizer = tokenize_lib.get_tokenizer(config.data.tokenizer)
  judge_name, judge = make_judge(config, tokenizer, mesh, out_dir)
  prompts = prompts_lib.prompt_set(config.data, run_dir, int(e.num_prompts), tokenizer.pad_id,
                       e.get("reference_source") or None)
  pairs = data_pipeline.load_pairs(config.data, "eval", workdir=run_dir)
  max_new = prompts_lib.generation_budget(config)
  scfg = sampling.SamplingConfig(
      max_new_tokens=max_new, temperature=float(e.temperature), top_k=int(e.top_k),
      top_p=float(e.top_p), eos_id=int(tokenizer.eos_id), pad_id=int(tokenizer.pad_id))
  if not scfg.exact:
    logging.warning("eval: sampling %s is not exact (temperature 1, no top-k/top-p); the KL "
                    "estimates will be biased.", scfg)

  model_cfg = init_lib.model_config(config, tokenizer.vocab_size)
  model = model_lib.CausalLM(model_cfg)
  param_shardings = sharding.param_shardings(model_cfg, mesh)
  if ref_params is None:
    ref = init_lib.initial_params(config, model_cfg, mesh, param_shardings)
    ref_dtype = np.dtype(config.objective.get("ref_dtype", "float32"))
    ref = jax.tree.map(lambda p: p.astype(ref_dtype), ref)  # as the trainer's reference
  else:
    ref = ref_params

  batch_size = -(-int(e.batch_size) // dp) * dp
  rows = np.repeat(np.arange(len(prompts.texts)), int(e.samples_per_prompt))
  batch_size = min(batch_size, -(-len(rows) // dp) * dp)

  # Held-out pairs: reference log-probs once, then a cached-reference eval step per checkpoint.
  # The reference's own log-probs come from that same compiled step (its `policy_logps` with
  # the reference as policy), so at step 0 every log-ratio is exactly 0.
  num_pairs = min(int(e.num_pairs) or len(pairs), len(pairs))
  pair_bs = min(batch_size, -(-num_pairs // dp) * dp)
  objective = config.objective
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  hparams = jax.device_put(step_lib.hparams_from_config(objective), replicated)
  packed = bool(config.train.get("packing", False))  # prompt-shared rows, as in training
  eval_fn = jax.jit(functools.partial(
      step_lib.eval_step, model=model, cfg=step_lib.StepConfig(
          kind="daa", objective=objective.name, normalize=objective.normalize, cached_ref=True,
          packing=packed)))
  pack = fixed_layout.packer_for(config.train, pairs) if packed else (lambda b: b)
  keys = ("tokens", "loss_mask", "attention_mask", "positions", "lengths")
  pair_batches = []
  with sharding.activate(mesh):
    for start, rows_ in zip(range(0, num_pairs, pair_bs), row_batches(num_pairs, pair_bs)):
      host = pack({k: v for k, v in pairs.batch(rows_).items() if k in keys})
      host["ref_logps"] = np.zeros(host["lengths"].shape, np.float32)
      _, m = eval_fn(ref, None, to_mesh(host, mesh), hparams)
      host["ref_logps"] = np.asarray(sharding.fetch(m["policy_logps"]), np.float32)
      valid = np.arange(len(rows_)) < num_pairs - start  # padding copies come last
      pair_batches.append((host, valid))
  return Setup(
      config=config, mesh=mesh, tokenizer=tokenizer,
      sampler=sampling.make_sampler(model, scfg, mesh),
      scorer=jax.jit(functools.partial(sampling.score_both, model)),
      eval_fn=eval_fn, hparams=hparams,
      ref_params=ref, prompts=prompts, rows=rows, batch_size=batch_size,
      pair_batches=pair_batches, judge_name=judge_name, judge=judge, sampling_cfg=scfg)
