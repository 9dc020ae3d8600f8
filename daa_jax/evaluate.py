"""Evaluation of a run's checkpoints: KL from samples, held-out preference metrics, win rates.

  python -m daa_jax.main --config configs/eval.py:run=RUN_DIR --workdir RUN_DIR
  daa-jax eval RUN_DIR

`run` reads the run's own `config.json` (written by `train.run`) to rebuild its model, data,
objective and reference policy, takes `eval`, `judge` (and `mesh`, if set) from the eval
config, and evaluates every params export (`RUN_DIR/params/<step>/`) that has no
`<workdir>/eval/<step>/summary.json` yet — plus, with `config.eval.include_reference`, the
reference policy itself as step 0. Each evaluation writes `<workdir>/eval/<step>/`:

  arrays/        per-sample and per-pair arrays and the scalar statistics (orbax)
  samples.jsonl  one line per policy sample: prompt, reference, sample, log-probs, outcome
  summary.json   the scalars (written last: its presence marks the step as done)

KL(πθ‖π_ref) is estimated from policy samples on held-out prompts (Schulman 2020,
"Approximating KL divergence"). For a response y ~ πθ(·|x) of T tokens including EOS, with
per-token log-ratios l_t = log πθ(y_t|x,y<t) − log π_ref(y_t|x,y<t):

  k1 (`kl`, the paper's)  Σ_t l_t = log πθ(y|x)/π_ref(y|x); unbiased, can be negative.
  k3 (`kl_k3`)            Σ_t [(r_t − 1) − log r_t], r_t = exp(−l_t) = π_ref/πθ of token t.
                          Per token, then summed: each term is ≥ 0 with conditional mean KL_t
                          (E_πθ[r_t] = 1), so the sum is unbiased; less noisy than k1 while
                          the policies are close, heavy-tailed (large r_t) once they are not.
  k3 per sequence         (r − 1) − log r, r = exp(−k1): unbiased and ≥ 0 but heavy-tailed
   (`kl_k3_seq`)          once the KL is large (r spans e^±KL); a diagnostic.
  exact steps (`kl_rb`)   Σ_t KL(πθ(·|x,y<t) ‖ π_ref(·|x,y<t)) over the whole vocabulary:
                          the Rao-Blackwellized k1, unbiased and the least noisy.

Means are over samples; standard errors are std (ddof 1) / √n, the error of the mean for this
prompt set (samples are independent given the prompts; pooling their std also counts the
spread between prompts, so it is slightly conservative). `kl_per_token` = Σ k1 / Σ lengths.
The forward KL(π_ref‖πθ) uses samples from π_ref with l_t negated; those samples depend only
on the seed, so they are drawn once per `run`. Every estimator needs exact samples
(temperature 1, no top-k/top-p: the default); other settings are recorded, and warned about.

A response cut at `max_new_tokens` without EOS counts its T tokens: its terms estimate the KL
of the length-T prefixes, a lower bound of the sequence KL (`eos_rate` says how often).

Log-probs of both policies come from the same teacher-forced function (`sampling.score_both`;
`step.eval_step` for held-out pairs), so the reference against itself has KL exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from daa_jax import checkpoint as ckpt_lib
from daa_jax import config_lib
from daa_jax import data as data_lib
from daa_jax.data import pipeline as data_pipeline
from daa_jax.data import readers as data_readers
from daa_jax import judges
from daa_jax import llm_judge
from daa_jax import metrics as metrics_lib
from daa_jax import model as model_lib
from daa_jax import packing as packing_lib
from daa_jax import sampling
from daa_jax import scaling
from daa_jax import sharding
from daa_jax import step as step_lib
from daa_jax import train
from daa_jax.errors import CheckpointError, ConfigError, DataError, warn_misfit

SUMMARY_KEYS = ("step", "kl", "kl_stderr", "sqrt_kl", "forward_kl", "forward_kl_stderr",
                "win_rate", "win_rate_ci", "reward_acc", "heldout_loss", "length_r2",
                "chosen_logp_drift", "rejected_logp_drift", "num_samples", "mean_sample_length",
                "truncation_rate", "epoch_fraction", "sampling", "judge", "reference")
_SYNTHETIC_MAX_NEW_TOKENS = 32  # 2x the task's longest reference (16 symbols + EOS)


# --- Estimators (numpy, float64) -------------------------------------------------------------


def kl_estimates(logps: np.ndarray, ref_logps: np.ndarray) -> dict[str, np.ndarray]:
  """Per-sequence KL estimates from per-token log-probs of samples of the first policy.

  Args:
    logps: `[N,T]` log-probs of the sampled tokens under the sampling policy (0 past the end).
    ref_logps: `[N,T]` under the other policy (0 past the end).

  Returns:
    `k1`, `k3` (per token, summed), `k3_seq` (per sequence): `[N]` float64 (module docstring).
  """
  l = np.asarray(logps, np.float64) - np.asarray(ref_logps, np.float64)  # [N,T]
  k1 = l.sum(-1)
  # expm1: (r − 1) without cancellation when r ≈ 1; padding (l = 0) adds exactly 0.
  k3 = (np.expm1(-l) + l).sum(-1)
  with np.errstate(over="ignore"):
    k3_seq = np.expm1(-k1) + k1
  return {"k1": k1, "k3": k3, "k3_seq": k3_seq}


def mean_stderr(x: np.ndarray) -> tuple[float, float]:
  """Mean and its standard error std(ddof=1)/√n (nan for n < 2)."""
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return math.nan, math.nan
  se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
  return float(x.mean()), se


def length_r2(rewards: np.ndarray, lengths: np.ndarray) -> float:
  """R² of the least-squares line reward ≈ a + b·length (= Pearson r²); nan if either is
  constant (e.g. the reference, whose implicit rewards are all 0)."""
  r = np.asarray(rewards, np.float64)
  n = np.asarray(lengths, np.float64)
  if r.size < 2 or np.ptp(r) == 0 or np.ptp(n) == 0:
    return math.nan
  return float(np.corrcoef(n, r)[0, 1] ** 2)


def _kl_stats(scores: dict[str, np.ndarray], lengths: np.ndarray, prefix: str,
              reverse: bool) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Summary scalars and per-sequence arrays of one direction's estimates."""
  sampler, other = ("policy_logps", "ref_logps") if reverse else ("ref_logps", "policy_logps")
  est = kl_estimates(scores[sampler], scores[other])
  est["rb"] = scores["kl_step" if reverse else "forward_kl_step"].astype(np.float64).sum(-1)
  out = {}
  for name, key in (("", "k1"), ("_k3", "k3"), ("_k3_seq", "k3_seq"), ("_rb", "rb")):
    out[prefix + name], out[prefix + name + "_stderr"] = mean_stderr(est[key])
  out["sqrt_" + prefix] = math.sqrt(max(out[prefix], 0.0))
  out[prefix + "_per_token"] = float(est["k1"].sum() / max(int(np.sum(lengths)), 1))
  return out, est


