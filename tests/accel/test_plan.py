"""accel/plan.py: the trainer's and sampler's programs lowered for CUDA on abstract pod meshes and
compiled by the TPU compiler for TPU topologies (libtpu; skipped without it), exact weight
and optimizer bytes, the precision policy, the activation formula against the TPU compiler,
and errors for bad flags."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.train import config as config_lib
from daa_jax.models import model as model_lib
from daa_jax.train import optim
from daa_jax.accel import plan
from daa_jax.errors import ConfigError
from daa_jax.models import config as model_configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e \".[tpu]\"); the TPU compiler is needed to "
           "compile for TPU topologies")
FIELDS = ("params", "grads", "opt_state", "reference", "activations", "total")
# The synthetic task's shapes, asked for by name: without flags plan refuses to size a run
# for them (test_plan_takes_its_lengths_from_the_data_as_training_does).
SYNTHETIC = dict(prompt_len=21, response_len=17)


def daa_config(size="tiny", precision="fp32", **train):
  config = config_lib.load_sibling(os.path.join(REPO, "configs", "x.py"), "daa",
                                   f"size={size},precision={precision}")
  config.train.batch_size, config.train.grad_accum = 8, 1
  config.train.update(train)
  return config


def num_params(size):
  return model_lib.param_count(model_lib.abstract_params(model_configs.pythia(size)))


def check_result(result, programs):
  assert result["lowered"] and set(result["programs"]) == set(programs)
  assert all(result["programs"][p]["lowered"] for p in programs), result["programs"]
  for field in FIELDS:
    assert result["per_device_bytes"][field] >= 0
  assert isinstance(result["fits"], bool) and isinstance(result["max_micro_batch"], int)
  json.dumps(result)  # JSON-able as printed


def test_cuda_lowers_every_program_on_two_pod_meshes_with_exact_weight_bytes():
  """160m: an 8-GPU node (fsdp 8) and a 128-device (data 2, fsdp 16, tensor 4) mesh."""
  n = num_params("160m")
  for mesh in ((1, 8, 1), (2, 16, 4)):
    config = daa_config("160m", batch_size=2 * mesh[0] * mesh[1])
    config.model.scan_layers = True  # lowers in a fraction of the unrolled time
    result = plan.plan(config, mesh, "cuda", device_memory="80GB", prompt_len=24,
                       response_len=16, fit=True)
    check_result(result, plan.PROGRAMS)
    assert not result["compiled"]  # lowered only: no CUDA compiler here
    mem = result["per_device_bytes"]
    shards = mesh[1] * mesh[2]
    # Every 160m weight divides over fsdp x tensor except norms and some biases (replicated).
    assert n * 4 / shards <= mem["params"] < n * 4 / shards * 1.03
    assert mem["grads"] == mem["params"] and mem["reference"] == mem["params"]
    assert mem["opt_state"] == mem["params"] + 4  # RMSprop's nu + the int32 step count
    assert result["max_micro_batch"] > 0 and result["max_micro_batch"] % (mesh[0] * mesh[1]) == 0
    assert result["fits"]


def test_precision_policy_sets_the_stored_bytes_exactly():
  n = num_params("tiny")
  fp32 = plan.plan(daa_config(), (1, 1, 1), "cuda", device_memory="1GB",
                   programs=["daa_live_packed"], fit=False, **SYNTHETIC)
  lean = plan.plan(daa_config(precision="bf16_state"), (1, 1, 1), "cuda",
                   device_memory="1GB", programs=["daa_live_packed"], fit=False, **SYNTHETIC)
  assert fp32["per_device_bytes"]["params"] == 4 * n == lean["per_device_bytes"]["params"]
  assert fp32["per_device_bytes"]["opt_state"] == 4 * n + 4
  assert lean["per_device_bytes"]["opt_state"] == 2 * n + 4  # bfloat16 nu, int32 count
  assert fp32["per_device_bytes"]["reference"] == 4 * n
  assert lean["per_device_bytes"]["reference"] == 2 * n
  assert lean["precision"] == {"param": "float32", "compute": "bfloat16",
                               "optimizer_state": "bfloat16", "reference": "bfloat16",
                               "log_softmax_logps_losses": "float32"}


def test_lora_plan_counts_adapters_as_trained_and_the_base_once_as_reference():
  n = num_params("tiny")
  config = daa_config()
  config.model.lora.rank = 4
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB",
                     programs=["daa_live_packed", "sft", "sample_decode"], fit=False,
                     **SYNTHETIC)
  assert result["lowered"] and result["config"]["lora_rank"] == 4
  mem = result["programs"]["daa_live_packed"]["per_device_bytes"]
  # tiny (GPT-NeoX, D 64, 2 layers): query_key_value [64, 192] and dense [64, 64] per layer.
  adapters = 2 * 4 * ((64 + 192) + (64 + 64))
  assert mem["params"] == 4 * adapters == mem["grads"]
  assert mem["opt_state"] == 4 * adapters + 4  # RMSprop's nu + the step count
  assert mem["reference"] == 4 * n  # the frozen base, once
  assert result["programs"]["sft"]["per_device_bytes"]["reference"] == 4 * n
  assert result["programs"]["sample_decode"]["per_device_bytes"]["params"] == 4 * n


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_planned_lora_step_is_the_one_that_trains_with_or_without_dropout(dropout):
  """The planner builds its StepConfig as the trainer does (`lora_state.step_fields`): with
  adapter dropout, the lowered step draws random bits (the masks); without, it does not."""
  from daa_jax.accel import devices, programs
  config = daa_config()
  config.model.lora.rank = 4
  config.model.lora.dropout = dropout
  s = programs.make_setup(config, devices.make_mesh((1, 1, 1), "cuda", None), platform="cuda",
                          **SYNTHETIC)
  fn, args = programs.build(s, "daa_live_packed", 4)
  with devices._activate(s.mesh):  # pylint: disable=protected-access
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  draws = ("threefry2x32" in text) or ("rng_bit_generator" in text)
  assert draws == (dropout > 0)


def test_bfloat16_optimizer_state_is_stored_narrow_and_updated_in_float32():
  c = config_lib.optim_fields("paper")
  c.update(warmup_steps=0, grad_clip=0.0, lr=0.1, state_dtype="bfloat16")
  tx, _ = optim.make(c, 10)
  ref_tx, _ = optim.make(_fp32(c), 10)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, 0.25, -1.0])}
  state = tx.init(params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state) if x.ndim)
  updates, state = tx.update(grads, state, params)
  expected, _ = ref_tx.update(grads, ref_tx.init(params), params)
  # One step from a zero state: nu = 0.01 g^2 is exact in bfloat16 for these g.
  np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state) if x.ndim)


def _fp32(c):
  c = c.copy_and_resolve_references()
  c.state_dtype = "float32"
  return c


def test_bad_dtype_names_the_field():
  config = daa_config()
  config.optim.state_dtype = "bf16"
  with pytest.raises(ConfigError, match=r"config\.optim\.state_dtype='bf16'.*bfloat16"):
    config_lib.validate(config, 1)
  with pytest.raises(ConfigError, match="precision='fp8' is unknown"):
    daa_config(precision="fp8")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mesh_shape=(1, 8, 1), platform="tpu", topology="v9z:3x3"), r"--topology='v9z:3x3'"),
    (dict(mesh_shape=(1, 8, 1), platform="tpu", topology="v5e:2x2"),
     r"--mesh=1,8,1 needs 8 devices but --topology=v5e:2x2 has 4"),
    (dict(mesh_shape=(1, -1, 1), platform="cuda", device_memory="80GB"), "give all three"),
    (dict(mesh_shape=(1, 8, 1), platform="cuda"), "--device_memory is needed"),
    (dict(mesh_shape=(1, 8, 1), platform="cuda", device_memory="lots"), "--device_memory='lots'"),
    (dict(mesh_shape=(1, 8, 1), platform="cuda", device_memory="8GB", programs=["dpo"]),
     "--programs: 'dpo' is unknown"),
    (dict(mesh_shape=(1, 8, 1), platform="gpu"), "--platform='gpu'"),
])
def test_bad_flags_are_config_errors_naming_the_flag(kwargs, message):
  if kwargs["platform"] == "tpu" and importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e \".[tpu]\")")
  with pytest.raises(ConfigError, match=message):
    plan.plan(daa_config(), **kwargs)


def test_cli_prints_a_table_then_one_json_line():
  cmd = [sys.executable, "-m", "daa_jax.accel.plan", "--config", "configs/daa.py:size=tiny",
         "--mesh", "1,4,1", "--platform", "cuda", "--device_memory", "16GiB",
         "--programs", "sample_decode", "--prompt_len=21", "--response_len=17",
         "--config.train.batch_size=8", "--config.train.grad_accum=1"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert result["primary"] == "daa_live_packed" and result["device_memory"] == 16 * 2**30
  assert any(line.startswith("daa_live_packed") for line in lines[:-1])
  bad = subprocess.run(cmd[:-8] + ["--mesh", "1,-1,1", "--device_memory", "8GB"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "give all three sizes" in bad.stderr
  # No data and no lengths: one paragraph naming the flags, exit 2, no traceback.
  no_lengths = [c for c in cmd if not c.startswith(("--prompt_len", "--response_len"))]
  bad = subprocess.run(no_lengths, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
  assert "--prompt_len=N --response_len=M" in bad.stderr


def write_pairs(path, n, prompt_len, response_len):
  """n JSONL pairs with prompts of `prompt_len` bytes and responses of up to `response_len`."""
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps(dict(prompt=f"q{i:04d} ".ljust(prompt_len, "x"),
                              chosen="a" * response_len,
                              rejected="b" * (response_len - 1))) + "\n")
  return str(path)


def test_plan_takes_its_lengths_from_the_data_as_training_does(tmp_path):
  """A real-data config is planned at the lengths training fits to that data, never at the
  synthetic task's 21/17; a config without data needs the lengths as flags."""
  from daa_jax.train import init as init_lib  # pylint: disable=g-import-not-at-top
  config = daa_config()
  config.data.update(source=write_pairs(tmp_path / "pairs.jsonl", 40, 100, 30), format="jsonl",
                     cache_dir=str(tmp_path / "cache"))
  trained = init_lib.resolve_auto(config, str(tmp_path)).data  # what train.run would use
  # 100 + 30 + EOS = 131 -> 136; the prompt keeps 136 - ceil8(31) = 104 (bytes tokenizer).
  assert (trained.max_length, trained.max_prompt_length) == (136, 104)
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB",
                     programs=["daa_live_packed"], fit=False)
  assert (result["config"]["prompt_len"], result["config"]["response_len"]) == (104, 32)
  assert config.data.max_length == 0  # the user's config is left as given
  # Flags win over the data (and need none of it).
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB",
                     programs=["daa_live_packed"], fit=False, prompt_len=48, response_len=16)
  assert (result["config"]["prompt_len"], result["config"]["response_len"]) == (48, 16)
  # The configs' synthetic default with 'auto' lengths: refused, naming the flags.
  with pytest.raises(ConfigError, match=r"source='synthetic'.*--prompt_len=N --response_len=M"):
    plan.plan(daa_config(), (1, 1, 1), "cuda", device_memory="1GB", fit=False)
  # Data that cannot be read here: the same flags, with the reason.
  config.data.source = str(tmp_path / "elsewhere.jsonl")
  with pytest.raises(ConfigError, match=r"could not read it.*elsewhere\.jsonl.*--prompt_len=N"):
    plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB", fit=False)
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB",
                     programs=["daa_live_packed"], fit=False, prompt_len=48, response_len=16)
  assert result["config"]["prompt_len"] == 48


