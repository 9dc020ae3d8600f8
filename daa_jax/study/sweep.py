"""A study: objective × size × β runs from one config, evaluated, fitted and plotted.

  sweep directory/
    sft_<size>/                   the SFT reference of each size (or none: HF weights)
    pairs_<size>/                 preference pairs sampled from that SFT policy (synthetic)
    <objective>_<size>_b<β>[_s<seed>]/  one DAA run each (a run workdir, with eval/<step>/);
                                  the _s<seed> suffix when config.seeds has several seeds
    summary.csv                   one row per evaluated checkpoint (seed-level intervals
                                  when several seeds)
    prompt_outcomes.json          each checkpoint's judge outcome per prompt (paired tests)
    fits.json, checks.json, figures/, report.md

`run(config, workdir)` runs everything locally, one run after another: finished runs are
skipped, interrupted ones resume from their checkpoints, evaluated checkpoints are not
evaluated twice. With `config.mode = 'commands'` it writes `commands.sh` instead, one
`python -m daa_jax.main` line per run, for a cluster scheduler.

Runs of one size and objective share one compiled train step (`train._STEP_CACHE`): β is a
runtime argument.

As a multi-process job (one process per host) every process runs the training, sampling and
evaluation collectives; process 0 alone reads the DONE/TRAINED markers and writes every file
of the sweep, and the others continue with its decisions once its files are written
(`sharding.share_from_process_0`). The result equals the 1-process run's.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from daa_jax.study import commands as commands_lib
from daa_jax.study import fits as scaling
from daa_jax.data import pipeline as data_pipeline
from daa_jax.data import synthetic as synthetic_lib
from daa_jax.data import tokenize as tokenize_lib
from daa_jax.train import init as init_lib
from daa_jax.study import outputs as outputs_lib
from daa_jax.study import pairs as pairs_lib

SUMMARY_COLUMNS = ("objective", "size", "beta", "step", "epoch_fraction", "kl", "kl_stderr",
                   "sqrt_kl", "forward_kl", "win_rate", "win_rate_lo", "win_rate_hi",
                   "reward_acc", "heldout_abs_logratio_margin", "heldout_loss", "length_r2",
                   "chosen_logp_drift",
                   "rejected_logp_drift", "mean_sample_length", "truncation_rate",
                   "reference", "run",
                   "seed", "num_seeds", "seed_win_rate_lo", "seed_win_rate_hi", "seed_kl_lo",
                   "seed_kl_hi")


def _beta_tag(beta: float) -> str:
  return f"{beta:g}".replace(".", "p")


def run_name(objective: str, size: str, beta: float) -> str:
  return f"{objective}_{size}_b{_beta_tag(beta)}"


def _done_marker(run_dir: str) -> str:
  return os.path.join(run_dir, "TRAINED")


def _unlocked_copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  c.unlock()
  return c


# --- expansion -----------------------------------------------------------------------------

def sft_config(config, size: str) -> ml_collections.ConfigDict:
  c = _unlocked_copy(config.sft)
  c.model.size = size
  if config.get("hf_model_template"):
    c.hf_model = config.hf_model_template.format(size=size)
  return c


def daa_config(config, size: str, objective: str, beta: float, workdir: str, seed=None):
  c = _unlocked_copy(config.daa)
  if seed is not None:
    c.seed = int(seed)  # the data order of the DAA run (it starts from the SFT weights)
  c.model.size = size
  # A variant (config.variants[label]) is a labelled objective with its own fields, e.g.
  # tr_dpo = {name: dpo, ref_update: soft, ...}: its runs are grouped, fitted and named by
  # the label.
  variant = dict((config.get("variants") or {}).get(objective) or {})
  c.objective.name = variant.pop("name", objective)
  if c.objective.name == "simpo":
    c.objective.normalize = "mean"  # SimPO's reward is per token (config validation requires it)
  c.objective.update(variant)
  c.objective.beta = float(beta)
  if config.sft_source == "train":
    c.init_from = os.path.join(workdir, f"sft_{size}")
  elif config.get("hf_model_template"):
    c.hf_model = config.hf_model_template.format(size=size)
  if config.pairs == "policy_samples":
    c.data.synthetic.pairs_dir = os.path.join(workdir, f"pairs_{size}")
  if c.get("guard") is not None and c.guard.enabled:
    # The guard's points are the sweep's evaluations: the same settings and judge, written
    # to eval/<step>/, so the evaluation after training skips the steps the guard measured.
    c.guard.eval = _unlocked_copy(config.eval)
    c.guard.judge = _unlocked_copy(config.judge)
    c.guard.eval.include_reference = False  # run(): True for a size's first DAA run
  return c


def expand(config, workdir: str) -> list[dict[str, Any]]:
  """The runs of a sweep, in execution order: per size the SFT run, then its DAA runs."""
  runs = []
  for size in config.sizes:
    if config.sft_source == "train":
      runs.append(dict(kind="sft", size=size, name=f"sft_{size}",
                       dir=os.path.join(workdir, f"sft_{size}"),
                       config=sft_config(config, size)))
    seeds = tuple(config.get("seeds") or ()) or (None,)
    grids = config.get("grids") or {}
    for objective in config.objectives:
      # Each objective's own grid of strengths (config.grids[objective]), else config.betas.
      for beta in grids.get(objective) or config.betas:
        for seed in seeds:
          name = run_name(objective, size, beta) + (f"_s{seed}" if len(seeds) > 1 else "")
          runs.append(dict(kind="daa", size=size, objective=objective, beta=float(beta),
                           seed=seed, name=name, dir=os.path.join(workdir, name),
                           config=daa_config(config, size, objective, beta, workdir, seed)))
  return runs


def eval_config(config, run_dir: str, include_reference: bool = False):
  c = ml_collections.ConfigDict(dict(job="eval", run=run_dir, mesh=None))
  c.eval = _unlocked_copy(config.eval)
  c.eval.include_reference = include_reference
  c.judge = _unlocked_copy(config.judge)
  return c


# --- preference pairs from the SFT policy (the synthetic task) -----------------------------

def policy_pairs(config, size: str, workdir: str) -> str:
  """Samples two responses per prompt from the SFT policy and labels them with the synthetic
  task's Bradley–Terry labeler, on their sampled ids (`pairs.write_pairs`). Writes
  `pairs.jsonl` and `eval_pairs.jsonl`.

  Pairs where either sample has no EOS within the budget are dropped: the data pipeline
  appends EOS to every response, which would misrepresent them. A sample that is EOS alone is
  kept (an empty response is a legitimate sample and row; the data statistics count them).
  """
  # Imports here keep `python -m daa_jax.scaling`-style uses of this module jax-free.
  import jax  # pylint: disable=g-import-not-at-top
  from daa_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from daa_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  from daa_jax.evaluate import sampling  # pylint: disable=g-import-not-at-top

  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(workdir, f"pairs_{size}")
  if _exists(os.path.join(out_dir, "DONE")):
    return out_dir
  sft_dir = os.path.join(workdir, f"sft_{size}")
  c = daa_config(config, size, config.objectives[0], config.betas[0], workdir)
  task = synthetic_lib.SyntheticTask(c.data.synthetic)
  tokenizer = tokenize_lib.get_tokenizer(c.data.tokenizer)
  model_cfg = init_lib.model_config(c, tokenizer.vocab_size)
  mesh = init_lib.run_mesh(c)
  abstract = ckpt_lib.abstract_with_shardings(
      jax.eval_shape(lambda: model_lib.init_params(model_cfg, jax.random.key(0))),
      sharding.param_shardings(model_cfg, mesh))
  params, _ = ckpt_lib.load_params(sft_dir, abstract)
  model = model_lib.CausalLM(model_cfg)
  pp = config.policy_pairs
  sampler = sampling.make_sampler(model, sampling.SamplingConfig(
      max_new_tokens=int(c.data.synthetic.max_response_length) + 1, temperature=1.0,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id), mesh)

  eval_prompts = data_pipeline.load_sft(c.data, "eval", workdir=sft_dir).prompt_texts
  held_out = set(eval_prompts)
  train_prompts = [p for p in task.sample_prompts(2 * pp.num_pairs + 64, [pp.seed, 7])
                   if p not in held_out]

  def sample_twice(prompts, stream):
    encoded = tokenizer.encode_prompt_batch(prompts)  # with BOS where the tokenizer has one
    width = max(len(e) for e in encoded)
    batch = int(pp.batch_size)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = max(dp, batch // dp * dp)
    texts, eos, ids_out = [[], []], [[], []], [[], []]
    for start in range(0, len(prompts), batch):
      rows = encoded[start:start + batch]
      n = len(rows)
      tokens = np.full((batch, width), tokenizer.pad_id, np.int32)
      mask = np.zeros((batch, width), np.int32)
      for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r  # left padding
        mask[i, width - len(r):] = 1
      # Every process holds the whole batch and gets the whole samples back (the mesh may
      # span processes: each device takes its rows, and the outputs are all-gathered).
      glob = sharding.host_to_global({"t": tokens, "m": mask}, mesh, whole=True)
      for k in range(2):
        rng = jax.random.fold_in(jax.random.key(pp.seed), stream * 1_000_003 + start * 2 + k)
        out = sharding.global_to_host(sampler(params, glob["t"], glob["m"], rng))
        for i in range(n):
          length = int(out["lengths"][i])
          ids = [int(x) for x in out["tokens"][i, :length]]
          finished = bool(out["finished"][i])
          if finished:
            ids = ids[:-1]
          texts[k].append(tokenizer.decode(ids))
          ids_out[k].append(ids)  # the labeler scores these, not their decoded text
          eos[k].append(finished)
    return texts, eos, ids_out

  def write(name, prompts, samples, stream, limit):
    return pairs_lib.write_pairs(task, os.path.join(out_dir, f"{name}.jsonl"), prompts,
                                 *samples, seed=[pp.seed, stream], limit=limit)

  def write_all():
    os.makedirs(out_dir, exist_ok=True)
    stats = {"train": write("pairs", train_prompts, train_samples, 1, int(pp.num_pairs)),
             "eval": write("eval_pairs", eval_prompts, eval_samples, 2,
                           int(pp.num_eval_pairs))}
    with open(os.path.join(out_dir, "stats.json"), "w", encoding="utf-8") as f:
      json.dump(stats, f, indent=2)
    open(os.path.join(out_dir, "DONE"), "w").close()
    logging.info("policy pairs for %s: %s", size, stats)

  # Sampling is collective (every process); labeling and writing happen on process 0 alone,
  # and the others continue once its files are written (or raise its error).
  train_samples = sample_twice(train_prompts, 1)
  eval_samples = sample_twice(eval_prompts, 2)
  sharding.share_from_process_0(write_all)
  return out_dir


def _exists(path: str) -> bool:
  """Whether `path` exists, as process 0 sees it (every process takes the same branch)."""
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  return bool(sharding.share_from_process_0(lambda: os.path.exists(path)))


# --- collection --------------------------------------------------------------------------

def _prompt_outcomes(step_dir: str) -> list[float] | None:
  """Mean judge outcome per prompt (indexed by prompt) of one `eval/<step>/samples.jsonl`."""
  path = os.path.join(step_dir, "samples.jsonl")
  if not os.path.exists(path):
    return None
  sums: dict[int, list] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      s = json.loads(line)
      if s.get("outcome") is None:
        return None
      sums.setdefault(int(s["prompt_index"]), []).append(float(s["outcome"]))
  return [float(np.mean(sums[i])) for i in sorted(sums)]


def _seed_intervals(rows: list[dict]) -> None:
  """Across the seeds of one (objective, size, β, step): num_seeds and 95% t-intervals of the
  seeds' mean win rate and KL (blank with one seed)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  cells: dict[tuple, list] = {}
  for row in rows:
    cells.setdefault((row["objective"], row["size"], row["beta"], row["step"]), []).append(row)
  for cell in cells.values():
    for row in cell:
      row["num_seeds"] = len(cell)
    if len(cell) < 2:
      continue
    t = float(stats.t.ppf(0.975, len(cell) - 1))
    for col in ("win_rate", "kl"):
      values = np.array([r[col] for r in cell if r.get(col) is not None], np.float64)
      if len(values) < 2:
        continue
      half = t * values.std(ddof=1) / math.sqrt(len(values))
      for row in cell:
        row[f"seed_{col}_lo"], row[f"seed_{col}_hi"] = (values.mean() - half,
                                                        values.mean() + half)


