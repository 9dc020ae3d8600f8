"""The trainer: DPO at step 0, mesh invariance, accumulation, cached reference, resume,
preemption, the non-finite guard, compile-once, and config errors."""

import importlib.util
import json
import math
import os
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.models import model as model_lib
from daa_jax.train import optim
from daa_jax.train import step as step_lib
from daa_jax.train import loop as train
from daa_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from daa_jax.models import config as model_configs
from daa_jax.data import pipeline as data_pipeline
from daa_jax.train import init as init_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import cli, tiny  # noqa: E402  (tests/ on sys.path)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_params(workdir, step):
  cfg = model_configs.pythia("tiny")
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  params, _ = ckpt_lib.load_params(f"{workdir}@{step}", abstract)
  return params


def test_dpo_first_step_is_log2_with_ties_counted_half(tmp_path):
  summary = train.run(tiny(**{"train.max_steps": 1}), str(tmp_path))
  first = metrics(str(tmp_path))[0]
  # Policy == reference at step 0: every margin is exactly 0, so DPO = log 2 and every pair
  # is a tie, which reward accuracy counts as half.
  assert first["daa/loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert first["daa/reward_acc"] == 0.5
  assert first["daa/margin"] == 0.0
  assert summary["step"] == 1


@pytest.mark.parametrize("objective", ["ipo", "slic"])
def test_other_objectives_closed_form_at_step0(tmp_path, objective):
  train.run(tiny(f"job=daa,objective={objective},beta=0.5", **{"train.max_steps": 1}),
            str(tmp_path))
  first = metrics(str(tmp_path))[0]
  assert first["daa/loss"] == pytest.approx(1.0, abs=1e-6)  # (0-1)^2 and max(0, 1-0)


def test_same_losses_on_every_mesh(tmp_path):
  losses = {}
  for mesh in [(8, 1, 1), (2, 2, 2), (1, 1, 1)]:
    workdir = str(tmp_path / "x".join(map(str, mesh)))
    train.run(tiny(**{"mesh": mesh, "train.max_steps": 3}), workdir)
    losses[mesh] = [m["loss/total"] for m in metrics(workdir)]
  ref = losses[(1, 1, 1)]
  for mesh, values in losses.items():
    np.testing.assert_allclose(values, ref, atol=1e-5, rtol=0, err_msg=str(mesh))


def _step_inputs(grad_accum=1, cached_ref=False, batch_size=16):
  c = tiny()
  ds = data_pipeline.load_pairs(c.data, "train")
  cfg = model_configs.pythia("tiny")
  model = model_lib.CausalLM(cfg)
  params = model_lib.init_params(cfg, jax.random.key(0))
  batch = next(iter(data_pipeline.Loader(ds, batch_size=batch_size, seed=0)))
  batch.pop("index")
  tx, lr_fn = optim.make(c.optim, 10)
  # A policy that differs from the reference, so the loss is not at its symmetric point.
  policy = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                        params)
  state = step_lib.init_state(policy, tx)
  hparams = step_lib.hparams_from_config(c.objective)
  scfg = step_lib.StepConfig(kind="daa", objective="dpo", grad_accum=grad_accum,
                             cached_ref=cached_ref)
  return model, tx, lr_fn, state, params, batch, hparams, scfg


