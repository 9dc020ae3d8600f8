"""`run(config, workdir)`: SFT and DAA training, readable top to bottom.

  1. validate the config, write `config.json`, build the mesh;
  2. load and tokenize the data (all validation happens here, before any compile);
  3. abstract state and shardings from shapes (`jax.eval_shape`), never from real arrays;
  4. init or restore, in this order: the workdir's latest checkpoint -> `config.init_from`
     (a daa_jax run, e.g. the SFT run) -> `config.hf_model` (HF weights) -> scratch;
  5. the reference: a frozen copy of the initial params (never donated, no optimizer state),
     or reference log-probs precomputed once and cached on disk;
  6. the jitted step with explicit shardings and donation, then an ordinary `for` loop with
     logging, schedule checkpoints, SIGTERM/Ctrl-C handling and a non-finite guard.

A SIGTERM or Ctrl-C to any process stops every process at the same point (`preemption`): inside the
loop they all save the same step and return with status 'preempted'; before it they all
raise `preemption.Preempted` (nothing half-written: checkpoints commit atomically, the
reference cache is written aside and renamed).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from daa_jax import checkpoint as ckpt_lib
from daa_jax import config_lib
from daa_jax import data as data_lib
from daa_jax import hf_convert
from daa_jax import metrics as metrics_lib
from daa_jax import model as model_lib
from daa_jax import optim
from daa_jax import packing as packing_lib
from daa_jax import preemption
from daa_jax import sharding
from daa_jax import step as step_lib
from daa_jax import errors
from daa_jax.errors import ConfigError, TrainingDiverged

PyTree = Any

# Jitted steps shared by the runs of one process (a sweep): same shapes, optimizer and
# objective -> the same function object -> one compilation, whatever beta is.
_STEP_CACHE: dict[Any, Any] = {}
TRACE_COUNTS: collections.Counter = collections.Counter()


def _counted(fn, name):
  """Counts Python traces of `fn` (a retrace per call would show up here, cheaply)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    TRACE_COUNTS[name] += 1
    return fn(*args, **kwargs)
  return wrapped


# --- model and params -------------------------------------------------------------------

def model_config(config, vocab_size: int | None = None) -> config_lib.ModelConfig:
  """The `ModelConfig` of a run: HF checkpoint's if `config.hf_model`, else the size table's."""
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
    cfg = config_lib.pythia(m.size, **overrides)
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


