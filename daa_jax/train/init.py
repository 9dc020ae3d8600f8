"""A run's model config, mesh, initial params and optimizer-state shardings: shared by the trainer, evaluation and the planner."""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.models import gpu_flash
from daa_jax.models import hf_convert
from daa_jax.models import lora as lora_lib
from daa_jax.train import attention_config
from daa_jax.train import lora_state
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax import errors
from daa_jax.errors import ConfigError
from daa_jax.models import config as model_configs
from daa_jax.data import pipeline as data_pipeline

PyTree = Any


def model_config(config, vocab_size: int | None = None,
                 platform: str | None = None) -> model_configs.ModelConfig:
  """The `ModelConfig` of a run: HF checkpoint's if `config.hf_model`, else the size table's.

  `attention_impl='auto'` is resolved here, for `platform` (default `jax.default_backend()`;
  the planner passes its target): `attention_kernel`. A kernel that cannot run the model
  exactly ('gpu_flash' with soft-capping) is refused here, before any expensive work.
  """
  cfg = _model_config(config, vocab_size)
  if cfg.attention_impl == "auto":
    cfg = cfg.replace(attention_impl=attention_kernel(config, platform, cfg)[0])
  if cfg.attention_impl == "gpu_flash":
    gpu_flash.check_config(cfg)
  return cfg


def attention_kernel(config, platform: str | None = None,
                     cfg: model_configs.ModelConfig | None = None) -> tuple[str, str]:
  """(kernel, reason): what `config.model.attention_impl` runs on `platform` (default
  `jax.default_backend()`); 'auto' per `attention_config.resolve_auto`, else itself."""
  impl = config.model.get("attention_impl")
  if impl != "auto":
    return str(impl), "as configured"
  cfg = cfg or _model_config(config)
  return attention_config.resolve_auto(cfg, platform or jax.default_backend(),
                                       config.get("job"), config.train.get("packing", True))


def _model_config(config, vocab_size: int | None = None) -> model_configs.ModelConfig:
  m = config.model
  exec_opts = dict(dtype=m.dtype, param_dtype=m.get("param_dtype", "float32"),
                   scan_layers=m.scan_layers, remat_policy=m.remat_policy,
                   attention_impl=m.attention_impl)
  if config.get("hf_model"):
    cfg = hf_convert.load_config(config.hf_model).replace(**exec_opts)
  else:
    overrides = dict(exec_opts)
    if m.get("vocab_size"):
      overrides["vocab_size"] = int(m.vocab_size)
    cfg = model_configs.pythia(m.size, **overrides)
  if vocab_size is not None and vocab_size > cfg.vocab_size:
    raise ConfigError(
        f"the tokenizer has {vocab_size} tokens but config.model (size {m.size!r}) has "
        f"vocab_size={cfg.vocab_size}; set --config.model.vocab_size={vocab_size} or larger.")
  return cfg


def reference_identity(config) -> str:
  """What the initial (= reference) params are, for cache keys."""
  if config.get("init_from"):
    run_dir, _, step = str(config.init_from).partition("@")
    steps = ckpt_lib.exported_steps(run_dir)
    return f"init_from:{os.path.abspath(run_dir)}@{step or (steps[-1] if steps else '?')}"
  if config.get("hf_model"):
    return f"hf:{config.hf_model}"
  return f"scratch:{config.model.size}:seed{config.seed}"


def initial_params(config, model_cfg, mesh, param_shardings) -> PyTree:
  """Params at step 0: `init_from` -> `hf_model` -> scratch (seeded)."""
  run_lora = config.get("init_from") and lora_state.run_lora(
      str(config.init_from).partition("@")[0])
  if run_lora:  # a LoRA run: its base merged with its adapters
    return _merged_lora_run(str(config.init_from), run_lora, model_cfg, mesh, param_shardings)
  if config.get("init_from"):
    abstract = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                              jax.random.key(0))
    abstract = ckpt_lib.abstract_with_shardings(abstract, param_shardings)
    params, step = ckpt_lib.load_params(config.init_from, abstract)
    logging.info("init: params from %s (step %d)", config.init_from, step)
    return params
  if config.get("hf_model"):
    _, host_params = hf_convert.load_pretrained(
        config.hf_model, dtype=jnp.dtype(model_cfg.param_dtype), config_overrides=dict(
            dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
            scan_layers=model_cfg.scan_layers,
            remat_policy=model_cfg.remat_policy, attention_impl=model_cfg.attention_impl))
    logging.info("init: params from HF %s", config.hf_model)
    return sharding.place_params(host_params, param_shardings)
  logging.info("init: from scratch (seed %d)", config.seed)
  return sharding.init_params_sharded(model_cfg, mesh, jax.random.key(config.seed))


