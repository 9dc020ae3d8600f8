"""Per-checkpoint evaluation outputs: `eval/<step>/` summary JSON, samples JSONL, arrays."""

from __future__ import annotations

import json
from etils import epath
import jax
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import metrics as metrics_lib


def write_step(out_dir: str, step: int, summary: dict, arrays: dict, rows: list[dict]) -> None:
  """Writes `eval/<step>/{arrays, samples.jsonl, summary.json}`; summary.json last."""
  d = epath.Path(out_dir) / "eval" / str(step)
  ckpt_lib.save_arrays(d / "arrays", arrays)
  if jax.process_index() == 0:
    text = "".join(json.dumps(metrics_lib.jsonable(r), ensure_ascii=False) + "\n" for r in rows)
    (d / "samples.jsonl").write_text(text)
    tmp = d / "summary.json.tmp"
    tmp.write_text(json.dumps(metrics_lib.jsonable(summary), indent=2, sort_keys=True))
    tmp.replace(d / "summary.json")


def load_arrays(eval_step_dir: str) -> dict:
  """The orbax arrays of one `eval/<step>/` directory, as numpy."""
  return ckpt_lib.load_arrays(epath.Path(eval_step_dir) / "arrays")


def done(out_dir: str, step: int) -> bool:
  return (epath.Path(out_dir) / "eval" / str(step) / "summary.json").exists()