def test_grad_accumulation_equals_one_big_batch():
  model, _, _, state, ref, batch, hparams, _ = _step_inputs()
  # SGD with lr 1 makes the parameter change equal the gradient, so this compares gradients;
  # an adaptive optimizer's first step (~lr * sign(g)) would amplify roundoff where g ~ 0.
  tx, lr_fn = optax.sgd(1.0), None
  state = step_lib.init_state(state.params, tx)
  outs = {}
  for accum in (1, 4):
    scfg = step_lib.StepConfig(kind="daa", objective="dpo", grad_accum=accum)
    fn = jax.jit(lambda s, r, b, h, scfg=scfg: step_lib.train_step(
        s, r, b, h, model=model, tx=tx, cfg=scfg, lr_fn=lr_fn))
    outs[accum] = fn(state, ref, batch, hparams)
  (s1, m1), (s4, m4) = outs[1], outs[4]
  # Every logged statistic is the whole batch's, whatever grad_accum (margin_std included:
  # the mean of the micro-batches' standard deviations would be smaller).
  assert set(m1) == set(m4) and "daa/margin_std" in m1
  assert float(m1["daa/margin_std"]) > 0
  for key in m1:
    assert float(m1[key]) == pytest.approx(float(m4[key]), rel=1e-5, abs=1e-6), key
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_cached_reference_equals_live_reference():
  model, tx, lr_fn, state, ref, batch, hparams, _ = _step_inputs()
  live = step_lib.StepConfig(kind="daa", objective="dpo")
  cached = step_lib.StepConfig(kind="daa", objective="dpo", cached_ref=True)
  cached_batch = dict(batch, ref_logps=step_lib.pair_logps(model, ref, batch))
  s_live, m_live = step_lib.train_step(state, ref, batch, hparams, model=model, tx=tx,
                                       cfg=live, lr_fn=lr_fn)
  s_cached, m_cached = step_lib.train_step(state, None, cached_batch, hparams, model=model,
                                           tx=tx, cfg=cached, lr_fn=lr_fn)
  assert float(m_live["loss/total"]) == pytest.approx(float(m_cached["loss/total"]), abs=1e-6)
  for a, b in zip(jax.tree.leaves(s_live.params), jax.tree.leaves(s_cached.params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_cached_reference_run_matches_live_run_and_reuses_cache(tmp_path):
  live = str(tmp_path / "live")
  cached = str(tmp_path / "cached")
  train.run(tiny(**{"train.max_steps": 3}), live)
  train.run(tiny(**{"train.max_steps": 3, "objective.reference": "cached"}), cached)
  np.testing.assert_allclose([m["loss/total"] for m in metrics(live)],
                             [m["loss/total"] for m in metrics(cached)], atol=1e-5, rtol=0)
  files = os.listdir(os.path.join(cached, "cache"))
  assert any(f.startswith("ref_logps_train_") for f in files)


def test_training_raises_heldout_reward_accuracy(tmp_path):
  c = tiny(**{"train.num_epochs": 2.0, "train.max_steps": -1, "train.eval_every": 10**6,
              "train.eval_batches": 0, "train.batch_size": 32,
              "data.synthetic.num_pairs": 4096, "data.synthetic.num_eval": 256,
              "optim.lr": 1e-3, "objective.beta": 0.3, "train.log_every": 64})
  summary = train.run(c, str(tmp_path))
  # Held-out labels agree with the gold ranking ~3/4 of the time (Bradley-Terry noise), so
  # ~0.75 is the ceiling; chance is 0.5 and one standard error at n ~ 250 is ~0.03.
  assert summary["step"] == 256
  assert summary["eval/num_pairs"] >= 200
  assert summary["eval/reward_acc"] > 0.62, summary


def test_beta_sweep_compiles_the_step_once(tmp_path, monkeypatch):
  # A fresh step cache: an earlier test in this process with the same shapes would otherwise
  # have traced the step already (0 traces here, not 1).
  monkeypatch.setattr(train, "_STEP_CACHE", {})
  train.TRACE_COUNTS.clear()
  for i, beta in enumerate((0.1, 0.3, 1.0)):
    train.run(tiny(f"job=daa,beta={beta}", **{"train.max_steps": 2}), str(tmp_path / str(i)))
  assert train.TRACE_COUNTS["train_step"] == 1


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoints(tmp_path, monkeypatch):
  # A NaN β at step 3 (a runtime hyperparameter: same compiled step) makes that step's loss
  # and gradient NaN, as a bad batch or an overflow would.
  train_step = step_lib.train_step

  def poisoned(state, ref_params, batch, hparams, **kwargs):
    hparams = {**hparams, "beta": jnp.where(state.step == 3, jnp.nan, hparams["beta"])}
    return train_step(state, ref_params, batch, hparams, **kwargs)
  monkeypatch.setattr(step_lib, "train_step", poisoned)
  monkeypatch.setattr(train, "_STEP_CACHE", {})
  c = tiny(**{"train.max_steps": 6, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 10})
  with pytest.raises(TrainingDiverged, match=r"non-finite loss or gradient at step 3.*last "
                     r"good checkpoint is 3"):
    train.run(c, str(tmp_path))
  mngr_steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert mngr_steps == [1, 2, 3]  # state after 3 good updates; nothing after the bad step


_cli = cli  # (args, faults=None, check=True)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
  flags = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
           "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True",
           "--config.checkpoint.epoch_fractions=(0.5,)"]
  straight = str(tmp_path / "straight")
  _cli(flags + [f"--workdir={straight}"])
  killed = str(tmp_path / "killed")
  proc = _cli(flags + [f"--workdir={killed}"], check=False, faults={"sigkill_mid_save": 6})
  assert proc.returncode == -9, proc.stderr[-2000:]
  _cli(flags + [f"--workdir={killed}"])
  a, b = final_params(straight, 8), final_params(killed, 8)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Steps logged after the last committed checkpoint were logged again after the resume:
  # each step appears once, with the uninterrupted run's values.
  assert [m["step"] for m in metrics(killed)] == list(range(1, 9))
  for m, n in zip(metrics(killed), metrics(straight)):
    assert m["loss/total"] == n["loss/total"], m["step"]


def test_sigkill_after_a_schedule_commit_keeps_its_export_and_repairs_an_old_layout(tmp_path):
  flags = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
           "--config.checkpoint.async_save=True", "--config.checkpoint.epoch_fractions=(0.5,)"]
  straight = str(tmp_path / "straight")
  _cli(flags + [f"--workdir={straight}"])
  assert ckpt_lib.exported_steps(straight) == [4, 8]  # 8 steps per epoch: 0.5 epoch and the end
  killed = str(tmp_path / "killed")
  proc = _cli(flags + [f"--workdir={killed}"], check=False, faults={"sigkill_after_commit": 4})
  assert proc.returncode == -9, proc.stderr[-2000:]
  # The state and the export of step 4 were one commit: both are there.
  assert ckpt_lib.exported_steps(killed) == [4]
  # A run directory of the earlier layout, killed between its two commits, had the state of
  # step 4 without its export; the resumed run writes the export.
  shutil.rmtree(os.path.join(killed, "checkpoints", "4", "params"))
  assert ckpt_lib.exported_steps(killed) == []
  proc = _cli(flags + [f"--workdir={killed}"])
  with open(os.path.join(killed, "daa_jax.log")) as f:
    assert "wrote the missing params export of step 4" in f.read()
  assert ckpt_lib.exported_steps(killed) == [4, 8]
  for step in (4, 8):
    for x, y in zip(jax.tree.leaves(final_params(straight, step)),
                    jax.tree.leaves(final_params(killed, step))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path)
  flags = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
           f"--workdir={workdir}"]
  proc = _cli(flags, faults={"sigterm_at_batch": 3})
  assert proc.returncode == 0
  # Signalled during step 3: the flag agreed at that boundary is read one boundary later, so
  # step 4 is saved; then the process left cleanly, saying so.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert [m["step"] for m in metrics(workdir)][-1] == 4
  assert "every process saved step 4" in proc.stdout, proc.stdout
  _cli(flags)
  steps = [m["step"] for m in metrics(workdir)]
  assert steps[-1] == 8 and steps.count(8) == 1