def lora_run_parts(spec, run_cfg, model_cfg, mesh, param_shardings):
  """(base, adapters, step) of LoRA run `spec` (`RUN_DIR[@STEP]`): its own base (its
  init_from, hf_model or seeded scratch init, checked against the fingerprint it recorded)
  and the adapters exported at that step (the latest without @STEP)."""
  run_dir = spec.partition("@")[0]
  base = initial_params(run_cfg, model_cfg, mesh, param_shardings)
  lora_state.check_base(lora_state.read_base_record(run_dir), lora_state.base_record(
      reference_identity(run_cfg), lora_state.fingerprint(base)), run_dir)
  # The adapters as the LoRA run stored them (its scan_layers), then in this layout.
  n, stored_scan = model_cfg.num_hidden_layers, bool(run_cfg.model.get("scan_layers", False))
  layout = {True: model_lib.to_scan_layout, False: model_lib.from_scan_layout}
  abstract_base, base_shardings = jax.eval_shape(lambda: base), param_shardings
  if stored_scan != model_cfg.scan_layers:
    abstract_base = jax.eval_shape(lambda: layout[stored_scan](base, n))
    base_shardings = sharding.param_shardings(model_cfg.replace(scan_layers=stored_scan), mesh)
  abstract, shardings = lora_state.adapter_layout(run_cfg, abstract_base, mesh, base_shardings)
  adapters, step = ckpt_lib.load_params(spec, ckpt_lib.abstract_with_shardings(
      abstract, shardings))
  if stored_scan != model_cfg.scan_layers:
    adapters = layout[model_cfg.scan_layers](adapters, n)
  return base, adapters, step


def _merged_lora_run(spec, run_cfg, model_cfg, mesh, param_shardings) -> PyTree:
  """The params of LoRA run `spec`: its base merged with its adapters (`lora_run_parts`),
  in `model_cfg.param_dtype`."""
  base, adapters, step = lora_run_parts(spec, run_cfg, model_cfg, mesh, param_shardings)
  dtype, scale = jnp.dtype(model_cfg.param_dtype), lora_state.scale(run_cfg)
  merged = jax.jit(lambda b, a: jax.tree.map(lambda x: x.astype(dtype), lora_lib.merge(
      b, a, scale)), out_shardings=param_shardings)(base, adapters)
  logging.info("init: params from LoRA run %s (step %d), adapters merged into its base", spec,
               step)
  return merged


def run_params(spec: str, abstract: PyTree, model_cfg, mesh) -> PyTree:
  """Exported params of run `RUN_DIR@STEP` onto `abstract`'s shardings; a LoRA run's are its
  base merged with that step's adapters."""
  run_lora = lora_state.run_lora(str(spec).partition("@")[0])
  if run_lora is None:
    return ckpt_lib.load_params(spec, abstract)[0]
  shardings = jax.tree.map(lambda x: x.sharding, abstract)
  return _merged_lora_run(str(spec), run_lora, model_cfg, mesh, shardings)


def opt_state_shardings(tx, abstract_params, param_shardings, mesh):
  """Optimizer-state shardings: each per-parameter leaf (e.g. RMSprop's `nu`) is sharded
  like its parameter; scalars (counts) are replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def run_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh; a mesh smaller than the machine (no -1) uses the first devices."""
  shape = tuple(config.mesh)
  devices = jax.devices()
  if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
    devices = devices[:math.prod(shape)]
  return sharding.make_mesh(shape, devices=devices)


def _size_of(model_cfg) -> str | None:
  """The size-table name (any family) with this architecture, if any."""
  for name, fields in model_configs.SIZES.items():
    if all(getattr(model_cfg, k, None) == v for k, v in fields.items() if k != "vocab_size"):
      return name
  return None


def resolve_auto(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with its 'auto' fields made concrete (what config.json records).

  `model.size='auto'`: the `init_from` run's size (and its `hf_model` when that run had no
  Pythia size), else the size matching `hf_model`'s architecture, else `tiny` from scratch
  (with a warning unless the data is the synthetic task). `data.max_length` /
  `max_prompt_length` = 0: fitted to the training data (`data.resolve_lengths`).
  """
  config = config.copy_and_resolve_references()
  m = config.model
  if m.size == "auto":
    if config.get("init_from"):
      run_dir = str(config.init_from).partition("@")[0]
      ckpt_lib.require_run_dir(config.init_from)  # a missing checkpoint, named as such
      path = epath.Path(run_dir) / "config.json"
      if not path.exists():
        raise ConfigError(f"config.init_from={config.init_from!r}: {path} does not exist, so "
                          "config.model.size=auto cannot follow that run; set "
                          "--config.model.size to the size it was trained at.")
      init_cfg = json.loads(path.read_text())
      m.size = init_cfg.get("model", {}).get("size", "auto")
      if m.size == "auto" and not config.get("hf_model") and init_cfg.get("hf_model"):
        config.hf_model = init_cfg["hf_model"]
    elif config.get("hf_model"):
      m.size = _size_of(hf_convert.load_config(config.hf_model)) or "auto"
    else:
      m.size = "tiny"
      if config.data.source != "synthetic":
        errors.warn_misfit(
            "config.model.size=auto with neither config.init_from nor config.hf_model: "
            "training a tiny model (2 layers, width 64) from scratch. To start from Pythia "
            "weights as the paper does, give --config.hf_model=EleutherAI/pythia-1b (its size "
            "follows) or an SFT run with --config.init_from=RUN_DIR; or pick a size "
            "(configs/daa.py:size=410m).")
  if lora_state.enabled(config):  # what the reference is, in config.json
    with config.unlocked():
      config.reference_model = f"the base, adapters off: {reference_identity(config)}"
  kernel, reason = attention_kernel(config)
  with config.unlocked():  # in config.json: what ran ('auto' stays, eval resolves it again)
    config.model.attention_kernel = kernel
  logging.info("attention: %s (config.model.attention_impl=%r; %s)", kernel,
               config.model.attention_impl, reason)
  max_positions = model_config(config).max_position_embeddings
  data_pipeline.resolve_lengths(config.data, "pairs" if config.job == "daa" else "sft", workdir,
                           max_positions)
  return config