# --- Inputs ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptSet:
  """Held-out prompts, left-padded: `tokens`/`mask` `[N,P]`, with their texts and references.

  `reference` says what the references are: {'kind': 'synthetic' | 'human' | 'chosen',
  'source', 'human', 'prompts'} (human: how many prompts have a human-written reference).
  """
  tokens: np.ndarray
  mask: np.ndarray
  texts: list[str]
  references: list[str]
  reference: dict = dataclasses.field(default_factory=dict)


def _human_references(source: str) -> dict[str, str]:
  """{post id or prompt text: reference} of TL;DR SFT files (format 'tldr_sft': the filtered
  TL;DR posts with their human summaries, or CarperAI/openai_summarize_tldr)."""
  try:
    files = data_pipeline.resolve_files(source)
  except DataError as err:
    raise ConfigError(f"config.eval.reference_source={source!r}: {err} Give TL;DR SFT files "
                      "(format tldr_sft) with the human reference summaries.") from None
  out = {}
  for e in data_readers.read_sft(files, "tldr_sft"):
    out.setdefault(e.prompt.strip(), e.response)
    if e.id and not e.id.startswith(os.path.basename(e.source) + ":"):
      out.setdefault(e.id, e.response)
  return out


def prompt_set(data_config, workdir: str, num_prompts: int, pad_id: int,
               reference_source: str | None = None) -> PromptSet:
  """The first `num_prompts` distinct prompts of the eval split and their references.

  References, in order of preference: a human reference per prompt from `reference_source`
  (TL;DR SFT files joined on the post id, else on the prompt text; the paper judges against
  the human-written TL;DR), the data's own `reference` column, the synthetic task's reference
  summaries, else the chosen response of the prompt's first comparison (mostly a model sample
  in TL;DR: named 'chosen' in `reference`).
  """
  ds = data_lib.load_sft(data_config, "eval", workdir=workdir)
  human = _human_references(reference_source) if reference_source else {}
  texts, refs, seen, index, joined = [], [], set(), [], 0
  for i, (text, ref, id_) in enumerate(zip(ds.prompt_texts, ds.reference_texts, ds.ids)):
    if text not in seen and len(index) < num_prompts:
      seen.add(text)
      found = human.get(id_) or human.get(text.strip())
      joined += found is not None
      texts.append(text)
      refs.append(found if found is not None else ref)
      index.append(i)
  if data_config.source == "synthetic":
    reference = {"kind": "synthetic", "source": "the task's reference summaries"}
  elif reference_source:
    reference = {"kind": "human", "source": f"config.eval.reference_source={reference_source}",
                 "human": joined}
    if joined < len(index):
      logging.warning("eval: %d of %d prompts have no human reference in %s (joined on the post "
                      "id, then the prompt text); they use their chosen response.",
                      len(index) - joined, len(index), reference_source)
  elif ds.stats.get("references"):
    reference = {"kind": "human", "source": "the data's reference column",
                 "human": int(ds.stats["references"])}
  else:
    reference = {"kind": "chosen", "source": "the chosen response of each prompt's first pair; "
                 "give human references with config.eval.reference_source"}
  reference["prompts"] = len(index)
  if len(index) < num_prompts:
    logging.warning("eval: %d distinct held-out prompts, fewer than config.eval.num_prompts=%d.",
                    len(index), num_prompts)
  prompts = [ds.prompt_tokens(i) for i in index]
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, p in enumerate(prompts):  # left padding: every row's last prompt token is last
    tokens[row, width - len(p):] = p
    mask[row, width - len(p):] = 1
  return PromptSet(tokens, mask, texts, refs, reference)


