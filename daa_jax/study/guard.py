"""The over-optimization guard: the paper's law measured while a DAA run trains, and acted on.

The paper's lesson: a DAA run passes its best point and keeps going — the win rate rises,
peaks at some √KL d*, then falls while the loss still improves. The guard (`config.guard`,
fields in `daa_jax/train/guard_config.py`) watches for it during training:

  * a point at step 0 (the reference: KL 0, the fits' R0), every `guard.every` steps and at
    every schedule checkpoint: `evaluate.loop.evaluate_params`, the evaluation's own code and
    compiled sampler (one compile per run), on the fixed held-out prompts of `guard.eval`:
    sampled KL to the reference (k1 and k3, ± stderr), the `guard.judge` win rate against the
    reference responses (prompts as clusters in its interval), held-out preference accuracy;
  * from 4 distinct KL points on, the paper's law R(d) = R0 + d(α − β log d) fitted to the
    run's own points (weighted, `study.fits.fit_group`) with the prompt bootstrap of
    `study.intervals.bootstrap_group` (R0 resampled with the rest): predicted d* and peak;
  * `guard.stop`: none | kl_budget (√KL > kl_budget) | peak (√KL past the upper bound of d*'s
    interval and the win rate below the best point's by a one-sided paired test on the same
    prompts at `guard.alpha`). One decision, taken on process 0 and shared: every process
    stops at the same step, which is saved with a params export.

Whatever the rule, the best point so far (highest win rate) is kept as a params export in
`<workdir>/best/params` (`config.init_from=RUN_DIR@best` reads it; `best/best.json` says which
step), and `<workdir>/guard.json` holds every point, the fit, the rule, why the run stopped
and which step was kept. Each point also goes to metrics.jsonl / TensorBoard (`guard/*`), one
console line, and, with `guard.write_eval`, the evaluation's own `eval/<step>/` files (a later
`daa-jax eval` with the same settings skips those steps; the sweep uses them). The history is
part of every checkpoint's metadata, so a resumed run resumes it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from daa_jax.evaluate import loop as eval_loop
from daa_jax.evaluate import setup as setup_lib
from daa_jax.evaluate import store as store_lib
from daa_jax.models import sharding
from daa_jax.study import fits as fits_lib
from daa_jax.study import intervals
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import loop as train_loop
from daa_jax.train import metrics as metrics_lib

Z95 = 1.959964


def run(config, workdir: str, explicit=None) -> dict:
  """`train.loop.run` with the guard watching (what `python -m daa_jax.main` calls)."""
  return train_loop.run(config, workdir, explicit, monitor_factory=Guard)


def sqrt_kl_interval(kl: float, stderr: float) -> list[float]:
  """95% interval of √KL from the KL's mean and standard error (clipped at 0)."""
  return [math.sqrt(max(kl - Z95 * stderr, 0.0)), math.sqrt(max(kl + Z95 * stderr, 0.0))]


def per_prompt(outcomes: np.ndarray, rows: np.ndarray, num_prompts: int) -> np.ndarray:
  """[P] mean outcome of each prompt's samples (the unit of the paired tests and bootstrap)."""
  total = np.bincount(rows, weights=np.asarray(outcomes, np.float64), minlength=num_prompts)
  count = np.bincount(rows, minlength=num_prompts)
  return total / np.maximum(count, 1)