def test_ctrl_c_on_a_schedule_step_with_an_async_save_saves_it_once_then_resumes(tmp_path):
  """Ctrl-C is a preemption. Agreed at step 4, a schedule step whose asynchronous save (with
  the params export) is already in flight: step 4 is saved exactly once, and the resumed run
  equals one never stopped, each step logged once."""
  flags = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
           "--config.checkpoint.async_save=True", "--config.checkpoint.epoch_fractions=(0.5,)"]
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "stopped")
  _cli(flags + [f"--workdir={straight}"])
  proc = _cli(flags + [f"--workdir={workdir}"], faults={"sigint_at_batch": [3]})
  assert proc.returncode == 0
  assert "SIGINT (Ctrl-C): every process saved step 4" in proc.stdout, proc.stdout
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  assert ckpt_lib.exported_steps(workdir) == [4]
  with open(os.path.join(workdir, "daa_jax.log")) as f:
    assert f.read().count("checkpoint: saving step 4") == 1
  _cli(flags + [f"--workdir={workdir}"])
  assert [m["step"] for m in metrics(workdir)] == list(range(1, 9))
  assert ckpt_lib.exported_steps(workdir) == [4, 8]
  for step in (4, 8):
    for x, y in zip(jax.tree.leaves(final_params(straight, step)),
                    jax.tree.leaves(final_params(workdir, step))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
  workdir = str(tmp_path)
  proc = _cli(["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
               f"--workdir={workdir}"], check=False, faults={"sigint_at_batch": [3, 3]})
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert "daa_jax: aborted by a second Ctrl-C without saving" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]


def test_ctrl_c_in_process_sets_the_flag_and_a_second_one_raises():
  from daa_jax.train import preemption  # pylint: disable=g-import-not-at-top
  with preemption.deferred():
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested() and preemption.signal_name() == "SIGINT (Ctrl-C)"
    assert "SIGINT (Ctrl-C) during" in str(preemption.preempted())
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert not preemption.requested() and preemption.signal_name() == "SIGTERM"


