"""`python -m daa_jax.scaling SWEEP_DIR` reproduces the files the sweep wrote, checks included."""

import json
import os

import ml_collections
import numpy as np

from daa_jax.study import outputs as outputs_lib
from daa_jax.study import sweep


def _fake_sweep(workdir):
  """A finished one-size sweep on disk: two DAA runs, each with eval/<step>/summary.json and
  samples.jsonl (per-prompt outcomes), the SFT reference as step 0 of the first."""
  config = ml_collections.ConfigDict(dict(
      fit_r0="sft", pairs="policy_samples", objectives=("dpo",), betas=(0.1, 1.0),
      judge=dict(name="gold", model="", reward_model=""),
      daa=dict(data=dict(source="synthetic"))))
  sweep._write_config(config, str(workdir))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  u = rng.uniform(size=60)  # prompt difficulty, shared by every checkpoint
  curves = {0.1: [(0, 0.0, 0.17), (10, 0.5, 0.27), (20, 2.0, 0.33), (30, 5.0, 0.24),
                  (40, 9.0, 0.12)],
            1.0: [(10, 0.2, 0.22), (20, 0.8, 0.28), (30, 1.6, 0.30), (40, 3.0, 0.27)]}
  runs = []
  for beta, points in curves.items():
    name = sweep.run_name("dpo", "tiny", beta)
    run_dir = workdir / name
    runs.append(dict(kind="daa", size="tiny", objective="dpo", beta=beta, name=name,
                     dir=str(run_dir)))
    for step, kl, p in points:
      d = run_dir / "eval" / str(step)
      d.mkdir(parents=True)
      outcome = (u < p + rng.normal(0, 0.05, size=u.shape)).astype(float)
      win = float(outcome.mean())
      half = 1.96 * np.sqrt(max(win * (1 - win), 0.01) / len(u))
      (d / "summary.json").write_text(json.dumps(dict(
          step=step, kl=kl, sqrt_kl=kl ** 0.5, forward_kl=kl / 2, win_rate=win,
          win_rate_ci=[win - half, win + half], epoch_fraction=step / 40,
          chosen_logp_drift=-kl / 3)))
      with open(d / "samples.jsonl", "w") as f:
        for i, o in enumerate(outcome):
          f.write(json.dumps(dict(prompt_index=i, outcome=o)) + "\n")
  return config, runs


def _numbers(path):
  with open(path) as f:
    return json.load(f)


def test_refit_reproduces_the_sweeps_fits_and_keeps_the_checks(tmp_path, capsys):
  config, runs = _fake_sweep(tmp_path)
  sweep._report(config, runs, str(tmp_path))  # pylint: disable=protected-access
  swept = _numbers(tmp_path / "fits.json")
  swept_checks = _numbers(tmp_path / "checks.json")
  assert swept["settings"] == {"r0": "sft", "seed": 0, "weighted": True, "num_bootstrap": 1000}
  assert "## Checks of the paper's findings" in (tmp_path / "report.md").read_text()
  for _ in range(2):
    assert outputs_lib.main([str(tmp_path)]) == 0
    diff, where = outputs_lib.largest_difference(swept, _numbers(tmp_path / "fits.json"))
    assert diff <= 1e-9, (diff, where)
    assert outputs_lib.largest_difference(
        swept_checks, _numbers(tmp_path / "checks.json"))[0] <= 1e-9
    report = (tmp_path / "report.md").read_text()
    assert "## Checks of the paper's findings" in report
    # The sweep's own judge sentence and on-policy pairs, read back from sweep_config.json.
    assert "higher gold reward than the task's reference summary" in report
    assert "exactly: the dashed line is that identity" in report
  assert "warning" not in capsys.readouterr().err
  # Another R0 changes the numbers: the overwrite says so, naming the file and the difference.
  assert outputs_lib.main([str(tmp_path), "--r0", "fit"]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  fits_line = [l for l in err if "fits.json" in l]
  assert len(fits_line) == 1 and fits_line[0].startswith(
      f"warning: {tmp_path / 'fits.json'} overwritten with different numbers: largest "
      "difference ")
  assert _numbers(tmp_path / "fits.json")["settings"]["r0"] == "fit"


def test_largest_difference_names_where():
  old = {"groups": [{"log": {"coef": {"alpha": 0.25, "beta": 0.2}}, "note": None}]}
  new = {"groups": [{"log": {"coef": {"alpha": 0.25 + 3e-9, "beta": 0.2}}, "note": None}]}
  assert outputs_lib.largest_difference(old, old)[0] == 0.0
  diff, where = outputs_lib.largest_difference(old, new)
  assert abs(diff - 3e-9) < 1e-15 and where == "groups[0].log.coef.alpha"
  diff, where = outputs_lib.largest_difference(old, {"groups": []})
  assert diff == float("inf") and where.startswith("groups (length 1 vs 0)")
  diff, where = outputs_lib.largest_difference({"a": None}, {"a": 0.3})
  assert diff == float("inf") and where == "a"


def test_refit_without_a_sweep_config_fits_r0(tmp_path):
  config, runs = _fake_sweep(tmp_path)
  sweep.collect(runs, str(tmp_path))
  os.remove(tmp_path / "sweep_config.json")
  assert outputs_lib.main([str(tmp_path)]) == 0
  fits = _numbers(tmp_path / "fits.json")
  assert fits["settings"]["r0"] == "fit" and fits["groups"][0]["r0_source"] == "fitted"
  assert "## Checks of the paper's findings" in (tmp_path / "report.md").read_text()


def test_quickstart_settings_survive_sweep_config_json(tmp_path):
  # What the refit reads back from sweep_config.json is what the quickstart's sweep used.
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for arg in (None, "full"):
    config = config_lib.load_sibling(os.path.join(repo, "configs", "x.py"), "quickstart", arg)
    sweep._write_config(config, str(tmp_path))  # pylint: disable=protected-access
    assert outputs_lib.settings(outputs_lib.load_config(str(tmp_path))) == (
        outputs_lib.settings(config))
    assert outputs_lib.settings(config)["r0"] == "sft"