@needs_libtpu
def test_tpu_compiles_every_tiny_program_for_two_topologies():
  # 4 chips each; the micro-batch fit (one more compile) on the first only.
  for topology, mesh, fit in (("v5e:2x2", (1, 4, 1), True), ("v4:2x2x1", (2, 2, 1), False)):
    config = daa_config(batch_size=8, grad_accum=2)
    result = plan.plan(config, mesh, "tpu", topology=topology, fit=fit, **SYNTHETIC)
    check_result(result, plan.PROGRAMS)
    assert result["compiled"], {k: v.get("error") for k, v in result["programs"].items()}
    assert result["device_kind"].startswith("TPU v")
    assert result["fits"] and result["max_micro_batch"] >= 4


@needs_libtpu
@pytest.mark.parametrize("topology, mesh", [("v5e:2x2", (1, 4, 1)), ("v4:2x2x1", (1, 4, 1))])
def test_tpu_compiles_the_160m_step_and_the_formula_is_within_25_percent(topology, mesh):
  """The trainer's 160m DAA step (scanned layers, full remat, bfloat16 compute) compiled by
  the TPU compiler; the CUDA formula's total on the same program and mesh within 25%."""
  config = daa_config("160m", "bf16", batch_size=16, grad_accum=2)
  config.model.update(scan_layers=True, remat_policy="full")
  result = plan.plan(config, mesh, "tpu", topology=topology, programs=["daa_live_packed"],
                     fit=False, prompt_len=120, response_len=64)
  program = result["programs"]["daa_live_packed"]
  assert result["compiled"], program.get("error")
  compiled = program["compiled_total"]
  assert abs(program["formula_total"] - compiled) <= 0.25 * compiled, (
      program["formula_total"], compiled, program["memory_analysis"])
  n = num_params("160m")
  assert n * 4 / 4 <= result["per_device_bytes"]["params"] < n * 4 / 4 * 1.02


