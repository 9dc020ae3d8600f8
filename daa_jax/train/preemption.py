"""SIGTERM and Ctrl-C (SIGINT), agreed by every process of the job.

On a pod each host is signalled at its own moment (a maintenance event, a Spot preemption),
and a host that stops to save while the others run the next step hangs the whole job. So a
SIGTERM never acts on its own process alone:

  * While a job runs under `deferred()` (the whole of `train.run`), the handler only sets a
    local flag. At agreement points — every training step boundary, every batch of the
    reference log-prob pass, the end of data preparation — the processes combine their flags
    with one all-reduce (`Agreement`); when any process was signalled, every process sees it at
    the same point: in the loop they all save the same step and leave, before it they all raise
    `Preempted` at the same place.
  * Elsewhere (evaluation, a sweep between runs, outside any job) the handler raises
    `Preempted` at once. What is written aside and renamed, or committed by orbax, is never
    left half-written by that.
  * Ctrl-C is a preemption like SIGTERM (the terminal sends SIGINT to every process of the
    job it started); a second Ctrl-C, while the first waits for its agreement point, aborts at
    once (KeyboardInterrupt) for a user who does not want to wait for the save.

`main.py` (the only module with process-level side effects) calls `install()`; it prints
`Preempted`'s message, one line saying what was and was not saved, and exits 0. A job run
in-process (tests, a notebook) gets the deferred handling from `deferred()` alone.

The cost of agreeing: one all-reduce of a scalar per step, dispatched after the step and
read at the next boundary, so it never waits on the step that is running; with one process
it is a Python flag and costs nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable

from absl import logging

_STATE: dict[str, Any] = {"installed": False, "deferred": 0, "requested": False,
                          "phase": "starting", "saved": "nothing", "signal": "SIGTERM"}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name() -> str:
  """'SIGTERM' or 'SIGINT (Ctrl-C)': the signal that stopped (or is stopping) the job."""
  return _STATE["signal"]


class Preempted(Exception):
  """A SIGTERM or Ctrl-C ended the job at an agreed point; the message says what was saved."""

  def __init__(self, phase: str, saved: str, name: str = "SIGTERM"):
    super().__init__(f"{name} during {phase}: {saved}. Run the same command again to "
                     "continue from there.")
    self.phase = phase
    self.saved = saved


def _handle(signum, frame):
  del frame
  interrupt = signum == signal.SIGINT
  if interrupt and _STATE["requested"]:
    raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
  if not _STATE["requested"]:
    _STATE["signal"] = "SIGINT (Ctrl-C)" if interrupt else "SIGTERM"
  if _STATE["deferred"]:
    if not _STATE["requested"]:
      logging.warning("%s during %s: stopping at the next point all processes agree on%s.",
                      _STATE["signal"], _STATE["phase"],
                      " (Ctrl-C again to abort without saving)" if interrupt else "")
    _STATE["requested"] = True
    return
  raise preempted()


def preempted() -> Preempted:
  """The `Preempted` error for the current phase."""
  saved = _STATE["saved"]
  return Preempted(_STATE["phase"], saved() if callable(saved) else saved, _STATE["signal"])


def install() -> None:
  """Routes SIGTERM and SIGINT through this module for the rest of the process (main thread
  only)."""
  if threading.current_thread() is threading.main_thread():
    for signum in _SIGNALS:
      signal.signal(signum, _handle)
    _STATE["installed"] = True


def requested() -> bool:
  """This process was signalled (not yet agreed with the others)."""
  return bool(_STATE["requested"])


@contextlib.contextmanager
def deferred():
  """SIGTERM and Ctrl-C only set the flag inside; installs the handler for the duration if
  `install` was not called (an in-process job) and restores the previous handlers after."""
  previous = None
  if not _STATE["installed"] and threading.current_thread() is threading.main_thread():
    previous = {signum: signal.signal(signum, _handle) for signum in _SIGNALS}
  _STATE["deferred"] += 1
  old_phase = _STATE["phase"], _STATE["saved"]
  try:
    yield
  finally:
    _STATE["deferred"] -= 1
    _STATE["phase"], _STATE["saved"] = old_phase
    if previous is not None:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
    if not _STATE["deferred"]:
      _STATE["requested"] = False
      _STATE["signal"] = "SIGTERM"


def set_phase(name: str, saved: str | Callable[[], str]) -> None:
  """Names what the job is doing now and what is saved so far (a string, or a function
  called when the message is needed), for `Preempted`'s message."""
  _STATE["phase"], _STATE["saved"] = name, saved


class Agreement:
  """Combines every process's SIGTERM flag with one all-reduce over the mesh's devices.

  `now()` agrees synchronously (for loops that already wait on the device each iteration);
  `dispatch()` + `read()` split it so the host never waits on the step in flight: dispatch
  after step s, read at the boundary of step s + 1 — every process reads the same value.
  """

  def __init__(self, mesh):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    self._single = jax.process_count() == 1
    if self._single:
      return
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
    # One element per device, sharded over all of them (each process fills its own), maxed
    # into a replicated scalar that every process can read.
    self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
    self._local = lambda flag: np.full((len(mesh.local_devices),), flag, np.int32)
    self._any = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec()))
    self._make = lambda flag: jax.make_array_from_process_local_data(
        self._sharding, self._local(flag), (mesh.size,))

  def dispatch(self):
    if self._single:
      return requested()
    return self._any(self._make(int(requested())))

  @staticmethod
  def read(handle) -> bool:
    return bool(handle) if isinstance(handle, bool) else bool(int(handle))

  def now(self) -> bool:
    return self.read(self.dispatch())

  def stop_here(self) -> None:
    """Raises `Preempted` on every process when any of them was signalled."""
    if self.now():
      raise preempted()
