"""A run directory's small helpers: its config.json (checked on resume), what it holds so far
(for a SIGTERM's message), and the state handed to an asynchronous save."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from etils import epath

from daa_jax.errors import ConfigError


def write_config(config, workdir):
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


def saveable(state):
  """The state to hand to an asynchronous save. On CPU, host "transfers" can alias device
  buffers, and the next step donates (reuses) the state's buffers while orbax may still be
  writing; a copy keeps the saved values alive. On accelerators the device-to-host copy is a
  real copy, made before `save` returns."""
  if jax.default_backend() == "cpu":
    return jax.tree.map(jnp.copy, state)
  return state


def saved_so_far(workdir: str):
  """What a run directory holds, for the message of a SIGTERM before the loop."""
  def describe() -> str:
    steps = [int(p.name) for p in (epath.Path(workdir) / "checkpoints").glob("*")
             if p.name.isdigit()]
    if steps:
      return (f"nothing new was saved; {workdir} keeps its checkpoints up to step "
              f"{max(steps)}")
    return f"nothing was saved yet (no checkpoint in {workdir}; the run starts over)"
  return describe