def running_fit(points: list[dict], num_bootstrap: int, seed: int = 0) -> dict:
  """The log-form law fitted to a run's own points (step 0 gives R0), with bootstrap intervals.

  Returns {'status': 'fitted', 'alpha', 'beta', 'd_star' (None past the sampled range),
  'd_star_status', 'peak_win_rate', '*_ci', 'n'} or {'status': 'not identifiable' | 'no
  reference point' | 'no win rate', 'reason'}: an estimate that cannot be made is never a number.
  """
  ref = [p for p in points if p["step"] == 0]
  trained = [p for p in points if p["step"] > 0 and p.get("win_rate") is not None]
  if not ref or ref[0].get("win_rate") is None:
    return {"status": "no reference point", "reason": "step 0 (the reference) has no win rate"}
  if not trained:
    return {"status": "no win rate", "reason": "no trained point yet"}
  d = np.array([p["sqrt_kl"] for p in trained])
  y = np.array([p["win_rate"] for p in trained])
  r0 = float(ref[0]["win_rate"])
  rows = [{"win_rate_lo": p["win_rate_ci"][0], "win_rate_hi": p["win_rate_ci"][1]}
          for p in trained]
  weights = fits_lib.point_weights(rows)
  fit = fits_lib.fit_group(d, y, r0=r0, weights=weights)
  if fit.get("skipped"):
    return {"status": "not identifiable", "reason": fit["skipped"], "n": len(d) + 1}
  log = fit["log"]
  outcomes = np.stack([p["outcomes"] for p in trained])
  boot = intervals.bootstrap_group(d, y, r0, weights, outcomes=outcomes,
                                   r0_outcomes=np.asarray(ref[0]["outcomes"]),
                                   num_samples=num_bootstrap, seed=seed)["log"]
  return {"status": "fitted", "form": "log", "n": len(d) + 1, "r0": r0,
          "alpha": log["coef"]["alpha"], "beta": log["coef"]["beta"],
          "d_star": log["d_star"], "d_star_status": log["d_star_status"],
          "d_star_lower_bound": log.get("d_star_lower_bound"),
          "peak_win_rate": log["peak_win_rate"], "rmse": log["rmse"],
          "alpha_ci": boot["alpha_ci"], "beta_ci": boot["beta_ci"],
          "d_star_ci": boot["d_star_ci"], "peak_win_rate_ci": boot["peak_win_rate_ci"]}


def decide(rule: str, points: list[dict], fit: dict, best: int, kl_budget: float,
           alpha: float) -> tuple[bool, str, dict | None]:
  """(stop, why, the paired test or None) for the newest point, `points[-1]`."""
  p = points[-1]
  if rule == "kl_budget":
    if p["sqrt_kl"] > kl_budget:
      return True, (f"sqrt(KL) {p['sqrt_kl']:.3f} at step {p['step']} exceeds the budget "
                    f"{kl_budget:g}"), None
    return False, "", None
  if rule != "peak" or best == len(points) - 1 or p.get("win_rate") is None:
    return False, "", None
  test = intervals._paired(  # pylint: disable=protected-access
      np.asarray(points[best]["outcomes"]) - np.asarray(p["outcomes"]))
  test["against_step"] = points[best]["step"]
  hi = (fit.get("d_star_ci") or [None, None])[1] if fit.get("status") == "fitted" else None
  if fit.get("d_star") is None or hi is None:
    return False, "", test
  if p["sqrt_kl"] > hi and test["p_value"] < alpha:
    return True, (f"sqrt(KL) {p['sqrt_kl']:.3f} at step {p['step']} is past the predicted "
                  f"d*'s upper bound {hi:.3f} and the win rate {p['win_rate']:.3f} is below "
                  f"the best point's (step {points[best]['step']}, "
                  f"{points[best]['win_rate']:.3f}; paired p = {test['p_value']:.2g} < "
                  f"{alpha:g})"), test
  return False, "", test


