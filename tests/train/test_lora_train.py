"""LoRA training (`train/lora_state.py`): adapters-only state, the base as the reference,
checkpoints of adapters with the base's fingerprint, resume, a changed base refused."""

import json
import os

import jax
import numpy as np
import pytest

from daa_jax.data import pipeline as data_pipeline
from daa_jax.errors import CheckpointError, ConfigError
from daa_jax.models import config as model_configs
from daa_jax.models import hf_convert
from daa_jax.models import lora
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.train import loop as train
from daa_jax.train import lora_export
from daa_jax.train import lora_state
from daa_jax.train import optim
from daa_jax.train import step as step_lib

from test_train import _cli, final_params, metrics, tiny  # noqa: E402  (tests/train on sys.path)

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}


def _adapters(workdir, step, rank=4, target="attention"):
  base = model_lib.abstract_params(model_configs.pythia("tiny"))
  return ckpt_lib.load_params(f"{workdir}@{step}", lora.abstract_adapters(base, rank, target))[0]


def test_step_trains_only_adapters_and_the_reference_is_the_base_bitwise():
  c = tiny()
  cfg = model_configs.pythia("tiny")
  model = model_lib.CausalLM(cfg)
  base = model_lib.init_params(cfg, jax.random.key(0))
  base_copy = jax.tree.map(np.array, base)
  adapters = lora.init_adapters(base, 4, "attention", jax.random.key(1))
  tx, _ = optim.make(c.optim, 10)
  state = step_lib.init_state(adapters, tx)
  # The optimizer state holds adapter-shaped leaves only (AdamW: mu and nu).
  opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  assert {x.shape for x in opt_leaves} == {x.shape for x in jax.tree.leaves(adapters)}
  assert sum(x.size for x in opt_leaves) == 2 * model_lib.param_count(adapters)
  assert model_lib.param_count(adapters) < model_lib.param_count(base) / 10
  ds = data_pipeline.load_pairs(c.data, "train")
  batch = next(iter(data_pipeline.Loader(ds, batch_size=16, seed=0)))
  batch.pop("index")
  hp = step_lib.hparams_from_config(c.objective)
  scfg = step_lib.StepConfig(kind="daa", objective="dpo", lora=True, lora_scale=2.0)
  train_fn = jax.jit(lambda s, r, b: step_lib.train_step(s, r, b, hp, model=model, tx=tx,
                                                         cfg=scfg))
  eval_fn = jax.jit(lambda p, r, b: step_lib.eval_step(p, r, b, hp, model=model, cfg=scfg))
  # The reference pass (what the cached mode stores) of the plain model on the base.
  base_logps = np.asarray(jax.jit(lambda p, b: step_lib.pair_logps(model, p, b))(base, batch))
  for i in range(3):
    _, ev = eval_fn(state.params, base, batch)
    np.testing.assert_array_equal(np.asarray(ev["ref_logps"]), base_logps)
    if i == 0:  # B = 0: the policy is the base
      np.testing.assert_array_equal(np.asarray(ev["policy_logps"]), base_logps)
    state, m = train_fn(state, base, batch)
    assert float(m["train/nonfinite"]) == 0
  _, ev = eval_fn(state.params, base, batch)
  np.testing.assert_array_equal(np.asarray(ev["ref_logps"]), base_logps)
  assert np.abs(np.asarray(ev["policy_logps"]) - base_logps).max() > 1e-3  # it moved
  for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy)):
    np.testing.assert_array_equal(np.asarray(x), y)  # the base is bitwise unchanged
  assert all(np.asarray(v).any() for p, v in lora.flatten(state.params).items() if p[-1] == "b")