def generation_budget(config) -> int:
  """New tokens each evaluation sample may have: the same for every sample, whatever the other
  prompts of the set (left padding puts them all at one width).

  `config.eval.max_new_tokens` when > 0; else 32 on the synthetic task (twice its longest
  reference); else `data.max_length − data.max_prompt_length` (the paper's 512 − 256 = 256):
  the longest response the training data could hold. Human TL;DR references are under ~50
  tokens, so only samples that ramble past what training ever showed are cut, and the
  `truncation_rate` of each checkpoint reports how many were (a cut sample under-estimates
  its KL and shows the judge a clipped response).
  """
  e, d = config.eval, config.data
  if int(e.max_new_tokens) > 0:
    return int(e.max_new_tokens)
  if d.source == "synthetic":
    return _SYNTHETIC_MAX_NEW_TOKENS
  prompt = d.get("max_prompt_length")
  return max(int(d.max_length) - int(prompt if prompt else int(d.max_length) // 2), 1)


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
    task = data_lib.SyntheticTask(config.data.synthetic)
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


# --- Batched sampling and scoring on the mesh ----------------------------------------------------


def _row_batches(num_rows: int, batch_size: int) -> list[np.ndarray]:
  """Row indices per batch (fixed size: one compile); the last batch is padded with copies of
  its first row, which callers drop by slicing to `num_rows`."""
  out = []
  for start in range(0, num_rows, batch_size):
    rows = np.arange(start, min(start + batch_size, num_rows))
    out.append(np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]))
  return out


def _to_mesh(host: dict, mesh) -> dict:
  """A global batch (identical on every process) -> global arrays; each device takes its rows.

  Whole, not split per process: which rows a process's devices hold depends on the mesh (with
  tensor spanning processes, both hold every row; with fsdp spanning them, half each).
  """
  return sharding.host_to_global(host, mesh, whole=True)


def _fetch(tree):
  return sharding.global_to_host(tree)


@dataclasses.dataclass
class _Setup:
  """What every checkpoint's evaluation shares: compiled functions, data, the reference."""
  config: Any
  mesh: Any
  tokenizer: Any
  sampler: Any
  scorer: Any
  eval_fn: Any
  hparams: Any
  ref_params: Any
  prompts: PromptSet
  rows: np.ndarray  # [N] prompt index of each sample
  batch_size: int
  pair_batches: list  # (host batch with ref_logps, valid [B] bool)
  judge_name: str
  judge: Any
  sampling_cfg: sampling.SamplingConfig
  forward_samples: dict | None = None