@needs_libtpu
def test_tpu_compiles_the_splash_daa_step_with_the_mosaic_kernel():
  """attention_impl='splash' with packing='fixed': the DAA and SFT steps compile for v5e and
  v4 (the Mosaic kernel, not interpret mode) and memory is reported."""
  from daa_jax.accel import devices, programs  # pylint: disable=g-import-not-at-top
  for topology, mesh in (("v5e:2x2", (1, 4, 1)), ("v4:2x2x1", (2, 2, 1))):
    config = daa_config(batch_size=8, grad_accum=2, packing="fixed")
    config.model.attention_impl = "splash"
    result = plan.plan(config, mesh, "tpu", topology=topology,
                       programs=["daa_live_packed", "sft"], fit=False, **SYNTHETIC)
    assert result["compiled"], {k: v.get("error") for k, v in result["programs"].items()}
    assert result["config"]["attention_impl"] == "splash"
    assert result["per_device_bytes"]["total"] > 0 and result["fits"]
  s = programs.make_setup(config, devices.make_mesh(mesh, "tpu", topology), **SYNTHETIC)
  fn, args = programs.build(s, "daa_live_packed", 4)
  with devices._activate(s.mesh):  # pylint: disable=protected-access
    text = fn.trace(*args).lower().as_text()
  assert "tpu_custom_call" in text
  with pytest.raises(ConfigError, match="plan it with --platform tpu"):
    plan.plan(config, (1, 1, 1), "cuda", device_memory="1GB", fit=False, **SYNTHETIC)