def test_user_errors_exit_with_one_paragraph(tmp_path):
  proc = _cli(["--config=configs/tiny.py:job=daa", "--config.objective.beta=-1",
               f"--workdir={tmp_path}"], check=False)
  assert proc.returncode == 2
  assert "config.objective.beta=-1" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli(["--config=configs/tiny.py:job=daa", "--config.train.bogus=1",
               f"--workdir={tmp_path}"], check=False)
  assert proc.returncode == 2
  assert "--config.train.bogus=1" in proc.stderr and "'bogus'" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("updates,message", [
    ({"objective.beta": 0.0}, "config.objective.beta=0.0 must be > 0"),
    ({"mesh": (3, 1, 1)}, "config.mesh=(3, 1, 1) does not divide the 8 devices"),
    ({"train.batch_size": 12}, "does not split over the 8 data-parallel devices"),
    ({"train.batch_size": 16, "train.grad_accum": 3}, "not divisible by config.train.grad_accum=3"),
    ({"objective.normalize": "avg"}, "config.objective.normalize='avg'"),
    ({"model.size": "3b"}, "config.model.size='3b' is not a known size"),
])
def test_config_errors(updates, message):
  with pytest.raises(ConfigError, match=__import__("re").escape(message)):
    config_lib.validate(tiny(**updates), jax.device_count())


def test_unknown_config_argument_is_named():
  with pytest.raises(ConfigError, match="config argument 'sizee' is unknown"):
    load_config("daa", "sizee=1b")


def test_init_from_hf_weights_and_from_an_sft_run(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = transformers.GPTNeoXConfig(
      vocab_size=263, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
      intermediate_size=67, rotary_pct=0.25, max_position_embeddings=128,
      use_parallel_residual=True, tie_word_embeddings=False)
  torch.manual_seed(0)
  hf_dir = str(tmp_path / "hf")
  transformers.GPTNeoXForCausalLM(hf_cfg).save_pretrained(hf_dir)
  # SFT from the HF weights (size is then the HF checkpoint's), then DPO from the SFT run.
  sft = str(tmp_path / "sft")
  train.run(tiny("job=sft", **{"hf_model": hf_dir, "train.max_steps": 2}), sft)
  first_sft = metrics(sft)[0]
  assert first_sft["sft/nll"] > 0
  dpo = str(tmp_path / "dpo")
  c = tiny(**{"hf_model": hf_dir, "init_from": sft, "train.max_steps": 2})
  train.run(c, dpo)
  assert metrics(dpo)[0]["daa/loss"] == pytest.approx(math.log(2), abs=1e-6)
  # The SFT export that DPO started from equals what the SFT run trained (not the HF init).
  cfg = init_lib.model_config(c)
  assert cfg.hidden_size == 40 and cfg.vocab_size == 263
  mesh = init_lib.run_mesh(c)
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  shardings = sharding.param_shardings(cfg, mesh)
  loaded = init_lib.initial_params(c, cfg, mesh, shardings)
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  exported, step = ckpt_lib.load_params(sft, abstract)
  assert step == 2
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_accepts_fields_added_later_and_names_a_changed_one(tmp_path):
  c = tiny()
  train._write_config(c, str(tmp_path))
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["model"]["param_dtype"]  # a config.json written before the field existed
  path.write_text(json.dumps(old))
  train._write_config(c, str(tmp_path))  # resumes
  changed = tiny(**{"objective.beta": 0.5})
  with pytest.raises(ConfigError, match=r"different config.objective \(objective.beta: 0.1 then, 0.5 now\)"):
    train._write_config(changed, str(tmp_path))


def test_init_from_a_relative_run_dir_loads_its_export(tmp_path, monkeypatch):
  # orbax restores only from absolute paths; a relative init_from (runs/sft, as the README
  # types it) used to fail inside orbax and be reported as a model mismatch.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  export = tmp_path / "runs" / "sft" / "params" / "3" / "params"  # the earlier layout
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(export, params)
  monkeypatch.chdir(tmp_path)
  abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
  loaded, step = ckpt_lib.load_params("runs/sft", abstract)
  assert step == 3
  np.testing.assert_array_equal(np.asarray(loaded["w"]), params["w"])


@pytest.mark.parametrize("make,expected", [
    (lambda d: None, "does not exist or is not a directory"),
    (lambda d: os.makedirs(d), "holds no checkpoint"),
    (lambda d: (os.makedirs(os.path.join(d, "checkpoints")),
                open(os.path.join(d, "config.json"), "w").write("{}")), "holds no checkpoint"),
])
def test_init_from_without_a_checkpoint_says_so(tmp_path, make, expected):
  run_dir = str(tmp_path / "sft")
  make(run_dir)
  config = tiny("job=daa", init_from=run_dir)
  with config.unlocked():
    config.model.size = "auto"
  with pytest.raises(CheckpointError) as e:
    train.run(config, str(tmp_path / "dpo"))
  message = str(e.value)
  assert f"config.init_from={run_dir!r}" in message and expected in message, message
  assert "do not match" not in message and "\n" not in message