def test_lora_grad_accumulation_equals_one_big_batch():
  c = tiny()
  cfg = model_configs.pythia("tiny")
  model = model_lib.CausalLM(cfg)
  base = model_lib.init_params(cfg, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(
      base, 4, "all_linear", jax.random.key(1)))
  tx, _ = optim.make(c.optim, 10)
  ds = data_pipeline.load_pairs(c.data, "train")
  batch = next(iter(data_pipeline.Loader(ds, batch_size=16, seed=0)))
  batch.pop("index")
  hp = step_lib.hparams_from_config(c.objective)
  out = {}
  for accum in (1, 4):
    scfg = step_lib.StepConfig(kind="daa", objective="dpo", lora=True, lora_scale=2.0,
                               grad_accum=accum)
    out[accum] = jax.jit(lambda s, r, b, scfg=scfg: step_lib.train_step(
        s, r, b, hp, model=model, tx=tx, cfg=scfg))(step_lib.init_state(adapters, tx), base,
                                                    batch)
  for k in ("loss/total", "opt/grad_norm"):
    np.testing.assert_allclose(out[1][1][k], out[4][1][k], rtol=1e-5)
  # One AdamW step moves each adapter entry by about lr (1e-3) either way: the same way.
  for x, y in zip(jax.tree.leaves(out[1][0].params), jax.tree.leaves(out[4][0].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5)


def test_lora_dropout_step_starts_at_the_base_loss_and_draws_fresh_masks_each_step():
  """With B = 0 the adapter branch is zero whatever the mask, so step 1's loss equals the
  no-dropout step's bitwise; later steps differ from it, a rerun reproduces them bitwise, and
  each step draws other masks (the step with the same params and batch gives another loss)."""
  c = tiny()
  cfg = model_configs.pythia("tiny")
  model = model_lib.CausalLM(cfg)
  base = model_lib.init_params(cfg, jax.random.key(0))
  adapters = lora.init_adapters(base, 4, "all_linear", jax.random.key(1))
  tx, _ = optim.make(c.optim, 10)
  ds = data_pipeline.load_pairs(c.data, "train")
  batch = next(iter(data_pipeline.Loader(ds, batch_size=16, seed=0)))
  batch.pop("index")
  hp = step_lib.hparams_from_config(c.objective)

  def losses(dropout, grad_accum=1):
    scfg = step_lib.StepConfig(kind="daa", objective="dpo", lora=True, lora_scale=2.0,
                               lora_dropout=dropout, grad_accum=grad_accum)
    fn = jax.jit(lambda s, r, b: step_lib.train_step(s, r, b, hp, model=model, tx=tx,
                                                     cfg=scfg))
    state, out = step_lib.init_state(adapters, tx), []
    for _ in range(3):
      state, m = fn(state, base, batch)
      out.append(float(m["loss/total"]))
    # The same params and batch as step 3, at step 4's counter: other masks, another loss.
    again = fn(state._replace(step=state.step), base, batch)[1]
    moved = fn(state._replace(step=state.step + 1), base, batch)[1]
    return out, float(again["loss/total"]), float(moved["loss/total"])

  plain, dropped, rerun = losses(0.0), losses(0.3), losses(0.3)
  assert dropped == rerun
  assert dropped[0][0] == plain[0][0]
  assert dropped[0][1] != plain[0][1] and dropped[0][2] != plain[0][2]
  assert dropped[1] != dropped[2]
  assert plain[1] == plain[2]  # no dropout: the step counter does not matter
  # grad_accum 2: each micro-batch draws its own key; step 1 is still the base's loss (the
  # sum of two half-batch means: float32 rounding apart) and training goes on finite.
  accum = losses(0.3, grad_accum=2)
  np.testing.assert_allclose(accum[0][0], plain[0][0], rtol=1e-6)
  assert all(np.isfinite(accum[0])) and accum[0][1] != dropped[0][1]


def test_cached_reference_equals_the_base_pass_and_checkpoints_hold_adapters(tmp_path):
  plain, with_lora = str(tmp_path / "plain"), str(tmp_path / "lora")
  train.run(tiny(**{"objective.reference": "cached", "train.max_steps": 2}), plain)
  s = train.run(tiny(**LORA, **{"objective.reference": "cached", "train.max_steps": 4}),
                with_lora)
  assert s["status"] == "finished" and np.isfinite(s["daa/loss"])
  (p_file,), (l_file,) = (sorted(f for f in os.listdir(os.path.join(d, "cache"))
                                 if f.startswith("ref_logps_train")) for d in (plain, with_lora))
  np.testing.assert_array_equal(np.load(os.path.join(plain, "cache", p_file)),
                                np.load(os.path.join(with_lora, "cache", l_file)))
  # A live-reference LoRA run: same losses as the cached one.
  live = str(tmp_path / "live")
  train.run(tiny(**LORA, **{"train.max_steps": 4}), live)
  for m, n in zip(metrics(live), metrics(with_lora)):
    np.testing.assert_allclose(m["loss/total"], n["loss/total"], rtol=1e-5)
  # The checkpoint: adapters and their optimizer state only, with the base's fingerprint.
  adapters = _adapters(with_lora, 4)
  assert {p[-1] for p in lora.flatten(adapters)} == {"a", "b"}
  # On disk, against the full run's state written by the same orbax (its metadata and file
  # layout vary between orbax versions, so no absolute byte count): params + AdamW moments of
  # the whole model there, a rank-4 attention adapter and its moments here.
  def state_bytes(run, step):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(
        os.path.join(run, "checkpoints", str(step), "state")) for f in fs)
  assert state_bytes(with_lora, 4) < state_bytes(plain, 2) / 5, (
      state_bytes(with_lora, 4), state_bytes(plain, 2))
  record = json.load(open(os.path.join(with_lora, "lora_base.json")))
  assert record["source"] == "scratch:tiny:seed0" and len(record["fingerprint"]) == 16
  cfg = json.load(open(os.path.join(with_lora, "config.json")))
  assert cfg["reference_model"] == "the base, adapters off: scratch:tiny:seed0"


