"""Tokenized datasets: `PairDataset` and `SFTDataset`, their npz cache and their batches.

A dataset holds the truncated prompt and response tokens of every example as flat ragged
arrays, the raw texts (for evaluation and judges) and its load statistics. `batch(indices)`
builds the fixed-shape numpy batches the trainer consumes (`[B, 2, L]` for pairs, `[B, L]` for
SFT; L = max_length). Masks and positions are computed from lengths, never from
`tokens != pad_id`, because a pad id may equal EOS (Pythia).

Preference batch (B rows, pair axis 0 = chosen, 1 = rejected):
  tokens          [B, 2, L] int32  prompt, response incl. EOS, then pad_id.
  loss_mask       [B, 2, L] int32  1 at t iff tokens[..., t + 1] is a response token (aligned
                                   to targets): the last column is 0, sum(-1) == lengths.
  attention_mask  [B, 2, L] int32  1 on real tokens.
  positions       [B, 2, L] int32  0..n-1 on real tokens, 0 on pad.
  lengths         [B, 2]    int32  response tokens incl. EOS (when not truncated away).
  prompt_lengths  [B]       int32
  index           [B]       int64  example index in the dataset.
  <column>        [B, ...]         any array attached with `with_column`, sliced by index.
The SFT batch has the same keys without the pair axis (`tokens [B, L]`, `lengths [B]`).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from daa_jax.data import lengths as lengths_lib
from daa_jax.data import tokenize as tokenize_lib
from daa_jax.errors import DataError

Ragged = tokenize_lib.Ragged
# Bump when the cache layout or the tokenization/truncation semantics change.
CACHE_VERSION = 4  # 2: empty responses kept and counted; lengths fitted to the data; 4: BOS
_STAT_KEYS = ("read", "invalid_skipped", "skipped_other_domain", "empty_responses",
              "other_split", "duplicates_removed", "truncated", "prompt_truncated",
              "response_truncated", "dropped", "examples", "fitting_length", "references")


class _Dataset:
  """Shared storage and batching of pair and SFT datasets (one or two responses per prompt)."""

  _RESPONSE_NAMES: tuple[str, ...] = ()

  def __init__(self, tokenizer, max_length: int, prompts: Ragged, responses: Sequence[Ragged],
               texts: Mapping[str, Ragged], ids: Ragged, origins: np.ndarray,
               files: Sequence[str], stats: Mapping[str, int], fingerprint: str,
               columns: Optional[Mapping[str, np.ndarray]] = None):
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.fingerprint = fingerprint
    self.stats = dict(stats)
    self.files = list(files)
    self._prompts = prompts
    self._responses = list(responses)
    self._texts = dict(texts)
    self._ids = ids
    self._origins = origins  # [N, 2] int64: (index into files, 1-based line or row).
    self._columns = dict(columns or {})
    self.from_cache = False  # Set by the loader functions: whether the npz cache was hit.

  def __len__(self) -> int:
    return len(self._prompts)

  # --- Texts and metadata, for evaluation. ---------------------------------------------------

  def _text_list(self, name: str) -> list[str]:
    ragged = self._texts[name]
    return [ragged.text(i) for i in range(len(ragged))]

  @property
  def prompt_texts(self) -> list[str]:
    """The raw (untruncated) prompt of every example."""
    return self._text_list("prompt")

  @property
  def reference_texts(self) -> list[str]:
    """Reference responses for win rates: the file's reference column, else chosen/response
    (`stats['references']` counts the examples with their own reference)."""
    return self._text_list("reference")

  @property
  def ids(self) -> list[str]:
    """Example ids from the data (or 'file:line' where rows have none)."""
    return [self._ids.text(i) for i in range(len(self._ids))]

  def origin(self, i: int) -> tuple[str, int]:
    """(file, 1-based line or row) that example i was read from."""
    file_index, line = self._origins[i]
    return self.files[int(file_index)], int(line)

  def prompt_tokens(self, i: int) -> np.ndarray:
    """The (possibly truncated) prompt token ids of example i, int32."""
    return self._prompts[i].copy()

  # --- Attached columns. ---------------------------------------------------------------------

  def with_column(self, name: str, values: np.ndarray) -> "_Dataset":
    """A copy of this dataset whose batches also hold `values[index]` under `name`.

    Args:
      name: the batch key, e.g. 'ref_logps'.
      values: [N, ...] array, one row per example in dataset order (e.g. `ref_logps [N, 2]`).
    """
    values = np.asarray(values)
    if values.shape[:1] != (len(self),):
      raise DataError(f"column {name!r} has {values.shape[:1]} rows; the dataset has "
                      f"{len(self)} examples. Recompute it for this dataset "
                      f"(fingerprint {self.fingerprint}).")
    if name in self._reserved_keys():
      raise DataError(f"column name {name!r} is a batch key already; pick another name.")
    copy = object.__new__(type(self))
    copy.__dict__.update(self.__dict__)
    copy._columns = {**self._columns, name: values}
    return copy

  @staticmethod
  def _reserved_keys() -> set[str]:
    return {"tokens", "loss_mask", "attention_mask", "positions", "lengths", "prompt_lengths",
            "index", "valid"}

  # --- Batches. ------------------------------------------------------------------------------

  def batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """The fixed-shape batch of the examples at `indices` (see the module docstring)."""
    index = np.asarray(indices, np.int64)
    num_rows, num_responses, length = len(index), len(self._responses), self.max_length
    prompt_lengths = self._prompts.lengths[index]  # [B]
    lengths = np.stack([r.lengths[index] for r in self._responses], axis=1)  # [B, P]
    tokens = np.full((num_rows, num_responses, length), self.tokenizer.pad_id, np.int32)
    for row, i in enumerate(index):
      prompt = self._prompts[i]
      for k, responses in enumerate(self._responses):
        response = responses[i]
        tokens[row, k, :len(prompt)] = prompt
        tokens[row, k, len(prompt):len(prompt) + len(response)] = response
    t = np.arange(length)
    end = (prompt_lengths[:, None] + lengths)[..., None]  # [B, P, 1] one past the last token.
    attention_mask = t < end
    # Position t predicts token t + 1: mark t when t + 1 lies in [prompt_length, end).
    loss_mask = (t >= prompt_lengths[:, None, None] - 1) & (t < end - 1)
    batch = dict(tokens=tokens, loss_mask=loss_mask.astype(np.int32),
                 attention_mask=attention_mask.astype(np.int32),
                 positions=np.where(attention_mask, t, 0).astype(np.int32),
                 lengths=lengths.astype(np.int32), prompt_lengths=prompt_lengths.astype(np.int32),
                 index=index)
    if num_responses == 1:
      for key in ("tokens", "loss_mask", "attention_mask", "positions", "lengths"):
        batch[key] = batch[key][:, 0]
    for name, values in self._columns.items():
      batch[name] = values[index]
    return batch

  # --- The npz cache. ------------------------------------------------------------------------

  def save(self, path: str) -> None:
    """Writes the tokenized dataset to `path` (.npz) atomically."""
    arrays = dict(prompt_values=self._prompts.values, prompt_offsets=self._prompts.offsets,
                  ids_values=self._ids.values, ids_offsets=self._ids.offsets,
                  origins=self._origins,
                  meta=np.frombuffer(json.dumps(dict(
                      stats=self.stats, files=self.files, fingerprint=self.fingerprint,
                      max_length=self.max_length, version=CACHE_VERSION)).encode(), np.uint8))
    for k, ragged in enumerate(self._responses):
      arrays[f"response{k}_values"], arrays[f"response{k}_offsets"] = ragged.values, ragged.offsets
    for name, ragged in self._texts.items():
      arrays[f"text_{name}_values"], arrays[f"text_{name}_offsets"] = ragged.values, ragged.offsets
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Write then rename, so a crash or a second process never leaves a half-written cache.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str, tokenizer) -> Optional["_Dataset"]:
    """Reads a dataset written by `save`; None if the file is missing or from another version."""
    if not os.path.exists(path):
      return None
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(data["meta"].tobytes().decode())
      if meta.get("version") != CACHE_VERSION:
        return None
      ragged = lambda name: Ragged(data[f"{name}_values"], data[f"{name}_offsets"])
      responses = [ragged(f"response{k}") for k in range(len(cls._RESPONSE_NAMES))]
      texts = {name: ragged(f"text_{name}") for name in ("prompt", "reference")
               + cls._RESPONSE_NAMES}
      return cls(tokenizer, meta["max_length"], ragged("prompt"), responses, texts,
                 ragged("ids"), data["origins"], meta["files"], meta["stats"],
                 meta["fingerprint"])

  # --- Building from text examples. ----------------------------------------------------------

  @classmethod
  def build(cls, examples: Sequence[Any], tokenizer, settings: tokenize_lib.Truncation,
            stats: Mapping[str, int], fingerprint: str) -> "_Dataset":
    """Tokenizes and truncates text examples (`PairExample`s or `SFTExample`s).

    Args:
      examples: validated text examples.
      tokenizer: from `get_tokenizer`.
      settings: the truncation policy.
      stats: counts so far ('read', 'invalid_skipped', ...); truncation counts are added.
      fingerprint: the cache key of this dataset.

    Returns:
      The dataset; raises DataError when no example is left.
    """
    stats = collections.Counter(stats)
    prompt_ids = tokenizer.encode_prompt_batch([e.prompt for e in examples])  # with BOS
    response_ids = [tokenizer.encode_batch([getattr(e, name) for e in examples])
                    for name in cls._RESPONSE_NAMES]
    # The max_length at which 99% of the examples would fit uncut, for the truncation warning.
    stats["fitting_length"] = lengths_lib.needed(
        [len(p) for p in prompt_ids],
        [max(len(r[i]) for r in response_ids) + 1 for i in range(len(examples))])
    kept, prompts, responses = [], [], [[] for _ in cls._RESPONSE_NAMES]
    for i in range(len(examples)):
      result = tokenize_lib.truncate(prompt_ids[i], [r[i] for r in response_ids],
                                     tokenizer.eos_id, settings, tokenizer.bos_prefix)
      if result is None:
        stats["dropped"] += 1
        continue
      prompt, truncated_responses, prompt_cut, response_cut = result
      stats["prompt_truncated"] += prompt_cut
      stats["response_truncated"] += response_cut
      stats["truncated"] += prompt_cut or response_cut
      kept.append(examples[i])
      prompts.append(prompt)
      for k, r in enumerate(truncated_responses):
        responses[k].append(r)
    stats["examples"] = len(kept)
    if not kept:
      raise DataError(
          f"no examples left to train on: {dict(stats)}. Check config.data.source and "
          "config.data.format, and raise config.data.max_length if every example was dropped.")
    files = sorted({e.source for e in kept})
    file_index = {f: k for k, f in enumerate(files)}
    texts = {"prompt": [e.prompt for e in kept]}
    for name in cls._RESPONSE_NAMES:
      texts[name] = [getattr(e, name) for e in kept]
    texts["reference"] = [getattr(e, "reference", None) or getattr(e, cls._RESPONSE_NAMES[0])
                          for e in kept]
    stats["references"] = sum(bool(getattr(e, "reference", None)) for e in kept)
    origins = np.array([(file_index[e.source], e.line) for e in kept], np.int64).reshape(-1, 2)
    full_stats = {key: int(stats.get(key, 0)) for key in _STAT_KEYS}
    logging.info("Loaded %d examples (%s): %s", len(kept), cls.__name__, full_stats)
    return cls(tokenizer, settings.max_length, Ragged.from_lists(prompts),
               [Ragged.from_lists(r) for r in responses],
               {name: Ragged.from_texts(t) for name, t in texts.items()},
               Ragged.from_texts([e.id for e in kept]), origins, files, full_stats, fingerprint)


class PairDataset(_Dataset):
  """Tokenized preference pairs; `batch` yields `[B, 2, L]` arrays (0 = chosen, 1 = rejected)."""

  _RESPONSE_NAMES = ("chosen", "rejected")

  @property
  def chosen_texts(self) -> list[str]:
    return self._text_list("chosen")

  @property
  def rejected_texts(self) -> list[str]:
    return self._text_list("rejected")


class SFTDataset(_Dataset):
  """Tokenized (prompt, response) demonstrations; `batch` yields `[B, L]` arrays."""

  _RESPONSE_NAMES = ("response",)

  @property
  def response_texts(self) -> list[str]:
    return self._text_list("response")
