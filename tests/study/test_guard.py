"""The over-optimization guard (study/guard.py): its rules in closed form, the running fit, and
real runs through the CLI — a stop at a KL budget saved and kept, a rerun that trains nothing,
a SIGKILL whose resume continues the guard's history bitwise, and 2 processes vs 1."""

import functools
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.study import guard
from daa_jax.study import guard_report
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.train import loop as train_loop

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import cli as _cli, tiny as _tiny_config  # noqa: E402


def _module(rel):
  spec = importlib.util.spec_from_file_location(rel.replace("/", "_"), os.path.join(REPO, rel))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def point(step, d, outcomes):
  o = np.asarray(outcomes, np.float64)
  se = o.std(ddof=1) / np.sqrt(o.size)
  return {"step": step, "sqrt_kl": d, "win_rate": float(o.mean()),
          "win_rate_ci": [o.mean() - 1.96 * se, o.mean() + 1.96 * se], "outcomes": list(o)}


def law(d, r0=0.2, a=0.3, b=0.25):
  return r0 + d * (a - b * np.log(np.maximum(d, 1e-12)))


# --- rules and the running fit, in closed form ------------------------------------------


def test_kl_budget_stops_at_the_first_point_past_it():
  pts = [point(0, 0.0, [0, 1] * 50), point(10, 0.8, [0, 1] * 50)]
  assert guard.decide("kl_budget", pts, {}, 0, 1.0, 0.05)[0] is False
  pts.append(point(20, 1.01, [0, 1] * 50))
  stop, why, _ = guard.decide("kl_budget", pts, {}, 0, 1.0, 0.05)
  assert stop and "1.010 at step 20 exceeds the budget 1" in why
  assert guard.decide("none", pts, {}, 0, 1.0, 0.05)[0] is False


def test_peak_needs_both_past_the_upper_bound_and_a_significant_paired_drop():
  rng = np.random.default_rng(0)
  best = (rng.random(400) < 0.6).astype(float)
  worse = best.copy()
  worse[np.flatnonzero(best)[:80]] = 0.0  # the same prompts, 80 fewer wins: p ~ 1e-18
  pts = [point(0, 0.0, best * 0.5), point(10, 1.0, best), point(20, 2.5, worse)]
  fit = {"status": "fitted", "d_star": 1.2, "d_star_ci": [1.0, 1.5]}
  stop, why, test = guard.decide("peak", pts, fit, 1, 0.0, 0.05)
  assert stop and test["against_step"] == 10 and test["p_value"] < 1e-10, (why, test)
  assert test["diff"] == pytest.approx(80 / 400)
  # Below the upper bound of d*: no stop, whatever the drop.
  assert not guard.decide("peak", pts, dict(fit, d_star_ci=[1.0, 2.6]), 1, 0.0, 0.05)[0]
  # No d* (beyond the sampled range, or no maximum): no stop.
  assert not guard.decide("peak", pts, dict(fit, d_star=None), 1, 0.0, 0.05)[0]
  # A drop the paired test cannot tell from noise: no stop.
  slight = best.copy()
  slight[np.flatnonzero(best)[:2]] = 0.0
  pts[-1] = point(20, 2.5, slight)
  stop, _, test = guard.decide("peak", pts, fit, 1, 0.0, 0.05)
  assert not stop and test["p_value"] > 0.05


def test_running_fit_recovers_the_law_and_refuses_what_it_cannot_identify():
  rng = np.random.default_rng(1)
  num_prompts = 2000
  ds = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
  pts = [point(10 * i, d, (rng.random(num_prompts) < law(d)).astype(float))
         for i, d in enumerate(ds)]
  assert guard.running_fit(pts[:3], 200)["status"] == "not identifiable"  # R0 + 2 points
  fit = guard.running_fit(pts, 200)
  assert fit["status"] == "fitted", fit
  # d* = exp(α/β − 1) = exp(0.2) = 1.22 for the true law; peak 0.2 + β·d* = 0.505.
  assert fit["alpha_ci"][0] < 0.3 < fit["alpha_ci"][1]
  assert fit["beta_ci"][0] < 0.25 < fit["beta_ci"][1]
  assert fit["d_star_ci"][0] < np.exp(0.2) < fit["d_star_ci"][1]
  assert 0 <= fit["peak_win_rate_ci"][0] <= fit["peak_win_rate_ci"][1] <= 1
  # A law still rising at the largest sampled √KL: the peak is reported as beyond it.
  rising = [point(10 * i, d, (rng.random(num_prompts) < 0.2 + 0.1 * d).astype(float))
            for i, d in enumerate(ds)]
  fit = guard.running_fit(rising, 200)
  assert fit["d_star"] is None and fit["d_star_status"] in ("beyond_sampled_range",
                                                            "no_maximum"), fit
  assert guard.running_fit([p for p in pts if p["step"]], 200)["status"] == "no reference point"