def test_lora_resume_after_sigkill_is_bitwise_identical(tmp_path):
  flags = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
           "--config.model.lora.rank=4", "--config.model.lora.target=all_linear",
           "--config.model.lora.dropout=0.1", "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=True",
           "--config.checkpoint.epoch_fractions=(0.5,)"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _cli(flags + [f"--workdir={straight}"])
  proc = _cli(flags + [f"--workdir={killed}"], check=False, faults={"sigkill_mid_save": 6})
  assert proc.returncode == -9, proc.stderr[-2000:]
  _cli(flags + [f"--workdir={killed}"])
  a, b = (_adapters(d, 8, target="all_linear") for d in (straight, killed))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [m["step"] for m in metrics(killed)] == list(range(1, 9))
  for m, n in zip(metrics(killed), metrics(straight)):
    assert m["loss/total"] == n["loss/total"], m["step"]


def test_a_base_changed_under_the_checkpoint_is_refused_naming_both_fingerprints(tmp_path):
  cfg = model_configs.pythia("tiny")
  hf_dir = str(tmp_path / "base")
  hf_convert.save_pretrained(cfg, model_lib.init_params(cfg, jax.random.key(3)), hf_dir)
  run = str(tmp_path / "run")
  c = tiny("job=sft", **LORA, **{"train.max_steps": 2, "hf_model": hf_dir})
  train.run(c, run)
  before = json.load(open(os.path.join(run, "lora_base.json")))["fingerprint"]
  hf_convert.save_pretrained(cfg, model_lib.init_params(cfg, jax.random.key(4)), hf_dir)
  with pytest.raises(CheckpointError) as e:
    train.run(tiny("job=sft", **LORA, **{"train.max_steps": 2, "hf_model": hf_dir}), run)
  message = str(e.value)
  assert before in message and "fingerprint" in message and "fresh --workdir" in message
  assert "\n" not in message
  now = message.split("has fingerprint ")[1].split(":")[0]
  assert now != before and len(now) == 16


