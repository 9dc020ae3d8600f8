"""Checkpoints through orbax — the only module that talks to orbax.

Layout under a run's workdir: one orbax CheckpointManager, one directory per saved step.

  checkpoints/<step>/state    full TrainState (params, optimizer state, step)
  checkpoints/<step>/meta     data-iterator state and seed (JSON)
  checkpoints/<step>/params   params-only export, on schedule steps (what evaluation, the
                              sweep and `config.init_from` read)

The three items of a step are written by one `save` and committed together (orbax renames
the step's temporary directory, or writes `commit_success.txt` on object stores), so a step
either has all of them or does not exist: "state committed, export missing" cannot happen,
and only one save (one set of orbax barriers) is in flight at a time. Schedule steps are
kept forever; other steps (`every_steps`, a preemption save) rotate under `max_to_keep`.

Run directories written before this layout kept the exports in a second manager,
`params/<step>/params`; they still load (`exported_steps` and `load_params` read both), and a
resumed run writes an export that a schedule step lacks (`Checkpointer.missing_exports`) into
that directory.

Saves are asynchronous (orbax writes in the background while training continues) and
collective: every process calls `save` for the same step.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from daa_jax.errors import CheckpointError

PyTree = Any
_EXPORTS = "params"  # the export's item name, and the directory of repaired/legacy exports
_REFERENCE = "reference"  # an updated reference (TR-DPO, train/reference_update.py)


def _preservation(max_to_keep: int, keep_steps: Iterable[int]):
  keep = sorted(set(int(s) for s in keep_steps))
  cm = ocp.checkpoint_managers
  return cm.AnyPreservationPolicy([cm.LatestN(n=max_to_keep), cm.CustomSteps(keep)])


def _finalized(path: epath.Path) -> bool:
  """`path` is a directory orbax finished writing (not a temporary, half-written one)."""
  return path.is_dir() and ocp.path.step.is_path_finalized(path)


def _export_path(run_dir: str, step: int) -> epath.Path | None:
  """Where `step`'s committed params export lives, in this layout or the earlier one.

  `checkpoints/<step>` is committed as a whole; in `params/<step>/params` either the step
  directory (the earlier layout's manager) or the item itself (`write_export`) carries the
  commit.
  """
  run = epath.Path(run_dir)
  managed = run / "checkpoints" / str(step)
  if (managed / _EXPORTS).exists() and _finalized(managed):
    return managed / _EXPORTS
  separate = run / _EXPORTS / str(step)
  if (separate / _EXPORTS).exists() and (
      _finalized(separate / _EXPORTS) or _finalized(separate)):
    return separate / _EXPORTS
  return None


class Checkpointer:
  """Full-state checkpoints with params-only exports on schedule steps, for one run."""

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
        self.workdir / "checkpoints", options=opts,
        item_names=("state", "meta", _EXPORTS, _REFERENCE))

  # --- schedule -------------------------------------------------------------------------
  def should_save(self, step: int, final: bool = False) -> bool:
    return (final or step in self.schedule_steps
            or (self.every_steps > 0 and step % self.every_steps == 0))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  # --- save / restore -------------------------------------------------------------------
  def save(self, step: int, state: PyTree, meta: dict, export: bool | None = None,
           reference: PyTree | None = None) -> None:
    """Saves `state` (sharded jax arrays), JSON `meta`, on schedule steps (or `export`) the
    params export, and an updated `reference` if given, at `step`: one asynchronous, atomic
    commit. Every process calls it."""
    if step in self._mngr.all_steps():
      return
    if export is None:
      export = step in self.schedule_steps
    export = bool(export and self.export_params)
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if export:
      items[_EXPORTS] = ocp.args.StandardSave(state.params)
    if reference is not None:
      items[_REFERENCE] = ocp.args.StandardSave(reference)
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
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

  def restore_reference(self, step: int, abstract_reference: PyTree) -> PyTree:
    """The updated reference saved with `step` (TR-DPO), onto its shardings."""
    if not (self.workdir / "checkpoints" / str(step) / _REFERENCE).exists():
      raise CheckpointError(
          f"checkpoint {self.workdir / 'checkpoints' / str(step)} has no reference item, but "
          "config.objective.ref_update updates the reference: the run was started without "
          "reference updates. Resume with the config it was started with (config.json), or "
          "use a fresh --workdir.")
    out = self._mngr.restore(step, args=ocp.args.Composite(
        **{_REFERENCE: ocp.args.StandardRestore(abstract_reference)}))
    return out[_REFERENCE]

  def missing_exports(self) -> list[int]:
    """Schedule steps with a full-state checkpoint but no params export anywhere (a run
    directory of the earlier two-manager layout, killed between its two commits)."""
    if not self.export_params:
      return []
    exported = set(exported_steps(str(self.workdir)))
    return [s for s in self.all_steps() if s in self.schedule_steps and s not in exported]

  def write_export(self, step: int, params: PyTree) -> None:
    """Writes a params export for an already-committed `step` (see `missing_exports`) into
    `params/<step>/params`, synchronously; every process calls it."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(self.workdir / _EXPORTS / str(step) / _EXPORTS, params, force=True)
    ckptr.wait_until_finished()
    ckptr.close()
    logging.info("checkpoint: wrote the missing params export of step %d", step)

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self._mngr.close()


def exported_steps(run_dir: str) -> list[int]:
  """Steps of `run_dir` with a committed params export (either layout), ascending."""
  steps = set()
  for parent in (epath.Path(run_dir) / "checkpoints", epath.Path(run_dir) / _EXPORTS):
    if parent.exists():
      steps.update(int(c.name) for c in parent.iterdir() if re.fullmatch(r"\d+", c.name))
  return sorted(s for s in steps if _export_path(run_dir, s) is not None)


def require_run_dir(spec: str) -> list[int]:
  """The exported steps of `config.init_from`'s run directory (`RUN_DIR[@STEP]`), ascending.

  Raises:
    CheckpointError: the directory does not exist, or holds no params export (saying which
      of the two, and what a run directory holds).
  """
  run_dir = str(spec).partition("@")[0]
  if not epath.Path(run_dir).is_dir():
    raise CheckpointError(
        f"config.init_from={spec!r}: {run_dir} does not exist or is not a directory. Give the "
        "--workdir of a finished daa_jax run (e.g. the SFT run), absolute or relative to where "
        "you run the command.")
  steps = exported_steps(run_dir)
  if not steps:
    raise CheckpointError(
        f"config.init_from={spec!r}: {run_dir} holds no checkpoint: a daa_jax run directory "
        f"has config.json and params exports under {os.path.join(run_dir, 'checkpoints')}/"
        "<step>/params, written at its schedule checkpoints. Point it at the workdir of a run "
        "that reached one (e.g. the finished SFT run).")
  return steps


def load_params(spec: str, abstract_params: PyTree) -> tuple[PyTree, int]:
  """Loads exported params from `RUN_DIR` (latest export) or `RUN_DIR@STEP`.

  `abstract_params` carries the target shapes/dtypes/shardings (`jax.ShapeDtypeStruct`s), so
  the weights land directly on the mesh. Returns `(params, step)`.
  """
  run_dir, _, step_text = str(spec).partition("@")
  if "://" not in run_dir:
    run_dir = os.path.abspath(run_dir)  # orbax restores from absolute paths only
  if step_text == "best":  # the over-optimization guard's kept point (study/guard.py)
    best = epath.Path(run_dir) / "best"
    if not (best / "best.json").exists():
      raise CheckpointError(
          f"config.init_from={spec!r}: {best} holds no kept point; only a DAA run trained "
          "with config.guard.enabled writes best/ (best/best.json names its step).")
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(best / "params", abstract_params)
    return params, int(json.loads((best / "best.json").read_text())["step"])
  steps = require_run_dir(spec)
  step = int(step_text) if step_text else steps[-1]
  if step not in steps:
    raise CheckpointError(f"config.init_from={spec!r}: step {step} was not exported; "
                          f"exported steps are {steps}.")
  path = _export_path(run_dir, step)
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