def collect(runs: list[dict], workdir: str) -> list[dict]:
  """Rows of summary.csv from every run's `eval/<step>/summary.json`; writes summary.csv and
  prompt_outcomes.json (`scaling.outcome_key` → per-prompt outcomes)."""
  rows, outcomes = [], {}
  for r in runs:
    eval_dir = os.path.join(r["dir"], "eval")
    if not os.path.isdir(eval_dir):
      continue
    for name in sorted(os.listdir(eval_dir), key=lambda s: (len(s), s)):
      path = os.path.join(eval_dir, name, "summary.json")
      if not os.path.exists(path):
        continue
      with open(path, encoding="utf-8") as f:
        s = json.load(f)
      lo, hi = (s.get("win_rate_ci") or [None, None])[:2]
      step = int(s["step"])
      row = dict(objective=r.get("objective", "sft"), size=r["size"], beta=r.get("beta", 0.0),
                 step=step, epoch_fraction=s.get("epoch_fraction"), kl=s.get("kl"),
                 kl_stderr=s.get("kl_stderr"), sqrt_kl=s.get("sqrt_kl"),
                 forward_kl=s.get("forward_kl"), win_rate=s.get("win_rate"),
                 win_rate_lo=lo, win_rate_hi=hi, reward_acc=s.get("reward_acc"),
                 heldout_abs_logratio_margin=s.get("heldout_abs_logratio_margin"),
                 heldout_loss=s.get("heldout_loss"), length_r2=s.get("length_r2"),
                 chosen_logp_drift=s.get("chosen_logp_drift"),
                 rejected_logp_drift=s.get("rejected_logp_drift"),
                 mean_sample_length=s.get("mean_sample_length"),
                 truncation_rate=s.get("truncation_rate"),
                 reference=(s.get("reference") or {}).get("kind"), run=r["name"],
                 seed=r.get("seed"))
      if step == 0:  # the reference policy itself (KL 0), once per size
        if any(x["objective"] == "sft" and x["size"] == r["size"] for x in rows):
          continue
        row.update(objective="sft", beta=0.0, run=f"sft_{r['size']}", seed=None)
      per_prompt = _prompt_outcomes(os.path.join(eval_dir, name))
      if per_prompt is not None:
        outcomes[scaling.outcome_key(row)] = per_prompt
      rows.append(row)
  _seed_intervals(rows)
  path = os.path.join(workdir, "summary.csv")
  write_summary(rows, path)
  with open(os.path.join(workdir, "prompt_outcomes.json"), "w", encoding="utf-8") as f:
    json.dump(outcomes, f)
  return scaling.load_summary(path)


