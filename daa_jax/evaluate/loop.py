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

import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.data import pipeline as data_pipeline
from daa_jax.evaluate import judges
from daa_jax.train import metrics as metrics_lib
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.errors import ConfigError
from daa_jax.train import init as init_lib
from daa_jax.train import heldout as heldout_lib
from daa_jax.train import fit as fit_lib
from daa_jax.evaluate import kl as kl_lib
from daa_jax.evaluate import store as store_lib
from daa_jax.evaluate import setup as setup_lib
from daa_jax.evaluate import run_table

SUMMARY_KEYS = ("step", "kl", "kl_stderr", "sqrt_kl", "forward_kl", "forward_kl_stderr",
                "win_rate", "win_rate_ci", "reward_acc", "heldout_abs_margin",
                "heldout_abs_logratio_margin", "heldout_margin_tiny", "heldout_loss", "length_r2",
                "chosen_logp_drift", "rejected_logp_drift", "num_samples", "mean_sample_length",
                "truncation_rate", "epoch_fraction", "sampling", "judge", "reference")


# --- Estimators (numpy, float64) -------------------------------------------------------------


# --- Inputs ------------------------------------------------------------------------------------


# --- Batched sampling and scoring on the mesh ----------------------------------------------------


def _fetch(tree):
  return sharding.global_to_host(tree)


def _draw(setup: setup_lib.Setup, params, stream: int) -> dict[str, np.ndarray]:
  """Samples for every row: tokens [N,T], lengths, finished, sampler logps [N,T]."""
  key = jax.random.fold_in(jax.random.key(int(setup.config.eval.seed)), stream)
  out = []
  for b, rows in enumerate(setup_lib.row_batches(len(setup.rows), setup.batch_size)):
    p = setup.rows[rows]
    batch = setup_lib.to_mesh({"t": setup.prompts.tokens[p], "m": setup.prompts.mask[p]}, setup.mesh)
    out.append(sharding.fetch(setup.sampler(params, batch["t"], batch["m"], jax.random.fold_in(key, b))))
  return {k: np.concatenate([o[k] for o in out])[:len(setup.rows)] for k in out[0]}


def _score(setup: setup_lib.Setup, params, samples: dict) -> dict[str, np.ndarray]:
  """`sampling.score_both` over every row: policy/ref log-probs and exact step KLs [N,T]."""
  out = []
  with sharding.activate(setup.mesh):
    for rows in setup_lib.row_batches(len(setup.rows), setup.batch_size):
      p = setup.rows[rows]
      batch = setup_lib.to_mesh({"t": setup.prompts.tokens[p], "m": setup.prompts.mask[p],
                        "y": samples["tokens"][rows], "n": samples["lengths"][rows]}, setup.mesh)
      out.append(sharding.fetch(setup.scorer(params, setup.ref_params, batch["t"], batch["m"],
                                     batch["y"], batch["n"])))
  return {k: np.concatenate([o[k] for o in out])[:len(setup.rows)] for k in out[0]}


def _heldout(setup: setup_lib.Setup, params) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Held-out loss, reward accuracy, margins, likelihood drift and the length R²."""
  keys = ("loss", "rewards_chosen", "rewards_rejected", "accuracy", "policy_logps", "ref_logps")
  with sharding.activate(setup.mesh):
    cat = heldout_lib.heldout_per_pair(setup.eval_fn, params, None, setup.hparams, setup.pair_batches,
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
  # The accuracy is the sign of the margins: beside it, their scale. Below fit.MOVED_LOGRATIO
  # nats of log-ratio margin h = margin / β the policy has barely left the reference and the
  # accuracy counts signs of roundoff-sized numbers, so it is flagged.
  abs_margin = float(np.abs(margin).mean())
  abs_logratio = abs_margin / float(setup.config.objective.beta)
  out = {"heldout_loss": float(cat["loss"].mean()),
         "reward_acc": float(cat["accuracy"].mean()),
         "heldout_margin": float(margin.mean()), "heldout_margin_std": float(margin.std()),
         "heldout_abs_margin": abs_margin, "heldout_abs_logratio_margin": abs_logratio,
         "heldout_margin_tiny": bool(abs_logratio < fit_lib.MOVED_LOGRATIO),
         "chosen_logp_drift": float(drift[0]), "rejected_logp_drift": float(drift[1]),
         "length_r2": kl_lib.length_r2(rewards.reshape(-1), cat["lengths"].reshape(-1)),
         "num_pairs": int(len(margin))}
  return out, {"loss": cat["loss"], "policy_logps": cat["policy_logps"],
               "ref_logps": cat["ref_logps"], "lengths": cat["lengths"], "rewards": rewards}


# --- One checkpoint -------------------------------------------------------------------------------


def evaluate_params(setup: setup_lib.Setup, params, step: int, spe: float | None = None,
                    is_reference: bool = False) -> tuple[dict, dict, list[dict]]:
  """Evaluates one set of params; returns (summary, arrays for orbax, samples.jsonl rows)."""
  start = time.time()
  config, e = setup.config, setup.config.eval
  samples = _draw(setup, params, stream=0)
  scores = _score(setup, params, samples)
  summary: dict[str, Any] = {"step": int(step), "is_reference": bool(is_reference)}
  rev, rev_est = kl_lib.kl_stats(scores, samples["lengths"], "kl", reverse=True)
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
    fstats, f_est = kl_lib.kl_stats(fwd_scores, fwd["lengths"], "forward_kl", reverse=False)
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
    # Samples of one prompt are not independent comparisons: the interval's units are prompts.
    wr = judges.win_rate(outcomes, groups=setup.rows)
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


# --- The job ------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
  """A metric that may be missing (None: no judge, no forward KL) as text."""
  return "n/a" if value is None else f"{float(value):.{digits}f}"


def _write_table(workdir: str, result: dict) -> None:
  """`eval/checkpoints.{csv,md,png}` over every evaluated step (process 0, local workdirs)."""
  if jax.process_index() != 0 or "://" in str(workdir):
    return
  result["tables"] = run_table.write(str(workdir))
  if result["tables"]:
    result["message"] += (f"\n  table:   {result['tables']['md']} (and .csv)"
                          f"\n  plot:    {result['tables']['png']}")


def heldout_text(summary: dict) -> str:
  """Held-out accuracy with its margin scale, marked when the margins are too small to mean much."""
  text = (f"held-out acc {summary['reward_acc']:.3f} (mean |margin| "
          f"{summary['heldout_abs_margin']:.2g}, /β {summary['heldout_abs_logratio_margin']:.2g} "
          "nats")
  return text + (", tiny: the accuracy means little)" if summary["heldout_margin_tiny"] else ")")


def tiny_margin_warning(summaries: dict) -> str:
  """One line naming the trained checkpoints whose held-out margins are tiny ('' if none)."""
  steps = sorted(s for s, v in summaries.items()
                 if v.get("heldout_margin_tiny") and not v.get("is_reference"))
  if not steps:
    return ""
  return (f"warning: at step(s) {steps} the mean held-out |log-ratio margin| is below "
          f"{fit_lib.MOVED_LOGRATIO} nats (heldout_margin_tiny in summary.json): the policy "
          "barely left the reference and those held-out accuracies are signs of near-zero "
          "margins; train longer, raise config.optim.lr, or give more data.")


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
  skipped = [s for s, _ in todo if store_lib.done(workdir, s)]
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
  rcfg = setup_lib.load_run_config(run_dir, config)
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
    _write_table(workdir, result)
    return result

  setup = setup_lib.prepare(rcfg, run_dir, workdir)
  spe = setup_lib.steps_per_epoch(run_dir)
  if spe is None and rcfg.get("train"):  # no metrics yet: count the training data
    load = data_pipeline.load_pairs if rcfg.job == "daa" else data_pipeline.load_sft
    spe = len(load(rcfg.data, "train", workdir=run_dir)) // int(rcfg.train.batch_size) or None
  model_cfg = init_lib.model_config(rcfg, setup.tokenizer.vocab_size)
  abstract = ckpt_lib.abstract_with_shardings(
      model_lib.abstract_params(model_cfg), sharding.param_shardings(model_cfg, setup.mesh))
  # One bar over the checkpoints (process 0): the console's only per-step output.
  bar = metrics_lib.Progress(len(todo), 0, jax.process_index() == 0,
                             desc=f"eval {epath.Path(run_dir).name}")
  for step, is_ref in todo:
    params = setup.ref_params if is_ref else init_lib.run_params(  # LoRA: merged
        f"{run_dir}@{step}", abstract, model_cfg, setup.mesh)
    summary, arrays, rows = evaluate_params(setup, params, step, spe, is_reference=is_ref)
    store_lib.write_step(workdir, step, summary, arrays, rows)
    logging.info("eval step %d: kl %.4f ± %.4f, forward kl %s, win rate %s, %s, %.1fs", step,
                 summary["kl"], summary["kl_stderr"], _fmt(summary["forward_kl"]),
                 _fmt(summary["win_rate"], 3), heldout_text(summary), summary["eval_seconds"])
    result["evaluated"].append(step)
    result["summaries"][step] = summary
    bar.update(1, {})
  bar.close()
  # pylint: disable-next=protected-access
  result["compiles"] = {"sampler": setup.sampler.jitted._cache_size(),
                        "scorer": setup.scorer._cache_size()}  # pylint: disable=protected-access
  result["message"] = (f"eval: wrote {len(result['evaluated'])} step(s) "
                       f"{result['evaluated']} under {epath.Path(workdir) / 'eval'}.")
  _write_table(workdir, result)
  tiny = tiny_margin_warning(result["summaries"])
  if tiny:
    logging.warning("%s", tiny)
    result["message"] += "\n  " + tiny
  return result