def _draw(setup: _Setup, params, stream: int) -> dict[str, np.ndarray]:
  """Samples for every row: tokens [N,T], lengths, finished, sampler logps [N,T]."""
  key = jax.random.fold_in(jax.random.key(int(setup.config.eval.seed)), stream)
  out = []
  for b, rows in enumerate(_row_batches(len(setup.rows), setup.batch_size)):
    p = setup.rows[rows]
    batch = _to_mesh({"t": setup.prompts.tokens[p], "m": setup.prompts.mask[p]}, setup.mesh)
    out.append(sharding.fetch(setup.sampler(params, batch["t"], batch["m"], jax.random.fold_in(key, b))))
  return {k: np.concatenate([o[k] for o in out])[:len(setup.rows)] for k in out[0]}


def _score(setup: _Setup, params, samples: dict) -> dict[str, np.ndarray]:
  """`sampling.score_both` over every row: policy/ref log-probs and exact step KLs [N,T]."""
  out = []
  with sharding.activate(setup.mesh):
    for rows in _row_batches(len(setup.rows), setup.batch_size):
      p = setup.rows[rows]
      batch = _to_mesh({"t": setup.prompts.tokens[p], "m": setup.prompts.mask[p],
                        "y": samples["tokens"][rows], "n": samples["lengths"][rows]}, setup.mesh)
      out.append(sharding.fetch(setup.scorer(params, setup.ref_params, batch["t"], batch["m"],
                                     batch["y"], batch["n"])))
  return {k: np.concatenate([o[k] for o in out])[:len(setup.rows)] for k in out[0]}