# --- config errors -------------------------------------------------------------------------


def tiny(**updates):
  return _tiny_config("job=daa", **{"guard.enabled": True, **updates})


@pytest.mark.parametrize("updates, message", [
    ({"guard.stop": "peek"}, r"guard.stop='peek' is not a known stop; choose one of: none, kl_budget, peak. Did you "
     r"mean 'peak'\? Set --config.guard.stop=peak"),
    ({"guard.stop": "kl_budget"}, r"guard.stop='kl_budget' needs config.guard.kl_budget > 0"),
    ({"guard.stop": "peak", "guard.alpha": 0.7}, r"guard.alpha=0.7 must be in \(0, 0.5\)"),
    ({"guard.stop": "peak", "guard.judge.name": "none"}, r"stop='peak' needs a win rate"),
    ({"guard.every": -1}, r"guard.every=-1 must be >= 0"),
    ({"guard.eval.num_prompts": 0}, r"guard.eval.num_prompts=0 must be >= 1"),
])
def test_guard_config_errors_name_the_field(updates, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(tiny(**updates))


def test_train_run_without_the_guard_refuses_an_enabled_guard(tmp_path):
  with pytest.raises(ConfigError, match="called without the guard"):
    train_loop.run(tiny(), str(tmp_path))


# --- real runs -----------------------------------------------------------------------------


def _read(workdir, name="guard.json"):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


GUARD = ["--config=configs/tiny.py:job=daa", "--config.guard.enabled=True",
         "--config.guard.every=1", "--config.train.max_steps=12"]


def test_kl_budget_run_stops_saves_the_step_keeps_the_best_and_a_rerun_trains_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  flags = GUARD + ["--config.guard.stop=kl_budget", "--config.guard.kl_budget=0.3",
                   f"--workdir={workdir}"]
  proc = _cli(flags)
  doc = _read(workdir)
  steps = [p["step"] for p in doc["points"]]
  d = [p["sqrt_kl"] for p in doc["points"]]
  stop = doc["stop_step"]
  assert doc["stopped"] and 0 < stop < 8 and steps == list(range(stop + 1)), doc
  assert d[-1] > 0.3 and max(d[:-1]) <= 0.3 and d[0] == 0.0  # step 0: the reference, KL 0
  assert f"guard: stopping — sqrt(KL) {d[-1]:.3f} at step {stop} exceeds" in proc.stderr
  assert f"daa: stopped at step {stop}" in proc.stdout, proc.stdout
  assert "guard:   " in proc.stdout and "of the training time" in proc.stdout
  # One compile of the sampler and scorer for all the points.
  assert doc["compiles"] == {"sampler": 1, "scorer": 1}
  # The stop step is saved with its export; the kept point is the best win rate so far.
  assert ckpt_lib.exported_steps(workdir)[-1] == stop
  wins = [p["win_rate"] for p in doc["points"]]
  assert doc["kept"]["step"] == steps[int(np.argmax(wins))]
  assert _read(workdir, "best/best.json")["step"] == doc["kept"]["step"]
  # Every point is also the evaluation's eval/<step>/ and a metrics.jsonl row.
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "eval"))) == steps
  logged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "guard/sqrt_kl" in row:
        logged[row["step"]] = row["guard/sqrt_kl"]
  assert logged == dict(zip(steps, d))
  # A rerun of the same command: the run had stopped, nothing more is trained.
  again = _cli(flags)
  assert f"daa: stopped at step {stop}" in again.stdout
  assert _read(workdir)["points"] == doc["points"]
  assert ckpt_lib.exported_steps(workdir)[-1] == stop


