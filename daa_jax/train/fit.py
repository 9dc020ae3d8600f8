"""A run fitted to its data: schedule checkpoint steps, batch/warmup adapted to a small data set (or a refusal), and whether the policy moved."""

from __future__ import annotations

import math
import ml_collections
from daa_jax import errors


def schedule_steps(config, steps_per_epoch: int, total_steps: int) -> list[int]:
  steps = {total_steps}
  for frac in config.checkpoint.epoch_fractions or ():
    s = int(round(float(frac) * steps_per_epoch))
    if 0 < s <= total_steps:
      steps.add(s)
  return sorted(steps)


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