def replay(points: list[dict], rule: str, kl_budget: float = 0.0, alpha: float = 0.05,
           num_bootstrap: int = 300, patience: int = 1) -> dict:
  """The rule's decisions over recorded points (guard.json's, in step order), as the guard
  takes them while training: {'stop_step' (None: no stop), 'kept_step', 'reason'}."""
  seen: list[dict] = []
  best, streak = None, 0
  for p in points:
    seen.append(p)
    if p.get("win_rate") is not None and (best is None or p["win_rate"] > seen[best]["win_rate"]):
      best = len(seen) - 1
    elif best is None:
      best = 0
    stop, why, _ = decide(rule, seen, running_fit(seen, num_bootstrap), best, kl_budget, alpha)
    streak = streak + 1 if stop else 0
    if streak >= (patience if rule == "peak" else 1):
      return {"stop_step": p["step"], "kept_step": seen[best]["step"], "reason": why}
  return {"stop_step": None, "kept_step": None if best is None else seen[best]["step"],
          "reason": ""}


def _fmt_ci(ci) -> str:
  return "[n/a]" if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def point_line(p: dict, fit: dict) -> str:
  """`guard: step 240 √KL 1.31 [1.27, 1.35] win 0.36 [0.31, 0.41] ...` (the console line)."""
  line = f"guard: step {p['step']} √KL {p['sqrt_kl']:.2f} {_fmt_ci(p['sqrt_kl_ci'])}"
  if p.get("win_rate") is not None:
    line += f" win {p['win_rate']:.2f} {_fmt_ci(p['win_rate_ci'])}"
  line += f" acc {p['reward_acc']:.2f}"
  if fit.get("status") == "fitted":
    if fit["d_star"] is not None:
      line += (f" | fit d* {fit['d_star']:.2f} {_fmt_ci(fit['d_star_ci'])} peak "
               f"{fit['peak_win_rate']:.2f} {_fmt_ci(fit['peak_win_rate_ci'])}")
    else:
      line += f" | fit d* {fit['d_star_status'].replace('_', ' ')}"
  return line


