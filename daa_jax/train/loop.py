"""`run(config, workdir)`: SFT and DAA training, readable top to bottom.

  1. validate the config, write `config.json`, build the mesh;
  2. load and tokenize the data (all validation happens here, before any compile);
  3. abstract state and shardings from shapes (`jax.eval_shape`), never from real arrays;
  4. init or restore, in this order: the workdir's latest checkpoint -> `config.init_from`
     (a daa_jax run, e.g. the SFT run) -> `config.hf_model` (HF weights) -> scratch;
  5. the reference: a frozen copy of the initial params (never donated, no optimizer state;
     with LoRA the frozen base itself, `lora_state.py`),
     or reference log-probs precomputed once and cached on disk;
  6. the jitted step with explicit shardings and donation, then an ordinary `for` loop with
     logging, schedule checkpoints, SIGTERM/Ctrl-C handling and a non-finite guard.

A `monitor` (the over-optimization guard, `daa_jax.study.guard`: training cannot import it)
watches the run at step boundaries: `monitor_factory(context)` builds it once the state and
the reference exist; `due(step, final, schedule)` says whether it looks at a step,
`observe(step, params)` looks and returns True to stop (the same answer on every process),
`state()`/`restore(state)` go into each checkpoint's metadata (a resumed run resumes its
history), `stopped` says a restored monitor had already stopped the run, and `finish(summary)`
adds its results to the summary.

A SIGTERM or Ctrl-C to any process stops every process at the same point (`preemption`): inside the
loop they all save the same step and return with status 'preempted'; before it they all
raise `preemption.Preempted` (nothing half-written: checkpoints commit atomically, the
reference cache is written aside and renamed).
"""

from __future__ import annotations

import collections
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.train import metrics as metrics_lib
from daa_jax.train import objectives
from daa_jax.models import model as model_lib
from daa_jax.train import optim
from daa_jax.train import fixed_layout
from daa_jax.train import preemption
from daa_jax.models import sharding
from daa_jax.train import step as step_lib
from daa_jax.errors import ConfigError, TrainingDiverged
from daa_jax.data import pipeline as data_pipeline
from daa_jax.train import init as init_lib
from daa_jax.train import heldout as heldout_lib
from daa_jax.train import reference as reference_lib
from daa_jax.train import reference_update as ref_update
from daa_jax.train import rundir
from daa_jax.train import fit as fit_lib
from daa_jax.train import lora_state

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


# --- reference log-prob cache -------------------------------------------------------------


# --- held-out preference metrics -----------------------------------------------------------


# --- the run -----------------------------------------------------------------------------

# The run directory's helpers (train/rundir.py), under the names tests and callers know.
_write_config = rundir.write_config
_saveable = rundir.saveable
_saved_so_far = rundir.saved_so_far


def run(config: ml_collections.ConfigDict, workdir: str, explicit=None,
        monitor_factory=None) -> dict:
  """Trains per `config.job` ('sft' or 'daa'); returns a summary dict (also logged).

  `explicit`: the dotted fields the user set (`--config.train.batch_size=...`, as `main`
  passes them); the others adapt to a small data set (`fit_to_data`). None (library callers,
  sweeps: their configs are deliberate recipes) adapts nothing. Raises
  `preemption.Preempted` on every process when any was signalled before the loop.
  `monitor_factory`: see the module docstring (None: no monitor; a DAA config with
  `guard.enabled` then needs one: `daa_jax.study.guard.run` passes it).
  """
  g = config.get("guard")
  if monitor_factory is None and config.get("job") == "daa" and g is not None and g.get(
      "enabled"):
    raise ConfigError(
        "config.guard.enabled=True, but train.loop.run was called without the guard; run it "
        "through python -m daa_jax.main (or daa_jax.study.guard.run(config, workdir)), or "
        "set --config.guard.enabled=False.")
  with preemption.deferred():
    return _train(config, workdir, explicit, monitor_factory)


