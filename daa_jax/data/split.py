"""The held-out split: a hash of the prompt (never empty), or the source's own eval split."""

from __future__ import annotations

import dataclasses
import hashlib
from absl import logging
from daa_jax.data import readers
from daa_jax.errors import DataError, warn_misfit


# Split names tried, in order, for split='eval' when config.data.eval_split is 'auto'.
_EVAL_SPLITS = ("valid1", "validation", "valid", "test", "eval", "dev")


def _holdout_score(prompt: str) -> float:
  """A uniform number in [0, 1) fixed by the prompt text: the same prompt always lands in the
  same split, so no prompt is shared between train and eval."""
  return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _held_out_prompts(examples: list, fraction: float) -> set:
  """The unlabeled prompts held out for evaluation: those whose hash is below `fraction`.

  Never empty while there are two distinct prompts: when the hash holds out none (few
  prompts) or all of them, the round(fraction * prompts) (at least 1) lowest-hash prompts are
  held out instead, with a warning.
  """
  prompts = sorted({e.prompt for e in examples if not e.split})
  if not prompts:
    return set()
  held = {p for p in prompts if _holdout_score(p) < fraction}
  if held and len(held) < len(prompts):
    return held
  if len(prompts) < 2:
    return set()
  by_hash = "all" if held else "none"
  k = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
  held = set(sorted(prompts, key=_holdout_score)[:k])
  warn_misfit(
      f"config.data.eval_fraction={fraction:g} of {len(prompts)} prompts held out "
      f"{by_hash} by the prompt hash; holding out the {k} "
      f"lowest-hash prompt(s) instead ({sum(e.prompt in held for e in examples)} examples) "
      "so that held-out metrics and evaluation have data. For a larger held-out set raise "
      "--config.data.eval_fraction (e.g. 0.2) or give --config.data.eval_source.")
  return held


def _file_labels_only(examples: list) -> bool:
  """True when every split label comes from a file name and none of them is 'train': a lone
  `test.jsonl.gz` (HH's) is data to split or train on, not a test set without a train set."""
  labels = {e.split for e in examples if e.split}
  return bool(labels) and "train" not in labels and all(
      e.split is None or e.split == readers.split_from_filename(e.source) for e in examples)


def _select(examples: list, split: str, cfg, separate_eval: bool) -> tuple[list, int]:
  """The examples of `split` ('train', 'eval' or a split name present in the data).

  Split labels come from the rows' `split` field or from split names in file names. File-name
  labels that name no 'train' file are ignored: the rows are then split like unlabelled rows
  (all training data with config.data.eval_source, else a held-out eval_fraction of prompts).
  """
  if split in ("train", "eval") and _file_labels_only(examples):
    named = sorted({e.split for e in examples if e.split})
    logging.info("config.data.source: ignoring the split name(s) %s of its file names (no "
                 "'train' file); splitting its rows as unlabelled data.", named)
    examples = [dataclasses.replace(e, split=None) for e in examples]
  labels = {e.split for e in examples if e.split}
  held_out = _held_out_prompts(examples, cfg.eval_fraction) if not separate_eval else set()

  def effective(e):
    if e.split:
      return e.split
    if separate_eval:
      return "train"
    return "eval" if e.prompt in held_out else "train"

  if split == "eval":
    if cfg.eval_split != "auto":
      wanted = {cfg.eval_split, "eval"}
    else:
      wanted = {"eval"} | set(next(([s] for s in _EVAL_SPLITS if s in labels), []))
  else:
    wanted = {split}
  selected = [e for e in examples if effective(e) in wanted]
  if not selected:
    if split == "eval":
      fix = ("set config.data.eval_split to one of the splits present, or give evaluation files "
             "with config.data.eval_source")
    elif split == "train":
      fix = ("label training rows split 'train' (a `split` field or a file name such as "
             "train.jsonl), or load that split by name")
    else:
      fix = f"use one of the splits present; {split!r} is none of them"
    raise DataError(f"no examples of split {split!r} in config.data.source (splits present: "
                    f"{sorted(labels) or 'none'}; {len(examples)} rows); {fix}.")
  return selected, len(examples) - len(selected)