class Guard:
  """The training loop's monitor (train/loop.py's module docstring gives the protocol)."""

  def __init__(self, ctx: dict):
    config = ctx["config"]
    self.g, self.workdir, self.writer = config.guard, str(ctx["workdir"]), ctx["writer"]
    self.spe = float(ctx["steps_per_epoch"])
    self.schedule = set(ctx["schedule_steps"])
    ecfg = config.copy_and_resolve_references()
    ecfg.unlock()
    ecfg.eval, ecfg.judge = ecfg.guard.eval, ecfg.guard.judge
    start = time.time()
    self.setup = setup_lib.prepare(ecfg, self.workdir, self.workdir, mesh=ctx["mesh"],
                                   ref_params=ctx["ref_params"])
    self.points: list[dict] = []
    self.fit: dict = {"status": "not identifiable", "reason": "no points yet"}
    self.best: int | None = None
    self.stopped, self.reason, self.stop_step = False, "", None
    self.kept: int | None = None  # the best point when the rule stopped (or would have)
    self.streak = 0  # consecutive points at which the rule held
    self.seconds = time.time() - start
    self.is_main = jax.process_index() == 0

  # --- the loop's protocol ----------------------------------------------------------------
  def due(self, step: int, final: bool, schedule: bool) -> bool:
    if any(p["step"] == step for p in self.points):
      return False
    every = int(self.g.every)
    return step == 0 or final or schedule or step in self.schedule or (
        every > 0 and step % every == 0)

  def observe(self, step: int, params) -> bool:
    start = time.time()
    setup = self.setup
    summary, arrays, rows = eval_loop.evaluate_params(setup, params, step, self.spe,
                                                      is_reference=step == 0)
    if self.g.write_eval and (step > 0 or self.g.eval.include_reference):
      store_lib.write_step(self.workdir, step, summary, arrays, rows)
    point = {"step": int(step), "kl": summary["kl"], "kl_stderr": summary["kl_stderr"],
             "kl_k3": summary["kl_k3"], "kl_k3_stderr": summary["kl_k3_stderr"],
             "sqrt_kl": summary["sqrt_kl"],
             "sqrt_kl_ci": sqrt_kl_interval(summary["kl"], summary["kl_stderr"]),
             "win_rate": summary["win_rate"], "win_rate_ci": summary["win_rate_ci"],
             "reward_acc": summary["reward_acc"], "heldout_loss": summary["heldout_loss"],
             "epoch": step / self.spe}
    if summary["win_rate"] is not None:
      point["outcomes"] = per_prompt(arrays["judge"]["outcomes"], setup.rows,
                                     len(setup.prompts.texts)).tolist()
    self.points.append(point)
    if point["win_rate"] is not None and (
        self.best is None or point["win_rate"] > self.points[self.best]["win_rate"]):
      self.best = len(self.points) - 1
      self._keep_best(params, point)
    elif self.best is None:
      self.best = 0
      self._keep_best(params, point)
    self.fit = running_fit(self.points, int(self.g.num_bootstrap))
    # One decision for every process: process 0's, shared (the inputs are the same everywhere,
    # but a float that differs in its last bit must not split the job).
    stop, why, test = sharding.share_from_process_0(lambda: decide(
        self.g.stop, self.points, self.fit, self.best, float(self.g.kl_budget),
        float(self.g.alpha)))
    point["paired_vs_best"] = test
    # The peak rule must hold at `patience` consecutive points (one noisy dip does not stop a
    # run); a KL budget stops at its first excess.
    self.streak = self.streak + 1 if stop else 0
    need = int(self.g.get("patience", 1)) if self.g.stop == "peak" else 1
    stop = self.streak >= need and self.stop_step is None
    if stop:
      self.reason, self.stop_step, self.kept = why, int(step), self.best
      self.stopped = not self.g.dry_run
    self.seconds += time.time() - start
    self._report(point, stop)
    return stop and not self.g.dry_run

  def state(self) -> dict:
    return {"points": self.points, "best": self.best, "stopped": self.stopped,
            "reason": self.reason, "stop_step": self.stop_step, "kept": self.kept,
            "streak": self.streak,
            "seconds": self.seconds}

  def restore(self, state: dict | None) -> None:
    if not state:
      return
    self.points = list(state["points"])
    self.best, self.stopped = state["best"], bool(state["stopped"])
    self.reason, self.stop_step = state["reason"], state["stop_step"]
    self.kept, self.streak = state.get("kept"), int(state.get("streak", 0))
    self.seconds = float(state["seconds"])
    self.fit = running_fit(self.points, int(self.g.num_bootstrap))
    logging.info("guard: resumed with %d points (best step %s)", len(self.points),
                 self.points[self.best]["step"] if self.points else None)

  def kept_index(self) -> int | None:
    """The point the run keeps: the best one when the rule stopped (or, in a dry run, would
    have), else the best of all."""
    return self.kept if self.kept is not None else self.best

  def kept_vs_best(self) -> dict | None:
    """The best point of all minus the kept one, paired on the prompts (None if the same)."""
    k = self.kept_index()
    if k is None or k == self.best or "outcomes" not in self.points[k]:
      return None
    test = intervals._paired(  # pylint: disable=protected-access
        np.asarray(self.points[self.best]["outcomes"]) - np.asarray(self.points[k]["outcomes"]))
    test["ci95"] = [test["diff"] - Z95 * test["stderr"], test["diff"] + Z95 * test["stderr"]]
    test["within"] = bool(test["ci95"][0] <= 0.0)  # the kept point is not significantly worse
    return test

  def finish(self, summary: dict) -> None:
    kept = self.points[self.kept_index()] if self.kept_index() is not None else None
    train = max(float(summary.get("train_seconds", 0.0)) - self.seconds, 1e-9)
    summary.update({
        "guard_points": len(self.points), "guard_seconds": self.seconds,
        "guard_cost_fraction": self.seconds / train,
        "guard_stopped": self.stopped, "guard_reason": self.reason,
        "guard_kept_step": None if kept is None else kept["step"],
        "guard_kept_win_rate": None if kept is None else kept["win_rate"],
        "guard_kept_sqrt_kl": None if kept is None else kept["sqrt_kl"]})
    if self.is_main:
      self._write_json(summary)

  # --- files ------------------------------------------------------------------------------
  def _keep_best(self, params, point: dict) -> None:
    """Writes the best point's params to `best/params` (every process joins the save)."""
    best = epath.Path(self.workdir) / "best"
    ckpt_lib.save_arrays(best / "params", params)
    if self.is_main:
      info = {k: point[k] for k in ("step", "sqrt_kl", "win_rate", "win_rate_ci", "kl")}
      tmp = best / "best.json.tmp"
      tmp.write_text(json.dumps(metrics_lib.jsonable(info), indent=2, sort_keys=True))
      tmp.replace(best / "best.json")

  def _report(self, point: dict, stop: bool) -> None:
    values = {f"guard/{k}": point[k] for k in ("kl", "kl_k3", "sqrt_kl", "reward_acc")}
    values["guard/sqrt_kl_lo"], values["guard/sqrt_kl_hi"] = point["sqrt_kl_ci"]
    if point["win_rate"] is not None:
      values["guard/win_rate"] = point["win_rate"]
      values["guard/win_rate_lo"], values["guard/win_rate_hi"] = point["win_rate_ci"]
    if self.fit.get("status") == "fitted" and self.fit["d_star"] is not None:
      values["guard/d_star"] = self.fit["d_star"]
      values["guard/peak_win_rate"] = self.fit["peak_win_rate"]
    self.writer.write(point["step"], values)
    line = point_line(point, self.fit)
    if stop:
      line += ("\nguard: would stop here (dry run) — " if self.g.dry_run else
               "\nguard: stopping — ") + self.reason
    logging.info("%s", line)
    if self.is_main:
      try:
        from tqdm import tqdm  # pylint: disable=g-import-not-at-top
        tqdm.write(line, file=sys.stderr)
      except ImportError:
        sys.stderr.write(line + "\n")
      self._write_json(None)

  def _write_json(self, summary: dict | None) -> None:
    k = self.kept_index()
    kept = self.points[k] if k is not None else None
    best = self.points[self.best] if self.best is not None else None
    doc = {"rule": self.g.stop, "kl_budget": float(self.g.kl_budget),
           "alpha": float(self.g.alpha), "every": int(self.g.every),
           "eval": self.g.eval.to_dict(), "judge": self.setup.judge_name,
           # With each point's per-prompt outcomes: the paired tests can be checked (`replay`).
           "points": self.points,
           "fit": self.fit, "stopped": self.stopped, "stop_step": self.stop_step,
           "reason": self.reason or ("running" if summary is None else
                                     f"not stopped: the run {summary.get('status')}"),
           "kept": None if kept is None else {
               "step": kept["step"], "sqrt_kl": kept["sqrt_kl"], "win_rate": kept["win_rate"],
               "win_rate_ci": kept["win_rate_ci"],
               "params": os.path.join("best", "params") if k == self.best else None},
           "best": None if best is None else {
               "step": best["step"], "sqrt_kl": best["sqrt_kl"], "win_rate": best["win_rate"],
               "win_rate_ci": best["win_rate_ci"]},
           "kept_vs_best": self.kept_vs_best(), "dry_run": bool(self.g.dry_run),
           "seconds": self.seconds,
           # One compile per run: the sampler and scorer are compiled once, not per point.
           "compiles": {"sampler": self.setup.sampler.jitted._cache_size(),  # pylint: disable=protected-access
                        "scorer": self.setup.scorer._cache_size()},  # pylint: disable=protected-access
           "cost_fraction": None if summary is None else summary.get("guard_cost_fraction")}
    path = epath.Path(self.workdir) / "guard.json"
    tmp = path.parent / "guard.json.tmp"
    tmp.write_text(json.dumps(metrics_lib.jsonable(doc), indent=2, sort_keys=True))
    tmp.replace(path)

