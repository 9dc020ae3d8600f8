"""Metrics: `metrics.jsonl` (+ TensorBoard when installed, + Weights & Biases when
`config.log.wandb` names a project) on process 0, a progress bar, and DPO-aware FLOP
accounting for throughput and MFU.

FLOPs (PaLM appendix B convention): a forward pass costs 2·N_matmul + 4·n_layers·H·K·T FLOPs per
token (N_matmul = non-embedding matmul parameters + the output projection, from the real
shapes: grouped-query k/v, gated MLPs; T = sequence length, or the window on sliding layers);
a backward pass twice that. A DAA step with a live reference runs the policy forward+backward
and the reference forward on both responses of every pair; with cached reference log-probs
the reference term drops. Only real (non-pad) tokens are counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Mapping

from absl import logging
import numpy as np
from etils import epath

from daa_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor numbers, no sparsity).
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12,
    "a100": 312e12, "a40": 149.7e12, "l4": 121e12,
}


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, value in PEAK_FLOPS.items():
    if name in kind:
      return value
  return None


def matmul_params(cfg: ModelConfig) -> int:
  """Matmul weights a token passes through, from the real shapes: q/o over H heads and k/v
  over G (grouped-query) heads of K dims, 2 or 3 (gated GLU) MLP matrices, the vocab head."""
  d, f, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  attn = 2 * d * cfg.num_attention_heads * k + 2 * d * cfg.kv_heads * k
  per_layer = attn + cfg.family.mlp_matrices * d * f
  return cfg.num_hidden_layers * per_layer + d * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """2 N_matmul + 4 H K per key attended, summed over layers (a sliding-window layer
  attends to at most `sliding_window` keys)."""
  keys = sum(min(seq_len, cfg.sliding_window) if sliding else seq_len
             for sliding in cfg.sliding_layers)
  return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_attention_heads * cfg.head_dim * keys


def step_flops(cfg: ModelConfig, real_tokens: float, seq_len: int, kind: str,
               cached_ref: bool) -> float:
  """Model FLOPs of one optimizer step over `real_tokens` non-pad tokens (all rows)."""
  fwd = forward_flops_per_token(cfg, seq_len) * real_tokens
  passes = 3.0  # policy forward + backward
  if kind == "daa" and not cached_ref:
    passes += 1.0  # reference forward
  return passes * fwd


class _TensorBoard:
  """Minimal event writer over the `tensorboard` package, if installed (no TensorFlow)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._writer = EventFileWriter(logdir)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step,
                                                 summary=summary))

  def close(self) -> None:
    self._writer.close()


class _WandB:
  """One Weights & Biases run per workdir (imported only when `config.log.wandb` is set)."""

  def __init__(self, project: str, workdir: str, config: Mapping[str, Any] | None):
    import wandb  # pylint: disable=g-import-not-at-top
    local = "://" not in str(workdir)
    # The id follows the workdir, so a resumed run continues the same W&B run.
    run_id = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
    self._run = wandb.init(project=project, id=run_id, resume="allow",
                           name=os.path.basename(os.path.normpath(str(workdir))),
                           dir=str(workdir) if local else None, config=dict(config or {}))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._run.log(values, step=int(step))

  def close(self) -> None:
    self._run.finish()


class MetricsWriter:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, is_main: bool = True, tensorboard: bool = True,
               wandb_project: str = "", config: Mapping[str, Any] | None = None):
    """`wandb_project` ("": off) also logs every scalar to that W&B project, `config` as the
    run's config; WANDB_MODE=offline writes `<workdir>/wandb/` without network."""
    self.is_main = is_main
    self.path = epath.Path(workdir) / "metrics.jsonl"  # local or gs://
    # Object stores (gs://) have no append (gcsfs silently truncates on mode 'a'): keep the
    # file's text here and rewrite the whole object on each write.
    self._remote_text = None
    self._tb = None
    if is_main:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if "://" in str(workdir):
        self._remote_text = self.path.read_text() if self.path.exists() else ""
      if tensorboard:
        try:
          self._tb = _TensorBoard(os.path.join(workdir, "tb"))
        except ImportError:
          logging.info("tensorboard not installed; metrics go to metrics.jsonl only.")
    self._wandb = _WandB(wandb_project, workdir, config) if is_main and wandb_project else None

  def resume_at(self, step: int) -> None:
    """Drops the rows logged after `step` (the checkpoint a run resumes from): a run stopped
    after logging steps it had not checkpointed logs them again, so each step stays once.

    Written aside and renamed, so a kill here never leaves a half-written file.
    """
    if not self.is_main or not self.path.exists():
      return
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
      return
    text = "".join(kept)
    logging.info("metrics: dropped %d rows logged after step %d (resumed there)",
                 len(lines) - len(kept), step)
    if self._remote_text is not None:
      self._remote_text = text
      self.path.write_text(text)
      return
    tmp = self.path.parent / (self.path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(self.path)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.is_main:
      return
    clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
    line = json.dumps({"step": int(step), **clean}) + "\n"
    if self._remote_text is not None:
      self._remote_text += line
      self.path.write_text(self._remote_text)
    else:
      with self.path.open("a") as f:
        f.write(line)
    scalars = {k: v for k, v in clean.items() if isinstance(v, float)}
    if self._tb is not None:
      self._tb.scalars(step, scalars)
    if self._wandb is not None:
      self._wandb.scalars(step, scalars)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def read_jsonl(path: str) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()
          if line.strip()]


class Progress:
  """A tqdm bar with loss, reward accuracy and tokens/s (process 0; silent elsewhere)."""

  def __init__(self, total: int, initial: int, enabled: bool, desc: str):
    self._bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                       mininterval=1.0)

  def update(self, n: int, values: dict[str, float]) -> None:
    if self._bar is None:
      return
    shown = {}
    for key, short in (("loss/total", "loss"), ("daa/reward_acc", "acc"),
                       ("perf/tokens_per_s", "tok/s")):
      if key in values:
        shown[short] = f"{values[key]:.4g}"
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def jsonable(obj):
  """Strict-JSON form of results: nan/inf → None, numpy scalars and arrays → Python, keys →
  str (evaluation summaries, fits, checks)."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj
