"""Sweeps: grid expansion, cluster commands, the study's checks, and a shrunk quickstart."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from daa_jax.train import checkpoint as ckpt_lib

from daa_jax.train import config as config_lib
from daa_jax.study import fits as scaling
from daa_jax.study import sweep
from daa_jax.study import intervals as intervals_lib
from daa_jax.study import checks as checks_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs", "x.py")


def test_paper_grid_expands_to_the_papers_runs(tmp_path):
  c = config_lib.load_sibling(CONFIGS, "sweep_paper")
  runs = sweep.expand(c, str(tmp_path))
  sft = [r for r in runs if r["kind"] == "sft"]
  daa = [r for r in runs if r["kind"] == "daa"]
  assert [r["size"] for r in sft] == ["1b", "2.8b", "6.9b"]
  assert len(daa) == 3 * 3 * 7
  assert {r["beta"] for r in daa} >= {0.01, 0.0175, 0.025, 0.0375}
  for r in daa:
    cfg = r["config"]
    assert cfg.init_from == str(tmp_path / f"sft_{r['size']}")
    assert cfg.objective.name == r["objective"] and cfg.objective.beta == r["beta"]
    assert cfg.model.size == r["size"]
    # The paper's recipe.
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps) == ("rmsprop", 5e-7, 150)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (128, 8)
    assert tuple(cfg.checkpoint.epoch_fractions) == (0.215, 0.43, 0.645, 0.86, 1.0)
  assert sft[0]["config"].hf_model == "EleutherAI/pythia-1b"
  # Each SFT run precedes the DAA runs of its size.
  order = [r["name"] for r in runs]
  assert order.index("sft_2.8b") < order.index("dpo_2.8b_b0p01")


def test_commands_mode_writes_one_line_per_run(tmp_path):
  c = config_lib.load_sibling(CONFIGS, "sweep_paper", "mode=commands,sizes=1b")
  out = sweep.run(c, str(tmp_path))
  lines = open(out["commands"]).read().splitlines()
  train_lines = [l for l in lines if "configs/daa.py" in l or "configs/sft.py" in l]
  assert len(train_lines) == 1 + 21
  assert train_lines[0].startswith("python -m daa_jax.main --config=configs/sft.py:size=1b ")
  dpo = [l for l in lines if "objective=dpo,beta=0.0175" in l]
  assert len(dpo) == 1 and f"--config.init_from={tmp_path}/sft_1b" in dpo[0]
  assert sum("configs/eval.py" in l for l in lines) == 21
  assert lines[-1].startswith("python -m daa_jax.scaling")
  assert os.access(out["commands"], os.X_OK)


def _load(rows, tmp_path):
  path = str(tmp_path / "summary.csv")
  sweep.write_summary(rows, path)
  return scaling.load_summary(path)


def _rows(win_by_kl, objective="dpo", beta=0.1):
  rows = []
  for i, (kl, win) in enumerate(win_by_kl):
    rows.append(dict(objective=objective, size="tiny", beta=beta, step=10 * (i + 1), kl=kl,
                     sqrt_kl=kl ** 0.5, win_rate=win, win_rate_lo=win - 0.02,
                     win_rate_hi=win + 0.02, run=f"{objective}_{beta}"))
  return rows


def test_checks_detect_rise_then_fall_and_beta_ordering(tmp_path):
  hump = _rows([(0.2, 0.20), (1.0, 0.30), (3.0, 0.25), (8.0, 0.12)], beta=0.1)
  hump += _rows([(0.1, 0.18), (0.5, 0.26), (1.5, 0.24), (3.0, 0.20)], beta=1.0)
  rows = hump + [dict(objective="sft", size="tiny", beta=0.0, step=0, kl=0.0, sqrt_kl=0.0,
                      win_rate=0.15, win_rate_lo=0.13, win_rate_hi=0.17, run="sft_tiny")]
  rows = _load(rows, tmp_path)
  fits = intervals_lib.fit_all(rows, r0="sft")
  result = checks_lib.checks(rows, fits)["dpo/tiny"]
  assert result["rises_then_falls"]
  assert result["best_win_rate"] == 0.30 and result["largest_kl_win_rate"] == 0.12
  assert result["final_kl_by_beta"] == {"0.1": 8.0, "1.0": 3.0}
  assert result["smaller_beta_larger_kl"]
  # Only rising: the best checkpoint is the largest-KL one.
  rising = _load(_rows([(0.2, 0.20), (1.0, 0.25), (3.0, 0.30)]), tmp_path)
  assert not checks_lib.checks(rising, {"groups": []})["dpo/tiny"]["rises_then_falls"]
  # Within the interval: not a fall.
  flat = _load(_rows([(0.2, 0.20), (1.0, 0.31), (3.0, 0.30)]), tmp_path)
  assert not checks_lib.checks(flat, {"groups": []})["dpo/tiny"]["rises_then_falls"]


def test_collect_writes_summary_csv_with_the_contract_columns(tmp_path):
  run_dir = tmp_path / "dpo_tiny_b0p1"
  for step, kl in ((0, 0.0), (31, 1.0)):
    d = run_dir / "eval" / str(step)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(dict(
        step=step, kl=kl, sqrt_kl=kl ** 0.5, forward_kl=kl / 2, win_rate=0.2,
        win_rate_ci=[0.15, 0.25], reward_acc=0.6, heldout_loss=0.6, length_r2=0.1,
        chosen_logp_drift=-kl, epoch_fraction=step / 31)))
  runs = [dict(kind="daa", size="tiny", objective="dpo", beta=0.1, name="dpo_tiny_b0p1",
               dir=str(run_dir))]
  rows = sweep.collect(runs, str(tmp_path))
  with open(tmp_path / "summary.csv") as f:
    table = list(csv.DictReader(f))
  required = ("objective, size, beta, step, epoch_fraction, kl, sqrt_kl, forward_kl, win_rate, "
              "win_rate_lo, win_rate_hi, reward_acc, heldout_loss, length_r2, "
              "chosen_logp_drift").split(", ")
  assert set(required) <= set(table[0])
  assert [r["objective"] for r in rows] == ["sft", "dpo"]  # step 0 = the reference policy
  assert table[1]["win_rate_lo"] == "0.15" and table[1]["step"] == "31"


@pytest.mark.slow
def test_shrunk_quickstart_shows_overoptimization(tmp_path):
  """The quickstart's pipeline end to end without IPO: the paper's findings must show.

  Everything else is the README's quickstart (size tiny2, SFT 1500 steps, β 0.1/0.3/1, 500
  judged prompts). "Rises then falls" is the paired split-half test: the peak picked on 250
  prompts beats both the SFT policy and the largest-KL checkpoint on the other 250 (p < 0.05).
  """
  workdir = str(tmp_path)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "daa_jax.main", "--config=configs/quickstart.py",
          f"--workdir={workdir}", "--config.objectives=('dpo','slic')",
          "--config.sft.train.progress=False", "--config.daa.train.progress=False"]
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "report:" in proc.stdout and "report.md" in proc.stdout
  for name in ("summary.csv", "fits.json", "report.md", "checks.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert os.path.exists(os.path.join(workdir, "figures", "frontier.png"))
  with open(os.path.join(workdir, "checks.json")) as f:
    checks = json.load(f)
  for objective in ("dpo", "slic"):
    c = checks[f"{objective}/tiny2"]
    assert c["rises_then_falls_test"] == "paired split-half"
    assert c["rises_then_falls"], (objective, c)
    assert c["smaller_beta_larger_kl"], (objective, c)
    assert c["log_fit_ok"], (objective, c)  # α, β > 0 and lower RMSE than the quadratic
  report = open(os.path.join(workdir, "report.md")).read()
  assert "rises then falls" in report
  # The guard measured every run at step 0 (the first run of the size) and at every schedule
  # checkpoint, with the evaluation's settings: its points are the sweep's evaluations.
  assert "## The over-optimization guard" in report
  assert "guard: step 0 √KL 0.00" in proc.stderr
  for run in ("dpo_tiny2_b0p1", "slic_tiny2_b1"):
    with open(os.path.join(workdir, run, "guard.json")) as f:
      doc = json.load(f)
    steps = [p["step"] for p in doc["points"]]
    assert steps[0] == 0 and not doc["stopped"] and doc["rule"] == "none"
    assert set(steps) == {0} | set(ckpt_lib.exported_steps(os.path.join(workdir, run)))
    assert doc["compiles"]["sampler"] == 1
  # The guard's evidence, replayed on these runs' own points (the dry run's decisions, as
  # configs/guard.py takes them): the peak rule keeps a point within the paired 95% interval
  # of the run's best, and fires in every run that ends clearly below its best.
  from daa_jax.study import guard  # pylint: disable=g-import-not-at-top
  from daa_jax.study import intervals  # pylint: disable=g-import-not-at-top
  for run in [r for r in os.listdir(workdir) if r.startswith(("dpo_", "slic_"))]:
    with open(os.path.join(workdir, run, "guard.json")) as f:
      pts = json.load(f)["points"]
    if pts[0]["step"] != 0:  # only a size's first run has the reference point
      with open(os.path.join(workdir, "dpo_tiny2_b0p1", "guard.json")) as f:
        pts = [json.load(f)["points"][0]] + pts
    out = guard.replay(pts, "peak", patience=2)
    best = max(pts, key=lambda p: p["win_rate"])
    kept = next(p for p in pts if p["step"] == out["kept_step"])
    gap = intervals._paired(np.subtract(best["outcomes"], kept["outcomes"]))  # pylint: disable=protected-access
    assert gap["diff"] - 1.959964 * gap["stderr"] <= 0, (run, out, gap)
    drop = intervals._paired(np.subtract(best["outcomes"], pts[-1]["outcomes"]))  # pylint: disable=protected-access
    if drop["p_value"] < 0.01:
      assert out["stop_step"] is not None, (run, drop)


def test_seeds_expand_to_runs_and_give_seed_level_intervals(tmp_path):
  c = config_lib.load_sibling(CONFIGS, "sweep_paper", "mode=commands,sizes=1b")
  with c.unlocked():
    c.seeds = (0, 1, 2)
    c.betas = (0.1,)
  runs = [r for r in sweep.expand(c, str(tmp_path)) if r["kind"] == "daa"]
  assert [r["name"] for r in runs[:3]] == ["dpo_1b_b0p1_s0", "dpo_1b_b0p1_s1", "dpo_1b_b0p1_s2"]
  assert [r["config"].seed for r in runs[:3]] == [0, 1, 2]
  lines = open(sweep.write_commands(c, str(tmp_path), runs)).read().splitlines()
  assert sum("--config.seed=2" in l for l in lines) == 3  # one per objective
  rows = [dict(objective="dpo", size="1b", beta=0.1, step=10, win_rate=w, kl=k, run=f"r{i}")
          for i, (w, k) in enumerate(((0.30, 1.0), (0.34, 1.2), (0.32, 1.1)))]
  rows.append(dict(objective="dpo", size="1b", beta=0.1, step=20, win_rate=0.3, kl=2.0, run="r0"))
  sweep._seed_intervals(rows)  # pylint: disable=protected-access
  half = 4.302653 * 0.02 / 3 ** 0.5  # t(0.975, 2) · std / √3
  assert rows[0]["num_seeds"] == 3 and rows[3]["num_seeds"] == 1
  assert rows[0]["seed_win_rate_lo"] == pytest.approx(0.32 - half)
  assert rows[1]["seed_win_rate_hi"] == pytest.approx(0.32 + half)
  assert "seed_win_rate_lo" not in rows[3]


def test_checks_use_the_paired_split_half_test_with_per_prompt_outcomes(tmp_path):
  rng = np.random.default_rng(0)
  u = rng.uniform(size=500)  # prompt difficulty, shared by every checkpoint
  curve = [(0.2, 0.20), (1.0, 0.33), (3.0, 0.26), (8.0, 0.12)]
  rows = _rows(curve) + [dict(objective="sft", size="tiny", beta=0.0, step=0, kl=0.0,
                              sqrt_kl=0.0, win_rate=0.17, win_rate_lo=0.14, win_rate_hi=0.2,
                              run="sft_tiny")]
  rows = _load(rows, tmp_path)
  p = {scaling.outcome_key(r): r["win_rate"] for r in rows}
  outcomes = {k: (u < v).astype(float) for k, v in p.items()}
  fits = intervals_lib.fit_all(rows, r0="sft", outcomes=outcomes, num_bootstrap=100)
  result = checks_lib.checks(rows, fits, outcomes)["dpo/tiny"]
  assert result["rises_then_falls_test"] == "paired split-half"
  assert result["paired"]["rises"] and result["paired"]["falls"] and result["rises_then_falls"]
  assert result["paired"]["peak_sqrt_kl"] == 1.0
  assert 0 <= result["log_beats_bon"] <= 1
  text = "\n".join(checks_lib.check_lines({"dpo/tiny": result}))  # pylint: disable=protected-access
  assert "tested on the other 250 (paired)" in text and "best-of-n" in text
  # The same win rates, but every checkpoint's outcomes independent noise around 0.25: no
  # paired evidence, although the point estimates still rise and fall.
  flat = {k: (rng.uniform(size=500) < 0.25).astype(float) for k in p}
  assert not checks_lib.checks(rows, fits, flat)["dpo/tiny"]["rises_then_falls"]


@pytest.mark.study
def test_full_quickstart_reaches_its_report(tmp_path):
  """The README's larger study, `configs/quickstart.py:full`, end to end: three model sizes,
  including the policy-sampled pairs whose one-token (empty) responses once stopped it."""
  workdir = str(tmp_path)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "daa_jax.main", "--config=configs/quickstart.py:full",
          f"--workdir={workdir}", "--config.sft.train.progress=False",
          "--config.daa.train.progress=False"]
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=5400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "report.md" in proc.stdout
  with open(os.path.join(workdir, "checks.json")) as f:
    checks = json.load(f)
  assert {f"{o}/{s}" for o in ("dpo", "ipo", "slic") for s in ("tiny", "tiny2", "tiny4")} <= set(
      checks)
  for c in checks.values():
    assert c["rises_then_falls_test"] == "paired split-half"
  report = open(os.path.join(workdir, "report.md")).read()
  assert "Log-form 95% bootstrap intervals" in report and "tiny4" in report