def _heldout(setup: _Setup, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Held-out loss, reward accuracy, margins, likelihood drift and the length R²."""
  keys = ("loss", "rewards_chosen", "rewards_rejected", "accuracy", "policy_logps", "ref_logps")
  with sharding.activate(setup.mesh):
    cat = train.heldout_per_pair(setup.eval_fn, params, None, setup.hparams, setup.pair_batches,
                                 setup.mesh, keys)
  cat = {k: np.asarray(v, np.float64) for k, v in cat.items()}
  cat["lengths"] = np.concatenate([host["lengths"][valid] for host, valid in setup.pair_batches])
  # Accuracy and margin as the trainer logs them (the objective's rewards, so length-normalized
  # under normalize='mean'); accuracy is the objective's per pair (ties within float32
  # resolution counting half: objectives.tie_half_accuracy).
  margin = cat["rewards_chosen"] - cat["rewards_rejected"]
  # The length R² uses the paper's implicit reward β·log πθ/π_ref of the raw summed log-probs.
  rewards = float(setup.config.objective.beta) * (cat["policy_logps"] - cat["ref_logps"])
  drift = (cat["policy_logps"] - cat["ref_logps"]).mean(0)  # [2] chosen, rejected
  out = {"heldout_loss": float(cat["loss"].mean()),
         "reward_acc": float(cat["accuracy"].mean()),
         "heldout_margin": float(margin.mean()), "heldout_margin_std": float(margin.std()),
         "chosen_logp_drift": float(drift[0]), "rejected_logp_drift": float(drift[1]),
         "length_r2": length_r2(rewards.reshape(-1), cat["lengths"].reshape(-1)),
         "num_pairs": int(len(margin))}
  return out, {"loss": cat["loss"], "policy_logps": cat["policy_logps"],
               "ref_logps": cat["ref_logps"], "lengths": cat["lengths"], "rewards": rewards}


def _prepare(config, run_dir: str, out_dir: str) -> _Setup:
  """Builds the mesh, judge, data, reference params and compiled functions, once per `run`."""
  e = config.eval
  _validate(e)
  mesh = sharding.make_mesh(tuple(config.mesh))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  tokenizer = data_lib.get_tokenizer(config.data.tokenizer)
  judge_name, judge = make_judge(config, tokenizer, mesh, out_dir)
  prompts = prompt_set(config.data, run_dir, int(e.num_prompts), tokenizer.pad_id,
                       e.get("reference_source") or None)
  pairs = data_lib.load_pairs(config.data, "eval", workdir=run_dir)
  max_new = generation_budget(config)
  scfg = sampling.SamplingConfig(
      max_new_tokens=max_new, temperature=float(e.temperature), top_k=int(e.top_k),
      top_p=float(e.top_p), eos_id=int(tokenizer.eos_id), pad_id=int(tokenizer.pad_id))
  if not scfg.exact:
    logging.warning("eval: sampling %s is not exact (temperature 1, no top-k/top-p); the KL "
                    "estimates will be biased.", scfg)

  model_cfg = train.model_config(config, tokenizer.vocab_size)
  model = model_lib.CausalLM(model_cfg)
  param_shardings = sharding.param_shardings(model_cfg, mesh)
  ref = train.initial_params(config, model_cfg, mesh, param_shardings)
  ref_dtype = np.dtype(config.objective.get("ref_dtype", "float32"))
  ref = jax.tree.map(lambda p: p.astype(ref_dtype), ref)  # as the trainer's reference

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
  pack = packing_lib.packer(pairs) if packed else (lambda b: b)
  keys = ("tokens", "loss_mask", "attention_mask", "positions", "lengths")
  pair_batches = []
  with sharding.activate(mesh):
    for start, rows_ in zip(range(0, num_pairs, pair_bs), _row_batches(num_pairs, pair_bs)):
      host = pack({k: v for k, v in pairs.batch(rows_).items() if k in keys})
      host["ref_logps"] = np.zeros(host["lengths"].shape, np.float32)
      _, m = eval_fn(ref, None, _to_mesh(host, mesh), hparams)
      host["ref_logps"] = np.asarray(sharding.fetch(m["policy_logps"]), np.float32)
      valid = np.arange(len(rows_)) < num_pairs - start  # padding copies come last
      pair_batches.append((host, valid))
  return _Setup(
      config=config, mesh=mesh, tokenizer=tokenizer,
      sampler=sampling.make_sampler(model, scfg, mesh),
      scorer=jax.jit(functools.partial(sampling.score_both, model)),
      eval_fn=eval_fn, hparams=hparams,
      ref_params=ref, prompts=prompts, rows=rows, batch_size=batch_size,
      pair_batches=pair_batches, judge_name=judge_name, judge=judge, sampling_cfg=scfg)


# --- One checkpoint -------------------------------------------------------------------------------


def evaluate_params(setup: _Setup, params, step: int, spe: float | None = None,
                    is_reference: bool = False) -> tuple[dict, dict, list[dict]]:
  """Evaluates one set of params; returns (summary, arrays for orbax, samples.jsonl rows)."""
  start = time.time()
  config, e = setup.config, setup.config.eval
  samples = _draw(setup, params, stream=0)
  scores = _score(setup, params, samples)
  summary: dict[str, Any] = {"step": int(step), "is_reference": bool(is_reference)}
  rev, rev_est = _kl_stats(scores, samples["lengths"], "kl", reverse=True)
  summary.update(rev)
  arrays: dict[str, Any] = {"policy": {
      "tokens": samples["tokens"], "lengths": samples["lengths"],
      "finished": samples["finished"].astype(np.int32), "prompt_index": setup.rows,
      "policy_logp": scores["policy_logps"].sum(-1), "ref_logp": scores["ref_logps"].sum(-1),
      **{"kl_" + k: v for k, v in rev_est.items()}}}
  # Cached vs uncached decoding must agree (same model, same tokens): a cheap self-check.
  summary["sampler_logp_max_abs_diff"] = float(
      np.abs(samples["logps"] - scores["policy_logps"]).max())
  if e.forward_kl:
    if setup.forward_samples is None:  # π_ref's samples do not change between checkpoints
      setup.forward_samples = _draw(setup, setup.ref_params, stream=1)
    fwd = setup.forward_samples
    fwd_scores = _score(setup, params, fwd)
    fstats, f_est = _kl_stats(fwd_scores, fwd["lengths"], "forward_kl", reverse=False)
    summary.update(fstats)
    arrays["forward"] = {"lengths": fwd["lengths"],
                         "policy_logp": fwd_scores["policy_logps"].sum(-1),
                         "ref_logp": fwd_scores["ref_logps"].sum(-1),
                         **{"kl_" + k: v for k, v in f_est.items()}}
  else:
    summary.update({"forward_kl": None, "forward_kl_stderr": None, "sqrt_forward_kl": None})

  held, per_pair = _heldout(setup, params)
  summary.update(held)
  arrays["heldout"] = {k: per_pair[k] for k in ("loss", "policy_logps", "ref_logps", "lengths",
                                                "rewards")}

  lengths = samples["lengths"]
  summary.update(num_samples=int(len(lengths)), mean_sample_length=float(lengths.mean()),
                 sample_length_std=float(lengths.std()), min_sample_length=int(lengths.min()),
                 max_sample_length=int(lengths.max()),
                 eos_rate=float(samples["finished"].mean()),
                 # Samples cut at max_new_tokens without EOS: their KL is a lower bound.
                 truncation_rate=float(1.0 - samples["finished"].mean()))
  texts = [setup.tokenizer.decode(t[:n - int(f)]) for t, n, f in
           zip(samples["tokens"], lengths, samples["finished"])]
  prompts = [setup.prompts.texts[i] for i in setup.rows]
  refs = [setup.prompts.references[i] for i in setup.rows]
  outcomes, info = None, {}
  if setup.judge is not None:
    judged = ([(list(t[:n - int(f)]), bool(f)) for t, n, f in
               zip(samples["tokens"], lengths, samples["finished"])]
              if setup.judge_name == "gold" else texts)
    outcomes, info = judges.judge_once(setup.judge, prompts, judged, refs)
    wr = judges.win_rate(outcomes)
    summary.update(win_rate=wr["win_rate"], win_rate_ci=[wr["lo"], wr["hi"]],
                   win_rate_lo=wr["lo"], win_rate_hi=wr["hi"], wins=wr["wins"],
                   ties=wr["ties"], losses=wr["losses"])
    arrays["judge"] = {"outcomes": np.asarray(outcomes, np.float64)}
    for k in ("sample_rewards", "reference_rewards"):
      if k in info:
        arrays["judge"][k] = np.asarray(info[k], np.float64)
        summary["mean_" + k[:-1]] = float(np.mean(info[k]))
    summary["judge_stats"] = {k: v for k, v in info.items() if np.isscalar(v)}
  else:
    summary.update(win_rate=None, win_rate_ci=None, win_rate_lo=None, win_rate_hi=None)

  summary.update(
      epoch_fraction=None if spe is None else step / spe, objective=config.objective.name,
      beta=float(config.objective.beta), size=config.get("hf_model") or config.model.size,
      judge=setup.judge_name, reference=setup.prompts.reference,
      sampling={**setup.sampling_cfg.to_dict(), "samples_per_prompt": int(e.samples_per_prompt),
                "num_prompts": len(setup.prompts.texts), "seed": int(e.seed),
                "batch_size": setup.batch_size},
      eval_seconds=time.time() - start)
  arrays["stats"] = {k: np.asarray(v, np.float64) for k, v in summary.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}
  rows = []
  for i, (p, r, t) in enumerate(zip(prompts, refs, texts)):
    rows.append({"prompt_index": int(setup.rows[i]), "prompt": p, "reference": r, "sample": t,
                 "policy_logp": float(arrays["policy"]["policy_logp"][i]),
                 "ref_logp": float(arrays["policy"]["ref_logp"][i]),
                 "kl": float(rev_est["k1"][i]), "length": int(lengths[i]),
                 "finished": bool(samples["finished"][i]),
                 "outcome": None if outcomes is None else float(outcomes[i]),
                 **{k[:-1]: float(info[k][i]) for k in ("sample_rewards", "reference_rewards")
                    if k in info}})
  return summary, arrays, rows


# --- Files ------------------------------------------------------------------------------------


def write_step(out_dir: str, step: int, summary: dict, arrays: dict, rows: list[dict]) -> None:
  """Writes `eval/<step>/{arrays, samples.jsonl, summary.json}`; summary.json last."""
  d = epath.Path(out_dir) / "eval" / str(step)
  ckpt_lib.save_arrays(d / "arrays", arrays)
  if jax.process_index() == 0:
    text = "".join(json.dumps(scaling.jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    (d / "samples.jsonl").write_text(text)
    tmp = d / "summary.json.tmp"
    tmp.write_text(json.dumps(scaling.jsonable(summary), indent=2, sort_keys=True))
    tmp.replace(d / "summary.json")


def load_arrays(eval_step_dir: str) -> dict:
  """The orbax arrays of one `eval/<step>/` directory, as numpy."""
  return ckpt_lib.load_arrays(epath.Path(eval_step_dir) / "arrays")


def _done(out_dir: str, step: int) -> bool:
  return (epath.Path(out_dir) / "eval" / str(step) / "summary.json").exists()


# --- The job ------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
  """A metric that may be missing (None: no judge, no forward KL) as text."""
  return "n/a" if value is None else f"{float(value):.{digits}f}"


def _plan(config, run_dir: str, workdir: str):
  """([(step, is_reference)] to evaluate, steps already evaluated)."""
  exported = ckpt_lib.exported_steps(run_dir)
  wanted = list(config.eval.steps) if config.eval.get("steps") else exported
  missing = sorted(set(wanted) - set(exported) - {0})
  if missing:
    raise ConfigError(f"config.eval.steps: {missing} were not exported by {run_dir} "
                      f"(exported: {exported}).")
  # Step 0 without an export is the reference policy (the run's initial params).
  todo = [(s, s == 0 and 0 not in exported) for s in wanted]
  if config.eval.include_reference:
    todo = [(0, True)] + [t for t in todo if t[0] != 0]
  skipped = [s for s, _ in todo if _done(workdir, s)]
  return [(s, ref) for s, ref in todo if s not in skipped], skipped


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates a run's exported checkpoints not yet evaluated (job 'eval').

  Args:
    config: the eval config (`configs/eval.py`): `run` (default: `workdir`), `mesh`, `eval`,
      `judge`.
    workdir: where `eval/<step>/` goes (usually the run directory itself).

  Returns:
    {'evaluated': [steps], 'skipped': [steps], 'summaries': {step: summary}, 'compiles':
    {'sampler': n, 'scorer': n}, 'message': str}.
  """
  config_lib.validate(config, jax.device_count())
  run_dir = config.get("run") or workdir
  rcfg = load_run_config(run_dir, config)
  # Process 0 reads which steps are exported and done; every process evaluates that list (a
  # run still training may commit an export between two processes' directory listings).
  todo, skipped = sharding.share_from_process_0(
      lambda: _plan(config, run_dir, workdir))
  todo = [(int(s), bool(ref)) for s, ref in todo]
  result = {"evaluated": [], "skipped": skipped, "summaries": {}, "compiles": {}}
  if not todo:
    why = (f"evaluated: {skipped}" if skipped else
           f"{epath.Path(run_dir) / 'params'} has no exports yet")
    result["message"] = f"eval: nothing to do in {workdir} ({why})."
    return result

  setup = _prepare(rcfg, run_dir, workdir)
  spe = steps_per_epoch(run_dir)
  if spe is None and rcfg.get("train"):  # no metrics yet: count the training data
    load = data_lib.load_pairs if rcfg.job == "daa" else data_lib.load_sft
    spe = len(load(rcfg.data, "train", workdir=run_dir)) // int(rcfg.train.batch_size) or None
  model_cfg = train.model_config(rcfg, setup.tokenizer.vocab_size)
  abstract = ckpt_lib.abstract_with_shardings(
      model_lib.abstract_params(model_cfg), sharding.param_shardings(model_cfg, setup.mesh))
  # One bar over the checkpoints (process 0): the console's only per-step output.
  bar = metrics_lib.Progress(len(todo), 0, jax.process_index() == 0,
                             desc=f"eval {epath.Path(run_dir).name}")
  for step, is_ref in todo:
    params = setup.ref_params if is_ref else ckpt_lib.load_params(f"{run_dir}@{step}",
                                                                  abstract)[0]
    summary, arrays, rows = evaluate_params(setup, params, step, spe, is_reference=is_ref)
    write_step(workdir, step, summary, arrays, rows)
    logging.info("eval step %d: kl %.4f ± %.4f, forward kl %s, win rate %s, reward acc %.3f, "
                 "%.1fs", step, summary["kl"], summary["kl_stderr"],
                 _fmt(summary["forward_kl"]), _fmt(summary["win_rate"], 3),
                 summary["reward_acc"], summary["eval_seconds"])
    result["evaluated"].append(step)
    result["summaries"][step] = summary
    bar.update(1, {})
  bar.close()
  # pylint: disable-next=protected-access
  result["compiles"] = {"sampler": setup.sampler.jitted._cache_size(),
                        "scorer": setup.scorer._cache_size()}  # pylint: disable=protected-access
  result["message"] = (f"eval: wrote {len(result['evaluated'])} step(s) "
                       f"{result['evaluated']} under {epath.Path(workdir) / 'eval'}.")
  return result