def write_summary(rows: list[dict], path: str) -> None:
  """`summary.csv`: one row per evaluated checkpoint (SUMMARY_COLUMNS; blanks for missing)."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS})


# --- the driver --------------------------------------------------------------------------

write_commands = commands_lib.write_commands  # study/commands.py (mode 'commands')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or writes the commands of) a whole study; returns a summary with `message`."""
  from daa_jax.evaluate import loop as evaluate  # pylint: disable=g-import-not-at-top
  from daa_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  runs = expand(config, workdir)
  for r in runs:  # every run's config is checked before the first one starts
    config_lib.validate(r["config"])
  if config.mode == "commands":
    path = write_commands(config, workdir, runs)
    return {"message": f"wrote {len(runs)} runs to {path}", "commands": path}
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  # Multi-process (a pod: one process per host), every process runs every collective step
  # (training, sampling, evaluation); process 0 alone writes the sweep's files, and the
  # others continue once they are written.
  sharding.share_from_process_0(lambda: _write_config(config, workdir))
  from daa_jax.study import guard  # pylint: disable=g-import-not-at-top
  for i, r in enumerate(runs):
    logging.info("sweep: run %d/%d %s", i + 1, len(runs), r["name"])
    if r["kind"] == "daa" and config.pairs == "policy_samples":
      policy_pairs(config, r["size"], workdir)
    # The first DAA run of a size also evaluates its reference (the SFT policy, KL 0) as
    # step 0: the intercept R0 of the fits.
    first = r["kind"] == "daa" and r is next(
        x for x in runs if x["kind"] == "daa" and x["size"] == r["size"])
    guarded = r["kind"] == "daa" and r["config"].get("guard") is not None and (
        r["config"].guard.enabled)
    if not _exists(_done_marker(r["dir"])):
      if guarded:
        r["config"].guard.eval.include_reference = first
      summary = (guard.run if guarded else train.run)(r["config"], r["dir"])
      if summary.get("status") not in ("finished", "stopped"):
        return {"message": f"sweep stopped in {r['dir']} ({summary.get('status')}); rerun the "
                           "same command to resume.", "status": summary.get("status")}
      sharding.share_from_process_0(lambda: _write_marker(r["dir"], summary.get("step")))
    if r["kind"] == "daa":
      evaluate.run(eval_config(config, r["dir"], include_reference=first), r["dir"])
  return sharding.share_from_process_0(lambda: _report(config, runs, workdir))