def test_best_point_loads_as_init_from_run_at_best(tmp_path):
  workdir = str(tmp_path / "run")
  _cli(GUARD + ["--config.train.max_steps=3", f"--workdir={workdir}"])
  kept = _read(workdir)["kept"]["step"]
  from daa_jax.models import config as model_configs  # pylint: disable=g-import-not-at-top
  from daa_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(lambda: model_lib.init_params(model_configs.pythia("tiny"),
                                                          jax.random.key(0)))
  params, step = ckpt_lib.load_params(f"{workdir}@best", abstract)
  assert step == kept
  with pytest.raises(Exception, match="holds no kept point"):
    ckpt_lib.load_params(f"{tmp_path}@best", abstract)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_sigkill_mid_run_resumes_the_guards_history_bitwise(tmp_path):
  flags = GUARD + ["--config.train.max_steps=8", "--config.guard.every=2",
                   "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _cli(flags + [f"--workdir={straight}"])
  proc = _cli(flags + [f"--workdir={killed}"], check=False, faults={"sigkill_mid_save": 6})
  assert proc.returncode == -9, proc.stderr[-2000:]
  _cli(flags + [f"--workdir={killed}"])
  a, b = _read(straight), _read(killed)
  assert [p["step"] for p in a["points"]] == [0, 2, 4, 6, 8]
  assert b["points"] == a["points"] and b["fit"] == a["fit"] and b["kept"] == a["kept"]


def test_two_processes_decide_like_one(tmp_path):
  mh = _module("tests/train/test_multihost.py")
  flags = GUARD + ["--config.guard.stop=kl_budget", "--config.guard.kl_budget=0.3",
                   "--config.mesh=(-1,1,1)"]
  run = functools.partial(mh.launch, flags=flags, cache_dir=str(tmp_path / "cache"),
                          log_dir=str(tmp_path / "logs"))
  one, two = tmp_path / "one", tmp_path / "two"
  run(one, 1)
  run(two, 2)
  a, b = _read(one), _read(two)
  assert b["stopped"] and b["stop_step"] == a["stop_step"], (a["reason"], b["reason"])
  for p, q in zip(a["points"], b["points"]):
    assert p["step"] == q["step"] and p["win_rate"] == q["win_rate"]
    np.testing.assert_allclose(q["sqrt_kl"], p["sqrt_kl"], atol=1e-4)
  # Both processes stopped at that step: each saved it (one collective checkpoint).
  assert ckpt_lib.exported_steps(str(two))[-1] == a["stop_step"]


def test_a_dry_run_decides_as_a_real_stop_and_trains_on(tmp_path):
  flags = GUARD + ["--config.guard.stop=kl_budget", "--config.guard.kl_budget=0.3"]
  real, dry = str(tmp_path / "real"), str(tmp_path / "dry")
  _cli(flags + [f"--workdir={real}"])
  proc = _cli(flags + ["--config.guard.dry_run=True", f"--workdir={dry}"])
  a, b = _read(real), _read(dry)
  assert a["stopped"] and not b["stopped"] and b["dry_run"]
  assert b["stop_step"] == a["stop_step"] and b["reason"] == a["reason"]
  assert b["kept"]["step"] == a["kept"]["step"]
  assert b["points"][:len(a["points"])] == a["points"]  # the same points up to the stop
  # 128 pairs / batch 16: one epoch is 8 steps, the whole run.
  assert [p["step"] for p in b["points"]][-1] == 8 and "daa: finished at step 8" in proc.stdout
  assert "guard: would stop here (dry run)" in proc.stderr
  # The recorded points replayed through the rule give the same decision.
  replayed = guard.replay(b["points"], "kl_budget", kl_budget=0.3, patience=2)
  assert (replayed["stop_step"], replayed["kept_step"]) == (a["stop_step"], a["kept"]["step"])
  table = guard_report.evidence_table([real, dry, str(tmp_path)])
  rows = table.strip().splitlines()[2:]
  assert len(rows) == 2 and "| kl_budget (dry run) |" in rows[1]
  assert f"| {a['stop_step']} | 8 |" in rows[1] and rows[1].endswith(f"| {8 - a['stop_step']} |")
  lines = guard_report.write(str(tmp_path))
  assert lines[0] == "## The over-optimization guard"
  assert os.path.getsize(tmp_path / "figures" / "guard.png") > 10_000
  with open(tmp_path / "guard.md") as f:
    assert f.read().startswith("# The over-optimization guard")