def _train(config: ml_collections.ConfigDict, workdir: str, explicit=None,
           monitor_factory=None) -> dict:
  config_lib.validate(config, jax.device_count())
  config = init_lib.resolve_auto(config, workdir)
  kind = config.job
  saved = _saved_so_far(workdir)
  preemption.set_phase("start-up", saved)
  _write_config(config, workdir)
  mesh = init_lib.run_mesh(config)
  agreement = preemption.Agreement(mesh)
  is_main = jax.process_index() == 0
  logging.info("run: job=%s workdir=%s mesh=%s processes=%d devices=%d", kind, workdir,
               dict(mesh.shape), jax.process_count(), jax.device_count())

  # 2. Data first: every malformed row fails here, before any compilation.
  preemption.set_phase("data preparation", saved)
  if kind == "daa":
    train_ds = data_pipeline.load_pairs(config.data, "train", workdir=workdir)
    eval_ds = data_pipeline.load_pairs(config.data, "eval", workdir=workdir) if (
        config.train.eval_every) else None
  else:
    train_ds = data_pipeline.load_sft(config.data, "train", workdir=workdir)
    eval_ds = None
  logging.info("data: %d train examples; stats %s", len(train_ds), train_ds.stats)
  fitted = config if explicit is None else fit_lib.fit_to_data(
      config.copy_and_resolve_references(), len(train_ds),
      mesh.shape["data"] * mesh.shape["fsdp"], frozenset(explicit))
  if fitted.to_json_best_effort(sort_keys=True) != config.to_json_best_effort(sort_keys=True):
    config = fitted
    _write_config(config, workdir)  # the adapted values, as the run uses them
  model_cfg = init_lib.model_config(config, train_ds.tokenizer.vocab_size)
  model = model_lib.CausalLM(model_cfg)

  t = config.train
  global_batch = t.batch_size
  # Processes that hold replicas of the same batch rows (a tensor axis across hosts) load
  # the same rows.
  shard_index, shard_count = sharding.data_shard(mesh)
  loader = data_pipeline.Loader(train_ds, batch_size=global_batch, seed=config.seed, shuffle=True,
                           drop_remainder=True, process_index=shard_index,
                           process_count=shard_count)
  steps_per_epoch = loader.steps_per_epoch
  if steps_per_epoch == 0:
    raise ConfigError(f"config.train.batch_size={global_batch} exceeds the {len(train_ds)} "
                      "training examples; lower it.")
  total_steps = fit_lib._total_steps(config, steps_per_epoch)
  tx, lr_fn = optim.make(config.optim, total_steps)
  agreement.stop_here()  # a SIGTERM during data preparation: every process leaves here

  # 3. Shapes and shardings.
  param_shardings = sharding.param_shardings(model_cfg, mesh)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                                   jax.random.key(0))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  lora = lora_state.enabled(config)  # then TrainState.params: the adapters only
  trained, trained_shardings = (
      lora_state.adapter_layout(config, abstract_params, mesh, param_shardings) if lora
      else (abstract_params, param_shardings))
  state_shardings = step_lib.TrainState(
      step=replicated, params=trained_shardings,
      opt_state=init_lib.opt_state_shardings(tx, trained, trained_shardings, mesh))
  abstract_state = jax.eval_shape(functools.partial(step_lib.init_state, tx=tx), trained)
  abstract_state = ckpt_lib.abstract_with_shardings(abstract_state, state_shardings)

  checkpointer = ckpt_lib.Checkpointer(workdir, config.checkpoint,
                                       fit_lib.schedule_steps(config, steps_per_epoch, total_steps))

  # 4-5. Init or restore, and the reference.
  # No live reference: cached log-probs, or a reference-free objective (simpo: no reference
  # params and no reference pass, `reference.attach_reference` returns the data unchanged).
  cached_ref = kind == "daa" and (config.objective.reference == "cached"
                                  or not objectives.needs_reference(config.objective.name))
  ref_dtype = jnp.dtype(config.objective.ref_dtype)
  cache = {}

  def initial():
    if "params" not in cache:
      cache["params"] = init_lib.initial_params(config, model_cfg, mesh, param_shardings)
    return cache["params"]

  def reference():
    return jax.tree.map(lambda p: p.astype(ref_dtype), initial())

  # Packed batches: one shape per dataset (its longest pair), so the step compiles once. The
  # reference pass and the held-out metrics use the same packers.
  packing = kind == "daa" and bool(t.packing)
  pack = fixed_layout.packer_for(t, train_ds) if packing else None
  eval_pack = fixed_layout.packer_for(t, eval_ds) if packing and eval_ds is not None else None
  if cached_ref:
    preemption.set_phase("the reference log-prob pass", lambda: (
        saved() + "; the reference log-prob cache is written only when complete"))
    train_ds = reference_lib.attach_reference(config, workdir, model, reference, train_ds, mesh, "train",
                                pack, agreement.stop_here)
    loader = data_pipeline.Loader(train_ds, batch_size=global_batch, seed=config.seed,
                             shuffle=True, drop_remainder=True,
                             process_index=shard_index, process_count=shard_count)
    if eval_ds is not None:
      eval_ds = reference_lib.attach_reference(config, workdir, model, reference, eval_ds, mesh, "eval",
                                 eval_pack, agreement.stop_here)
  preemption.set_phase("initialization", saved)

  latest = checkpointer.latest_step()
  restored_meta = None
  if latest is not None:
    state, restored_meta = checkpointer.restore(latest, abstract_state)
    loader.restore(restored_meta["data"])
    logging.info("resume: step %d from %s", latest, workdir)
    for missing in checkpointer.missing_exports():  # a run dir of the earlier layout
      old = state if missing == latest else checkpointer.restore(missing, abstract_state)[0]
      checkpointer.write_export(missing, old.params)
  else:
    init_fn = jax.jit(functools.partial(step_lib.init_state, tx=tx),
                      out_shardings=state_shardings)
    # The policy starts from a copy, so donating the state never frees the reference.
    state = init_fn(lora_state.init_adapters(config, abstract_params) if lora else
                    jax.tree.map(jnp.copy, initial()) if kind == "daa" and not cached_ref
                    else initial())
  # LoRA: the base (adapters off) is the reference and the frozen part of the policy.
  base_rec = lora_state.settle_base(workdir, init_lib.reference_identity(config), initial(),
                                    restored_meta, latest) if lora else None
  if lora or (kind == "daa" and not cached_ref):
    ref_params = reference()
  else:
    ref_params = None
  updating_ref = kind == "daa" and ref_update.enabled(config.objective)
  if updating_ref:  # TR-DPO: the reference moves; a resumed run takes the one it saved
    update_ref = ref_update.make(config.objective, param_shardings)
    if latest is not None:
      ref_params = checkpointer.restore_reference(latest, jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          ref_params, param_shardings))
  # The guard scores its samples under the reference: with a cached reference it keeps
  # the reference params (one more copy of the weights) for its KL estimates.
  guard_ref = None
  if monitor_factory is not None and kind == "daa":
    guard_ref = ref_params if ref_params is not None and not updating_ref else reference()
  cache.clear()

  # 6. The jitted step.
  scfg = step_lib.StepConfig(
      kind=kind, objective=config.objective.name if kind == "daa" else "dpo",
      normalize=config.objective.normalize if kind == "daa" else "sum",
      grad_accum=int(t.grad_accum), cached_ref=cached_ref, logps_chunk=int(t.logps_chunk),
      packing=packing, **lora_state.step_fields(config))
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

  log_cfg = config.get("log")
  writer = metrics_lib.MetricsWriter(
      workdir, is_main, wandb_project=(log_cfg.get("wandb") if log_cfg is not None else ""),
      config=metrics_lib.jsonable(config.to_dict()))
  start = int(jax.device_get(state.step))
  writer.resume_at(start)  # steps logged after the checkpoint are logged again below
  monitor = None
  if guard_ref is not None:
    monitor = monitor_factory(dict(
        config=config, workdir=workdir, model=model, mesh=mesh, ref_params=guard_ref,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        schedule_steps=checkpointer.schedule_steps, writer=writer))
    if latest is not None:
      monitor.restore(restored_meta.get("guard"))
  progress = metrics_lib.Progress(total_steps, start, bool(t.progress) and is_main,
                                  desc=f"{kind} {os.path.basename(os.path.normpath(workdir))}")
  peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
  seq_len = int(train_ds.max_length)
  pending: list[tuple[int, dict, float]] = []
  window_start, window_tokens = time.time(), 0.0
  summary: dict[str, Any] = {"status": "finished", "workdir": workdir,
                             "attention_kernel": model_cfg.attention_impl}  # 'auto' resolved

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

  def save(done, export=None):
    checkpointer.save(done, _saveable(state), meta(done), export=export,
                      reference=ref_params if updating_ref else None)

  def meta(done):
    out = {"data": loader.state(), "seed": int(config.seed), "step": done}
    if base_rec is not None:
      out["lora"] = base_rec
    if monitor is not None:
      out["guard"] = monitor.state()
    return out

  agreement.stop_here()  # before the first step (and its compilation)
  preemption.set_phase("training", saved)
  train_start = time.time()
  with sharding.activate(mesh):
    try:
      stop = None  # the agreement dispatched at the previous step boundary
      last = total_steps
      if monitor is not None:
        if monitor.stopped:  # the guard stopped this run before: nothing left to train
          last = start
          summary["status"] = "stopped"
        elif start == 0 and monitor.due(0, False, False):
          monitor.observe(0, guard_ref)
      for step in range(start, last):
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
        if updating_ref and ref_update.due(config.objective, done):
          ref_params = update_ref(ref_params, state.params)
        final = done == total_steps
        due_ckpt = checkpointer.should_save(done, final)
        if done % t.log_every == 0 or due_ckpt or final:
          flush(done)
        if eval_fn is not None and (done % t.eval_every == 0 or final):
          ev = heldout_lib.heldout_metrics(eval_fn, state.params, ref_params, hparams, eval_ds, mesh,
                               heldout_lib.eval_batch_size(config, mesh), t.eval_batches, eval_pack)
          writer.write(done, ev)
          summary.update(ev)
        if monitor is not None and monitor.due(done, final, due_ckpt):
          if monitor.observe(done, state.params):
            flush(done)
            save(done, export=True)
            summary["status"] = "stopped"
            break
        if due_ckpt:
          save(done)
        # Every process reads the same agreed flag here (dispatched one step ago, so the host
        # never waits on the step in flight): all save this step and leave together.
        if stop is not None and agreement.read(stop):
          flush(done)
          save(done, export=False)
          summary["status"] = "preempted"
          break
        stop = agreement.dispatch()
    finally:
      progress.close()
      checkpointer.close()
      writer.close()
  summary["step"] = int(jax.device_get(state.step))
  summary["train_seconds"] = time.time() - train_start
  if monitor is not None:
    monitor.finish(summary)
  if kind == "daa":
    summary.update(fit_lib.moved_summary(summary, config.objective.beta))
  if summary["status"] == "preempted":
    # The signalled process names its signal (SIGTERM or Ctrl-C); the others only agreed.
    name = preemption.signal_name() if preemption.requested() else "preempted"
    summary["message"] = (f"{name}: every process saved step {summary['step']} in "
                          f"{workdir}/checkpoints and stopped; run the same command again to "
                          "continue.")
  logging.info("run: %s at step %d", summary["status"], summary["step"])
  return summary