def _write_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sweep_config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _write_marker(run_dir: str, step) -> None:
  with open(_done_marker(run_dir), "w", encoding="utf-8") as f:
    f.write(json.dumps({"step": step}))


def _report(config, runs: list[dict], workdir: str) -> dict:
  """summary.csv, fits.json, figures, checks.json and report.md; the job's summary."""
  rows = collect(runs, workdir)
  outcomes = scaling.load_prompt_outcomes(os.path.join(workdir, "prompt_outcomes.json"))
  # The refit command (`python -m daa_jax.scaling`) goes through the same function with the
  # same settings, read back from sweep_config.json: a refit reproduces these files.
  written = outputs_lib.write_all(rows, outcomes, workdir, outputs_lib.settings(config),
                                  warn=lambda line: logging.warning("%s", line))
  results, report = written["checks"], written["report"]
  table = os.path.exists(os.path.join(workdir, "guard.md"))
  # Counted as report.md counts them: DAA runs and their checkpoints; the SFT runs and their
  # step-0 reference rows (the fits' R0) on the side.
  daa_runs = sum(r["kind"] == "daa" for r in runs)
  sft_rows = sum(r.get("objective") == "sft" for r in rows)
  sft_runs = len(runs) - daa_runs
  message = (f"daa_jax: {daa_runs} DAA runs, {len(rows) - sft_rows} checkpoints evaluated "
             f"(+ {sft_runs} SFT run{'s' * (sft_runs != 1)}, {sft_rows} reference "
             f"point{'s' * (sft_rows != 1)} at KL 0).\n"
             f"  report:  {report}\n  figures: {os.path.join(workdir, 'figures')}\n"
             f"  table:   {os.path.join(workdir, 'summary.csv')}"
             + (f"\n  guard:   {os.path.join(workdir, 'guard.md')}" if table else ""))
  return {"message": message, "rows": len(rows), "checks": results, "report": report}
