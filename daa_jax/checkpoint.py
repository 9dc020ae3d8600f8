"""Checkpoints through orbax — the only module that talks to orbax.

Layout under a run's workdir:
  checkpoints/<step>/{state, meta}   full TrainState (+ data-iterator state and seed as JSON);
                                     schedule steps are kept forever, periodic ones rotate
                                     under `max_to_keep`.
  params/<step>/params               params-only export of each schedule checkpoint (what
                                     evaluation and `config.init_from` read).

Saves are asynchronous (orbax writes in the background while training continues); a save is
committed atomically, so a run killed mid-save still has its previous checkpoint.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from daa_jax.errors import CheckpointError

PyTree = Any


def _preservation(max_to_keep: int, keep_steps: Iterable[int]):
  keep = sorted(set(int(s) for s in keep_steps))
  cm = ocp.checkpoint_managers
  return cm.AnyPreservationPolicy([cm.LatestN(n=max_to_keep), cm.CustomSteps(keep)])


class Checkpointer:
  """Full-state checkpoints plus params-only exports for one run."""

  def __init__(self, workdir: str, ckpt_config, schedule_steps: Iterable[int]):
    self.workdir = epath.Path(workdir)
    self.schedule_steps = sorted(set(int(s) for s in schedule_steps))
    self.every_steps = int(ckpt_config.every_steps or 0)
    self.export_params = bool(ckpt_config.get("export_params", True))
    opts = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation(int(ckpt_config.max_to_keep), self.schedule_steps),
        enable_async_checkpointing=bool(ckpt_config.async_save),
        create=True)
    self._mngr = ocp.CheckpointManager(
        self.workdir / "checkpoints", options=opts, item_names=("state", "meta"))
    export_opts = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=bool(ckpt_config.async_save), create=True)
    self._exports = ocp.CheckpointManager(
        self.workdir / "params", options=export_opts, item_names=("params",))

  # --- schedule -------------------------------------------------------------------------
  def should_save(self, step: int, final: bool = False) -> bool:
    return (final or step in self.schedule_steps
            or (self.every_steps > 0 and step % self.every_steps == 0))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  # --- save / restore -------------------------------------------------------------------
  def save(self, step: int, state: PyTree, meta: dict, export: bool | None = None) -> None:
    """Saves `state` (sharded jax arrays) and JSON `meta` at `step`, asynchronously."""
    if step in self._mngr.all_steps():
      return
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if export is None:
      export = step in self.schedule_steps
    if export and self.export_params and step not in self._exports.all_steps():
      self._exports.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state.params)), force=True)
    logging.info("checkpoint: saving step %d%s", step, " (+ params export)" if export else "")

  def restore(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
    """Restores the state onto the shardings carried by `abstract_state`'s leaves."""
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.workdir / 'checkpoints' / str(step)} does not match this "
          f"config's model/optimizer ({e}). Use a fresh --workdir, or the config the run was "
          "started with (saved as config.json in the workdir).") from e
    return out.state, dict(out.meta)

  def wait(self) -> None:
    self._mngr.wait_until_finished()
    self._exports.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()
    self._exports.close()


def exported_steps(run_dir: str) -> list[int]:
  """Steps that have a params-only export under `run_dir/params` (committed ones only)."""
  path = epath.Path(run_dir) / "params"
  if not path.exists():
    return []
  steps = []
  for child in path.iterdir():
    if re.fullmatch(r"\d+", child.name) and (child / "params").exists():
      steps.append(int(child.name))
  return sorted(steps)


def load_params(spec: str, abstract_params: PyTree) -> tuple[PyTree, int]:
  """Loads exported params from `RUN_DIR` (latest export) or `RUN_DIR@STEP`.

  `abstract_params` carries the target shapes/dtypes/shardings (`jax.ShapeDtypeStruct`s), so
  the weights land directly on the mesh. Returns `(params, step)`.
  """
  run_dir, _, step_text = str(spec).partition("@")
  steps = exported_steps(run_dir)
  if not steps:
    raise CheckpointError(
        f"config.init_from={spec!r}: no params exports under {os.path.join(run_dir, 'params')}. "
        "Point it at the workdir of a finished daa_jax run (e.g. the SFT run).")
  step = int(step_text) if step_text else steps[-1]
  if step not in steps:
    raise CheckpointError(f"config.init_from={spec!r}: step {step} was not exported; "
                          f"exported steps are {steps}.")
  path = epath.Path(run_dir) / "params" / str(step) / "params"
  ckptr = ocp.StandardCheckpointer()
  try:
    params = ckptr.restore(path, abstract_params)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"params at {path} do not match the configured model ({e}); check config.model.size "
        "against the run that wrote them.") from e
  return params, step


def abstract_with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
  """`jax.ShapeDtypeStruct` leaves carrying the target shardings, for restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_arrays(path, arrays: PyTree) -> None:
  """Saves a pytree of arrays (e.g. evaluation statistics) at `path`, replacing a half-written
  earlier attempt. Every process joins (orbax saves are collective)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(epath.Path(path), arrays, force=True)
  ckptr.wait_until_finished()
  ckptr.close()


def load_arrays(path) -> PyTree:
  """Restores a pytree saved by `save_arrays`, as numpy/host arrays."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(epath.Path(path))