@needs_libtpu
def test_tpu_compiles_windowed_splash_for_a_gemma2_model(tmp_path):
  """A Gemma-2 model whose sliding window (8) is shorter than the fixed rows: the DAA step
  (window and global layers under scan: a cond between two Mosaic kernels) and the sampler's
  prefill (through splash) compile for v5e."""
  gemma = {"model_type": "gemma2", "vocab_size": 512, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "intermediate_size": 96, "max_position_embeddings": 1024,
           "sliding_window": 8, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
           "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(gemma, f)
  config = daa_config(packing="fixed")
  config.hf_model = str(tmp_path)
  config.model.attention_impl = "splash"
  config.model.scan_layers = True
  result = plan.plan(config, (1, 4, 1), "tpu", topology="v5e:2x2",
                     programs=["daa_live_packed", "sample_prefill"], fit=False, **SYNTHETIC)
  assert result["compiled"], {k: v.get("error") for k, v in result["programs"].items()}
  assert result["config"]["attention_kernel"] == "splash"
  from daa_jax.accel import devices, programs  # pylint: disable=g-import-not-at-top
  s = programs.make_setup(config, devices.make_mesh((1, 4, 1), "tpu", "v5e:2x2"), **SYNTHETIC)
  assert s.model_cfg.sliding_window == 8 and any(s.model_cfg.sliding_layers)
  for name in ("daa_live_packed", "sample_prefill"):
    fn, args = programs.build(s, name, 4)
    with devices._activate(s.mesh):  # pylint: disable=protected-access
      text = fn.trace(*args).lower().as_text()
    assert "tpu_custom_call" in text, name