@pytest.mark.parametrize("updates, message", [
    ({"model.lora.dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"model.lora.dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ({"model.lora.alpha": 0.0}, "alpha=0.0 must be > 0"),
    ({"guard.enabled": True}, "guard"),
    ({"objective.ref_update": "hard"}, "TR-DPO's reference updates"),
    ({"model.lora.rank": -1}, "rank=-1 must be >= 0"),
])
def test_lora_config_errors(updates, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(tiny(**{**LORA, **updates}))


def test_lora_is_off_by_default_and_rank_0_or_disabled_trains_full_params(tmp_path):
  c = tiny()
  assert c.model.lora.rank == 0
  s = train.run(tiny(**{"model.lora.rank": 4, "model.lora.enabled": False,
                        "train.max_steps": 1}), str(tmp_path / "off"))
  assert s["status"] == "finished"
  assert not os.path.exists(str(tmp_path / "off" / "lora_base.json"))
  full = final_params(str(tmp_path / "off"), 1)  # a full-params export
  assert "kernel" in full["layers_0"]["attention"]["dense"]


@pytest.mark.parametrize("size, dropout", [("tiny-llama", 0.0), ("tiny", 0.1)],
                         ids=["llama", "gpt_neox-dropout"])
def test_cli_sft_then_dpo_with_lora_reference_is_the_merged_sft(tmp_path, size, dropout):
  """SFT with LoRA, then DPO with a fresh adapter over the SFT adapter merged into its base
  (the reference is that merged SFT model, as config.json says), then evaluation: a Llama
  and a GPT-NeoX (Pythia) model, the latter with adapter dropout."""
  sft, dpo, full = (str(tmp_path / n) for n in ("sft", "dpo", "full"))
  common = ["--config.model.lora.rank=4", "--config.train.max_steps=4",
            f"--config.model.lora.dropout={dropout}",
            "--config.checkpoint.epoch_fractions=(0.25,)"]
  _cli([f"--config=configs/tiny.py:job=sft,size={size}", "--config.optim.lr=1e-2",
        f"--workdir={sft}"] + common)
  _cli([f"--config=configs/tiny.py:job=daa,size={size}", f"--config.init_from={sft}",
        f"--workdir={dpo}"] + common)
  # The same DPO without LoRA from the same SFT run: its initial params (= reference) are the
  # merged SFT model too.
  _cli([f"--config=configs/tiny.py:job=daa,size={size}", f"--config.init_from={sft}",
        "--config.train.max_steps=1", f"--workdir={full}"])
  cfg = json.load(open(os.path.join(dpo, "config.json")))
  assert cfg["reference_model"] == f"the base, adapters off: init_from:{sft}@4"
  assert cfg["model"]["lora"]["rank"] == 4 and cfg["model"]["lora"]["dropout"] == dropout
  first, ref_full = metrics(dpo)[0], metrics(full)[0]
  np.testing.assert_allclose(first["daa/loss"], np.log(2), rtol=1e-6)  # policy = reference
  for k in ("logps/ref_chosen", "logps/ref_rejected"):
    np.testing.assert_allclose(first[k], ref_full[k], rtol=1e-5)
  # ...and not the raw base: the SFT adapters moved the log-probs.
  sft_m = metrics(sft)
  assert sft_m[-1]["sft/nll"] < sft_m[0]["sft/nll"]
  _, _, _, sft_adapters, _ = lora_export.load_run(sft)
  if dropout:  # PEFT's adapter_config.json records the training rate
    lora_export.export(sft, peft_dir=str(tmp_path / "peft"))
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["lora_dropout"] == dropout
  assert all(np.abs(np.asarray(v)).max() > 1e-4
             for p, v in lora.flatten(sft_adapters).items() if p[-1] == "b")
  proc = _cli(["--config=configs/eval.py", "--config.eval.num_prompts=8",
               "--config.eval.batch_size=8", "--config.eval.num_pairs=16", f"--workdir={dpo}"])
  summary = json.load(open(os.path.join(dpo, "eval", "4", "summary.json")))
  assert summary["step"] == 4 and summary["kl"] > 0, proc.stderr[-2000:]


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_shard_with_the_logical_axes_of_their_base_kernels(scan):
  """On an fsdp x tensor mesh `a` [.., in, r] takes its kernel's spec on the input dim and
  `b` [.., r, out] on the output dim (rank replicated), for every targeted kernel."""
  cfg = model_configs.pythia("tiny").replace(scan_layers=scan)
  mesh = sharding.make_mesh((1, 2, 4))
  base_shardings = sharding.param_shardings(cfg, mesh)
  abstract, shardings = lora_state.adapter_layout(
      tiny(**LORA, **{"model.lora.target": "all_linear"}), model_lib.abstract_params(cfg),
      mesh, base_shardings)
  kernels, flat = lora.flatten(base_shardings), lora.flatten(shardings)
  assert len(flat) == 2 * 4 * (1 if scan else cfg.num_hidden_layers)
  split = 0
  for path, s in flat.items():
    k = tuple(kernels[path[:-1] + ("kernel",)].spec)
    k += (None,) * ((3 if scan else 2) - len(k))
    want = k[:-2] + ((k[-2], None) if path[-1] == "a" else (None, k[-1]))
    assert tuple(s.spec) + (None,) * (len(want) - len(s.spec)) == want, (path, s.spec, k)
    split += any(want)
  assert split == len(flat)  # every adapter of the tiny model is split on some axis
  placed = jax.jit(lambda: lora.init_adapters(model_lib.abstract_params(cfg), 4, "all_linear",
                                              jax.random.key(0)), out_shardings=shardings)()
  one = next(iter(lora.flatten(placed).values()))
  assert one.addressable_shards[0].data.size < one.size  # no device holds a whole adapter


def test_lora_on_an_fsdp_tensor_mesh_trains_as_on_a_data_mesh(tmp_path):
  """The sharded adapters (mesh 1x2x4, with full remat and 2 accumulated micro-batches)
  give the losses and adapters of mesh 8x1x1 (no remat, one batch)."""
  runs = {}
  for name, mesh, remat, accum in (("data", (8, 1, 1), "none", 1),
                                   ("fsdp_tensor", (1, 2, 4), "full", 2)):
    runs[name] = str(tmp_path / name)
    train.run(tiny(**LORA, **{"model.lora.target": "all_linear", "train.max_steps": 3,
                              "mesh": mesh, "model.remat_policy": remat,
                              "train.grad_accum": accum}), runs[name])
  for m, n in zip(metrics(runs["data"]), metrics(runs["fsdp_tensor"])):
    np.testing.assert_allclose(m["loss/total"], n["loss/total"], rtol=0, atol=1e-6)
  a, b = (_adapters(runs[k], 3, target="all_linear") for k in ("data", "fsdp_tensor"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