def opt_state_shardings(tx, abstract_params, param_shardings, mesh):
  """Optimizer-state shardings: each per-parameter leaf (e.g. RMSprop's `nu`) is sharded
  like its parameter; scalars (counts) are replicated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


# --- reference log-prob cache -------------------------------------------------------------

def _ref_cache_path(config, workdir, dataset, split: str) -> str:
  key = json.dumps(dict(data=dataset.fingerprint, ref=reference_identity(config),
                        model=config.model.to_dict(), split=split,
                        ref_dtype=config.objective.ref_dtype), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache_dir = config.data.get("cache_dir") or os.path.join(workdir, "cache")
  return os.path.join(cache_dir, f"ref_logps_{split}_{digest}.npy")


def compute_pair_logps(model, params, dataset, mesh, batch_size: int,
                       logps_chunk: int = 0, pack=None, between_batches=None) -> np.ndarray:
  """Log-probs `[N,2]` of every pair of `dataset` under `params` (one pass, eval order).

  `pack`: None, or `packing.packer(dataset)` to run prompt-shared packed rows (same values,
  fewer FLOPs). `between_batches`: called before each batch (the preemption agreement point).
  """
  loader = data_lib.Loader(dataset, batch_size=batch_size, seed=0, shuffle=False,
                           drop_remainder=False)
  # Every process iterates the whole (unsharded) loader and gets the logps back replicated,
  # so `device_get` works when the mesh spans several processes.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(functools.partial(step_lib.pair_logps, model, logps_chunk=logps_chunk,
                                 packing=pack is not None), out_shardings=replicated)
  out = np.zeros((len(dataset), 2), np.float32)
  for batch in loader:
    if between_batches is not None:
      between_batches()
    valid = batch.pop("valid").astype(bool)
    index = batch.pop("index")
    batch = {k: v for k, v in batch.items() if k != "ref_logps"}
    if pack is not None:
      batch = pack(batch)
    logps = np.asarray(jax.device_get(fn(params, sharding.host_to_global(
        batch, mesh, whole=True))))
    out[index[valid]] = logps[valid]
  return out


def attach_reference(config, workdir, model, ref_params_fn, dataset, mesh, split, pack=None,
                     between_batches=None):
  """Returns the dataset with a `ref_logps` column, from the on-disk cache when present.

  `pack`, `between_batches`: as for `compute_pair_logps`. The cache file is written whole
  (aside, then renamed), so an interrupted pass leaves no cache and the next start recomputes.
  """
  path = epath.Path(_ref_cache_path(config, workdir, dataset, split))  # local or gs://
  if path.exists():
    logging.info("reference log-probs: cache hit %s (no reference forward needed)", path)
    with path.open("rb") as f:
      ref = np.load(f)
  else:
    logging.info("reference log-probs: computing over %d %s pairs", len(dataset), split)
    ref = compute_pair_logps(model, ref_params_fn(), dataset, mesh,
                             batch_size=_eval_batch_size(config, mesh),
                             logps_chunk=config.train.logps_chunk, pack=pack,
                             between_batches=between_batches)
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + ".tmp")
      with tmp.open("wb") as f:
        np.save(f, ref)
      tmp.replace(path)
  return dataset.with_column("ref_logps", ref)


def _eval_batch_size(config, mesh) -> int:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.grad_accum
  return max(dp, (micro // dp) * dp)


# --- held-out preference metrics -----------------------------------------------------------

def heldout_per_pair(eval_fn, params, ref_params, hparams, batches, mesh,
                     keys=("loss", "accuracy", "rewards_chosen", "rewards_rejected")
                     ) -> dict[str, np.ndarray]:
  """The held-out loop of training and evaluation: `eval_fn` over `batches` of (host batch,
  identical on every process; valid [B] bool), returning each of `keys` (a `per_pair` entry of
  the step's metrics, or a top-level one such as `policy_logps`) for the valid rows,
  concatenated in order."""
  out = {k: [] for k in keys}
  for host, valid in batches:
    _, m = eval_fn(params, ref_params, sharding.host_to_global(host, mesh, whole=True), hparams)
    got = sharding.fetch({k: m["per_pair"][k] if k in m["per_pair"] else m[k] for k in keys})
    for k in keys:
      out[k].append(np.asarray(got[k])[valid])
  return {k: np.concatenate(v) for k, v in out.items()}


def heldout_metrics(eval_fn, params, ref_params, hparams, dataset, mesh, batch_size,
                    max_batches: int = 0, pack=None) -> dict[str, float]:
  """Mean loss, reward accuracy and margin over held-out pairs (padding rows excluded).

  `pack`: None, or a host-side batch transform (`packing.pack_pairs`) for a packed step.
  """
  loader = data_lib.Loader(dataset, batch_size=batch_size, seed=0, shuffle=False,
                           drop_remainder=False)

  def batches():
    for i, batch in enumerate(loader):
      if max_batches and i >= max_batches:
        return
      valid = batch.pop("valid").astype(bool)
      batch.pop("index")
      yield (batch if pack is None else pack(batch)), valid

  cat = heldout_per_pair(eval_fn, params, ref_params, hparams, batches(), mesh)
  margin = cat["rewards_chosen"] - cat["rewards_rejected"]
  return {"eval/loss": float(cat["loss"].mean()),
          "eval/reward_acc": float(cat["accuracy"].mean()),  # ties half, as the objective
          "eval/margin": float(margin.mean()), "eval/num_pairs": float(len(margin))}


# --- the run -----------------------------------------------------------------------------

def _write_config(config, workdir):
  """Writes `config.json`; a resumed run must keep the job, model and objective it started
  with. Fields that a later daa_jax version added (absent from the old file) are accepted."""
  path = epath.Path(workdir) / "config.json"  # local or gs://
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists():
    old, new = json.loads(path.read_text()), json.loads(text)
    for field in ("job", "model", "objective"):
      if field not in old:
        continue
      before, now = old[field], new.get(field)
      if isinstance(before, dict) and isinstance(now, dict):
        changed = sorted(k for k in before if json.dumps(before[k]) != json.dumps(now.get(k)))
      else:
        changed = [] if json.dumps(before) == json.dumps(now) else [""]
      if changed:
        what = ", ".join(
            f"{field}{'.' + k if k else ''}: {before.get(k) if k else before!r} then, "
            f"{now.get(k) if k else now!r} now" for k in changed)
        raise ConfigError(
            f"{path} was written by a run with a different config.{field} ({what}); resume "
            "with the same config or use a fresh --workdir.")
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write aside and rename: the other processes read this file while process 0 writes it.
    tmp = path.parent / "config.json.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def _saveable(state):
  """The state to hand to an asynchronous save. On CPU, host "transfers" can alias device
  buffers, and the next step donates (reuses) the state's buffers while orbax may still be
  writing; a copy keeps the saved values alive. On accelerators the device-to-host copy is a
  real copy, made before `save` returns."""
  if jax.default_backend() == "cpu":
    return jax.tree.map(jnp.copy, state)
  return state


def run_mesh(config) -> jax.sharding.Mesh:
  """The run's mesh; a mesh smaller than the machine (no -1) uses the first devices."""
  shape = tuple(config.mesh)
  devices = jax.devices()
  if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
    devices = devices[:math.prod(shape)]
  return sharding.make_mesh(shape, devices=devices)


def schedule_steps(config, steps_per_epoch: int, total_steps: int) -> list[int]:
  steps = {total_steps}
  for frac in config.checkpoint.epoch_fractions or ():
    s = int(round(float(frac) * steps_per_epoch))
    if 0 < s <= total_steps:
      steps.add(s)
  return sorted(steps)


def _size_of(model_cfg) -> str | None:
  """The size-table name (any family) with this architecture, if any."""
  for name, fields in config_lib.SIZES.items():
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
  max_positions = model_config(config).max_position_embeddings
  data_lib.resolve_lengths(config.data, "pairs" if config.job == "daa" else "sft", workdir,
                           max_positions)
  return config


# Small data sets (fit_to_data): below MIN_TRAIN_ROWS no run means anything; above it, the
# defaults adapt so that an epoch has MIN_STEPS_PER_EPOCH optimizer steps, warmup is at most
# WARMUP_FRACTION of the run and the schedule checkpoints fall on distinct steps.
MIN_TRAIN_ROWS = 16
MIN_STEPS_PER_EPOCH = 8
WARMUP_FRACTION = 0.1
# A warmup above this share of the run is adapted (to WARMUP_FRACTION); the paper's 150 of
# ~720 steps (21%) is its recipe and is kept.
WARMUP_TOO_LONG = 0.25
# A DAA run whose RMS log-ratio margin h = margin / beta ends below this (nats) has barely
# moved the policy from the reference: its accuracies are the sign of roundoff-sized margins.
MOVED_LOGRATIO = 0.05


def _total_steps(config, steps_per_epoch: int) -> int:
  t = config.train
  total = int(math.ceil(float(t.num_epochs) * steps_per_epoch))
  if t.max_steps and t.max_steps > 0:
    total = min(total, int(t.max_steps))
  return total


def _distinct(config, steps_per_epoch: int) -> bool:
  """Do the schedule checkpoints within the run land on distinct, positive steps."""
  total = _total_steps(config, steps_per_epoch)
  fracs = {float(f) for f in config.checkpoint.epoch_fractions or ()
           if float(f) * steps_per_epoch <= total + 0.5}
  steps = {int(round(f * steps_per_epoch)) for f in fracs}
  return len(steps) == len(fracs) and 0 not in steps


def fit_to_data(config: ml_collections.ConfigDict, num_train: int, data_parallel: int,
                explicit=frozenset()) -> ml_collections.ConfigDict:
  """Adapts the batch size and warmup the user did not set to a small training set.

  Args:
    config: the resolved training config (changed in place and returned).
    num_train: training examples (pairs for DAA, sequences for SFT).
    data_parallel: devices the batch is split over (mesh data x fsdp).
    explicit: dotted field paths the user set on the command line (`train.batch_size`);
      those are kept (with a warning when they make no sensible run).

  Returns:
    `config`, with `train.batch_size` (halved until an epoch has `MIN_STEPS_PER_EPOCH` steps
    and the schedule checkpoints are distinct, keeping a multiple of `data_parallel`),
    `train.grad_accum` (lowered so the micro-batch still splits) and `optim.warmup_steps`
    (above `WARMUP_TOO_LONG` of the run's steps: cut to `WARMUP_FRACTION` of them) adapted;
    one warning names the changes.

  Raises:
    DataError: fewer than `MIN_TRAIN_ROWS` training examples.
  """
  what = "pairs" if config.job == "daa" else "examples"
  if num_train < MIN_TRAIN_ROWS:
    raise errors.DataError(
        f"config.data.source={config.data.source!r} leaves {num_train} training {what} "
        f"after the held-out split (config.data.eval_fraction={config.data.eval_fraction}); "
        f"daa_jax needs at least {MIN_TRAIN_ROWS} for a run whose steps, warmup and "
        "checkpoints mean anything. Give more rows (a few hundred or more), or a separate "
        "held-out file with --config.data.eval_source so every row trains.")
  t, changes, warnings = config.train, [], []
  batch, accum = int(t.batch_size), int(t.grad_accum)

  def short(b):
    spe = num_train // b
    return spe < MIN_STEPS_PER_EPOCH or not _distinct(config, spe)

  if "train.batch_size" not in explicit:
    new_batch, new_accum = batch, accum
    while new_batch > 1 and short(new_batch):
      b = new_batch // 2
      g = new_accum if "train.grad_accum" in explicit else min(new_accum, max(b, 1))
      while g > 1 and "train.grad_accum" not in explicit and (b % g or (b // g) % data_parallel):
        g -= 1
      if b < 1 or b % g or (b // g) % data_parallel:
        break  # the mesh (or an explicit grad_accum) allows no smaller batch
      new_batch, new_accum = b, g
    if new_batch != batch:
      t.batch_size, t.grad_accum = new_batch, new_accum
      changes.append(f"train.batch_size {batch} -> {new_batch}"
                     + (f" (grad_accum {accum} -> {new_accum})" if new_accum != accum else ""))
  elif batch <= num_train and short(batch):
    warnings.append(f"config.train.batch_size={batch} (as set) gives {num_train // batch} "
                    f"optimizer step(s) per epoch of {num_train} {what}")
  spe = num_train // int(t.batch_size)
  if spe and not _distinct(config, spe):
    warnings.append(f"the schedule checkpoints (config.checkpoint.epoch_fractions) share "
                    f"steps at {spe} steps per epoch")
  total = _total_steps(config, spe) if spe else 0
  warmup = int(config.optim.warmup_steps)
  if total and "optim.warmup_steps" not in explicit and warmup > WARMUP_TOO_LONG * total:
    config.optim.warmup_steps = int(WARMUP_FRACTION * total)
    changes.append(f"optim.warmup_steps {warmup} -> {config.optim.warmup_steps}")
  if changes:
    errors.warn_misfit(
        f"{num_train} training {what} are few for this config's defaults; adapted "
        f"{', '.join(changes)} so the run has {total} optimizer steps ({spe} per epoch, "
        f"warmup at most {WARMUP_TOO_LONG:.0%} of them); config.json records the values. "
        "Set these fields with --config.* to keep your own.")
  for w in warnings:
    errors.warn_misfit(f"{w}; with so few steps the run measures little. Lower "
                       "config.train.batch_size or give more data.")
  return config


def moved_summary(summary: dict, beta: float) -> dict:
  """`policy_moved` and the RMS log-ratio margin of a DAA run's last logged step."""
  if "daa/margin" not in summary:
    return {}
  rms = math.sqrt(float(summary["daa/margin"]) ** 2 + float(summary.get("daa/margin_std", 0))
                  ** 2) / float(beta)
  return {"logratio_margin_rms": rms, "policy_moved": rms >= MOVED_LOGRATIO}


def _saved_so_far(workdir: str):
  """What a run directory holds, for the message of a SIGTERM before the loop."""
  def describe() -> str:
    steps = [int(p.name) for p in (epath.Path(workdir) / "checkpoints").glob("*")
             if p.name.isdigit()]
    if steps:
      return (f"nothing new was saved; {workdir} keeps its checkpoints up to step "
              f"{max(steps)}")
    return f"nothing was saved yet (no checkpoint in {workdir}; the run starts over)"
  return describe


def run(config: ml_collections.ConfigDict, workdir: str, explicit=None) -> dict:
  """Trains per `config.job` ('sft' or 'daa'); returns a summary dict (also logged).

  `explicit`: the dotted fields the user set (`--config.train.batch_size=...`, as `main`
  passes them); the others adapt to a small data set (`fit_to_data`). None (library callers,
  sweeps: their configs are deliberate recipes) adapts nothing. Raises
  `preemption.Preempted` on every process when any was signalled before the loop.
  """
  with preemption.deferred():
    return _train(config, workdir, explicit)


def _train(config: ml_collections.ConfigDict, workdir: str, explicit=None) -> dict:
  config_lib.validate(config, jax.device_count())
  config = resolve_auto(config, workdir)
  kind = config.job
  saved = _saved_so_far(workdir)
  preemption.set_phase("start-up", saved)
  _write_config(config, workdir)
  mesh = run_mesh(config)
  agreement = preemption.Agreement(mesh)
  is_main = jax.process_index() == 0
  logging.info("run: job=%s workdir=%s mesh=%s processes=%d devices=%d", kind, workdir,
               dict(mesh.shape), jax.process_count(), jax.device_count())

  # 2. Data first: every malformed row fails here, before any compilation.
  preemption.set_phase("data preparation", saved)
  if kind == "daa":
    train_ds = data_lib.load_pairs(config.data, "train", workdir=workdir)
    eval_ds = data_lib.load_pairs(config.data, "eval", workdir=workdir) if (
        config.train.eval_every) else None
  else:
    train_ds = data_lib.load_sft(config.data, "train", workdir=workdir)
    eval_ds = None
  logging.info("data: %d train examples; stats %s", len(train_ds), train_ds.stats)
  fitted = config if explicit is None else fit_to_data(
      config.copy_and_resolve_references(), len(train_ds),
      mesh.shape["data"] * mesh.shape["fsdp"], frozenset(explicit))
  if fitted.to_json_best_effort(sort_keys=True) != config.to_json_best_effort(sort_keys=True):
    config = fitted
    _write_config(config, workdir)  # the adapted values, as the run uses them
  model_cfg = model_config(config, train_ds.tokenizer.vocab_size)
  model = model_lib.CausalLM(model_cfg)

  t = config.train
  global_batch = t.batch_size
  # Processes that hold replicas of the same batch rows (a tensor axis across hosts) load
  # the same rows.
  shard_index, shard_count = sharding.data_shard(mesh)
  loader = data_lib.Loader(train_ds, batch_size=global_batch, seed=config.seed, shuffle=True,
                           drop_remainder=True, process_index=shard_index,
                           process_count=shard_count)
  steps_per_epoch = loader.steps_per_epoch
  if steps_per_epoch == 0:
    raise ConfigError(f"config.train.batch_size={global_batch} exceeds the {len(train_ds)} "
                      "training examples; lower it.")
  total_steps = _total_steps(config, steps_per_epoch)
  tx, lr_fn = optim.make(config.optim, total_steps)
  agreement.stop_here()  # a SIGTERM during data preparation: every process leaves here

  # 3. Shapes and shardings.
  param_shardings = sharding.param_shardings(model_cfg, mesh)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                                   jax.random.key(0))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = step_lib.TrainState(
      step=replicated, params=param_shardings,
      opt_state=opt_state_shardings(tx, abstract_params, param_shardings, mesh))
  abstract_state = jax.eval_shape(functools.partial(step_lib.init_state, tx=tx),
                                  abstract_params)
  abstract_state = ckpt_lib.abstract_with_shardings(abstract_state, state_shardings)

  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint,
                                       schedule_steps(config, steps_per_epoch, total_steps))

  # 4-5. Init or restore, and the reference.
  cached_ref = kind == "daa" and config.objective.reference == "cached"
  ref_dtype = jnp.dtype(config.objective.ref_dtype)
  cache = {}

  def initial():
    if "params" not in cache:
      cache["params"] = initial_params(config, model_cfg, mesh, param_shardings)
    return cache["params"]

  def reference():
    return jax.tree.map(lambda p: p.astype(ref_dtype), initial())

  # Packed batches: one shape per dataset (its longest pair), so the step compiles once. The
  # reference pass and the held-out metrics use the same packers.
  packing = kind == "daa" and bool(t.packing)
  pack = packing_lib.packer(train_ds) if packing else None
  eval_pack = packing_lib.packer(eval_ds) if packing and eval_ds is not None else None
  if cached_ref:
    preemption.set_phase("the reference log-prob pass", lambda: (
        saved() + "; the reference log-prob cache is written only when complete"))
    train_ds = attach_reference(config, workdir, model, reference, train_ds, mesh, "train",
                                pack, agreement.stop_here)
    loader = data_lib.Loader(train_ds, batch_size=global_batch, seed=config.seed,
                             shuffle=True, drop_remainder=True,
                             process_index=shard_index, process_count=shard_count)
    if eval_ds is not None:
      eval_ds = attach_reference(config, workdir, model, reference, eval_ds, mesh, "eval",
                                 eval_pack, agreement.stop_here)
  preemption.set_phase("initialization", saved)

  latest = checkpointer.latest_step()
  if latest is not None:
    state, meta = checkpointer.restore(latest, abstract_state)
    loader.restore(meta["data"])
    logging.info("resume: step %d from %s", latest, workdir)
    for missing in checkpointer.missing_exports():  # a run dir of the earlier layout
      old = state if missing == latest else checkpointer.restore(missing, abstract_state)[0]
      checkpointer.write_export(missing, old.params)
  else:
    init_fn = jax.jit(functools.partial(step_lib.init_state, tx=tx),
                      out_shardings=state_shardings)
    # The policy starts from a copy, so donating the state never frees the reference.
    state = init_fn(jax.tree.map(jnp.copy, initial()) if kind == "daa" and not cached_ref
                    else initial())
  if kind == "daa" and not cached_ref:
    ref_params = reference()
  else:
    ref_params = None
  cache.clear()

  # 6. The jitted step.
  scfg = step_lib.StepConfig(
      kind=kind, objective=config.objective.name if kind == "daa" else "dpo",
      normalize=config.objective.normalize if kind == "daa" else "sum",
      grad_accum=int(t.grad_accum), cached_ref=cached_ref, logps_chunk=int(t.logps_chunk),
      packing=packing)
  hparams = jax.device_put(step_lib.hparams_from_config(config.objective), replicated)
  ref_shardings = None if ref_params is None else param_shardings
  key = (kind, model_cfg, scfg, config.optim.to_json(sort_keys=True), total_steps,
         tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat),
         ref_params is None)
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(
        _counted(functools.partial(step_lib.train_step, model=model, tx=tx, cfg=scfg,
                                   lr_fn=lr_fn), "train_step"),
        in_shardings=(state_shardings, ref_shardings, None, replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  train_fn = _STEP_CACHE[key]
  eval_fn = None
  if eval_ds is not None:
    # Replicated outputs: every process reads the per-pair metrics (mesh over processes).
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model, cfg=scfg),
                      out_shardings=replicated)

  writer = metrics_lib.MetricsWriter(workdir, is_main)
  start = int(jax.device_get(state.step))
  writer.resume_at(start)  # steps logged after the checkpoint are logged again below
  progress = metrics_lib.Progress(total_steps, start, bool(t.progress) and is_main,
                                  desc=f"{kind} {os.path.basename(os.path.normpath(workdir))}")
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  seq_len = int(train_ds.max_length)
  pending: list[tuple[int, dict, float]] = []
  window_start, window_tokens = time.time(), 0.0
  summary: dict[str, Any] = {"status": "finished", "workdir": workdir}

  def flush(current_step: int):
    """Fetches pending metrics (one device_get), checks finiteness, writes them."""
    nonlocal window_start, window_tokens
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _ in pending])
    for (s, _, _), m in zip(pending, fetched):
      if m["train/nonfinite"] > 0:
        good = [c for c in checkpointer.all_steps() if c <= s]
        raise TrainingDiverged(
            f"non-finite loss or gradient at step {s} (loss={m['loss/total']}, "
            f"grad_norm={m['opt/grad_norm']}); training stopped without applying it. The last "
            f"good checkpoint is {good[-1] if good else 'none'} in {workdir}/checkpoints. Lower "
            "config.optim.lr, check the data, or use float32 (config.model.dtype).")
    elapsed = max(time.time() - window_start, 1e-9)
    tokens_per_s = window_tokens / elapsed
    flops = sum(f for _, _, f in pending) / elapsed
    last = {k: float(v) for k, v in fetched[-1].items()}
    last["perf/tokens_per_s"] = tokens_per_s
    last["perf/steps_per_s"] = len(pending) / elapsed
    last["perf/model_tflops_per_s"] = flops / 1e12
    if peak:
      last["perf/mfu"] = flops / (peak * jax.device_count())
    last["data/epoch"] = current_step / steps_per_epoch
    writer.write(current_step, last)
    progress.update(len(pending), last)
    summary.update(last)
    pending.clear()
    window_start, window_tokens = time.time(), 0.0

  agreement.stop_here()  # before the first step (and its compilation)
  preemption.set_phase("training", saved)
  with sharding.activate(mesh):
    try:
      stop = None  # the agreement dispatched at the previous step boundary
      for step in range(start, total_steps):
        host_batch = next(loader)
        host_batch.pop("index", None)
        batch = sharding.host_to_global(pack(host_batch) if pack else host_batch, mesh)
        state, m = train_fn(state, ref_params, batch, hparams)
        # Tokens of the global batch (each data shard holds its slice; replicas count once).
        tokens = float(host_batch["attention_mask"].sum()) * shard_count
        window_tokens += tokens
        pending.append((step, m, metrics_lib.step_flops(model_cfg, tokens, seq_len, kind,
                                                        cached_ref)))
        done = step + 1
        final = done == total_steps
        due_ckpt = checkpointer.should_save(done, final)
        if done % t.log_every == 0 or due_ckpt or final:
          flush(done)
        if eval_fn is not None and (done % t.eval_every == 0 or final):
          ev = heldout_metrics(eval_fn, state.params, ref_params, hparams, eval_ds, mesh,
                               _eval_batch_size(config, mesh), t.eval_batches, eval_pack)
          writer.write(done, ev)
          summary.update(ev)
        if due_ckpt:
          checkpointer.save(done, _saveable(state), {
              "data": loader.state(), "seed": int(config.seed), "step": done})
        # Every process reads the same agreed flag here (dispatched one step ago, so the host
        # never waits on the step in flight): all save this step and leave together.
        if stop is not None and agreement.read(stop):
          flush(done)
          checkpointer.save(done, _saveable(state), {
              "data": loader.state(), "seed": int(config.seed), "step": done}, export=False)
          summary["status"] = "preempted"
          break
        stop = agreement.dispatch()
    finally:
      progress.close()
      checkpointer.close()
      writer.close()
  summary["step"] = int(jax.device_get(state.step))
  if kind == "daa":
    summary.update(moved_summary(summary, config.objective.beta))
  if summary["status"] == "preempted":
    # The signalled process names its signal (SIGTERM or Ctrl-C); the others only agreed.
    name = preemption.signal_name() if preemption.requested() else "preempted"
    summary["message"] = (f"{name}: every process saved step {summary['step']} in "
                          f"{workdir}/checkpoints and stopped; run the same command again to "
                          "continue.")
  logging.info("run: %s at step %d", summary["status"], summary["step"])
  return summary
