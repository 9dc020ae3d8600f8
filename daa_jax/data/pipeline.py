"""The data entry points: `default_config`, `load_pairs`, `load_sft` and the resumable `Loader`.

`load_pairs`/`load_sft` read, validate, tokenize and truncate a data source once and cache the
result as an npz file keyed by the data files' contents, the tokenizer fingerprint and every
setting that changes the tokens. All validation happens there, before training starts.

`Loader` yields fixed-shape numpy batches (see `dataset.py` for the batch contract) in an
order that is a function of (seed, epoch) only. Each process of a multi-host run takes a
disjoint contiguous slice of every global batch. Its state, `{'epoch': e, 'position': p}`
(p = global batches already yielded in epoch e), is JSON-serializable and restores exactly.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import tempfile
from typing import Any, Iterator, Mapping, Optional

from absl import logging
import ml_collections
import numpy as np

from daa_jax.data import dataset as dataset_lib
from daa_jax.data import hf_datasets
from daa_jax.data import lengths as lengths_lib
from daa_jax.data import readers
from daa_jax.data import synthetic
from daa_jax.data import tokenize as tokenize_lib
from daa_jax.errors import ConfigError, DataError
from daa_jax.data import files as data_files
from daa_jax.data import split as split_lib

FORMATS = ("tldr", "tldr_sft", "hh", "jsonl", "parquet", "tfds", "hf")


def default_config() -> ml_collections.ConfigDict:
  """`config.data`: defaults fit the built-in synthetic task.

  For TL;DR with Pythia: source=<comparisons file or dir>, format='tldr',
  tokenizer='EleutherAI/pythia-1b', max_length=512, max_prompt_length=256 (the DPO code's).
  """
  c = ml_collections.ConfigDict()
  c.source = "synthetic"  # 'synthetic', a file, a directory, a glob, or a comma list of them.
  c.format = "jsonl"  # One of FORMATS; ignored for 'synthetic'.
  c.tokenizer = "bytes"  # 'bytes', a tokenizer.json/directory, or a HF hub id.
  # 0 ('auto'): fitted to the data (lengths.py: 99% of examples fit; the synthetic task's
  # exact 38 / 21), and written as numbers to the run's config.json.
  c.max_length = 0  # Tokens of prompt + response + EOS: the batch length L.
  c.max_prompt_length = 0  # Prompts are cut to this only when an example does not fit.
  c.truncation_side = "keep_end"  # Of an over-long prompt keep the end (near "TL;DR:").
  c.overlong = "truncate"  # 'truncate' or 'drop' examples that do not fit max_length.
  c.chat_template = ""  # "": off; 'tokenizer': the tokenizer's chat_template; or a .jinja
  # file. Dialogue (HH) prompts become the template's user/model turns (daa_jax/data/chat.py).
  c.skip_invalid = False  # True: skip and count malformed rows instead of raising DataError.
  c.columns = ml_collections.ConfigDict(dict(readers.DEFAULT_COLUMNS))  # Generic formats.
  c.eval_source = ml_collections.config_dict.placeholder(str)  # Eval files; else a held-out
  # split: rows' `split` field or split names in file names (see eval_split), else a
  # deterministic eval_fraction of the prompts.
  c.eval_split = "auto"  # 'auto': the first of valid1/validation/valid/test/eval/dev present.
  c.eval_fraction = 0.05  # Of prompts held out (by a hash of the prompt) when no split exists.
  c.cache_dir = ml_collections.config_dict.placeholder(str)  # None: <workdir>/data_cache.
  c.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # format='tfds' output dir;
  # None: <cache_dir>/tfds.
  c.synthetic = synthetic.default_config()
  return c


def truncation_settings(cfg: ml_collections.ConfigDict) -> tokenize_lib.Truncation:
  """The length settings of `config.data`, validated (raises ConfigError); 'auto' lengths
  (0) must have been resolved (`resolve_lengths`)."""
  if int(cfg.max_length) < 0 or (cfg.max_prompt_length is not None
                                 and int(cfg.max_prompt_length) < 0):
    raise ConfigError(f"config.data.max_length={cfg.max_length}, max_prompt_length="
                      f"{cfg.max_prompt_length}: use positive token counts, or 0 to fit them to "
                      "the data.")
  return tokenize_lib.Truncation(
      max_length=int(cfg.max_length),
      max_prompt_length=None if cfg.max_prompt_length is None else int(cfg.max_prompt_length),
      truncation_side=cfg.truncation_side, overlong=cfg.overlong)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the `config.data` field at fault."""
  if not cfg.source:
    raise ConfigError("config.data.source is empty; give 'synthetic' or data file paths.")
  if cfg.source != "synthetic" and cfg.format not in FORMATS:
    raise ConfigError(f"config.data.format={cfg.format!r}; use one of {FORMATS}.")
  if not 0.0 < cfg.eval_fraction < 1.0:
    raise ConfigError(f"config.data.eval_fraction={cfg.eval_fraction}; use a value in (0, 1).")
  if int(cfg.max_length) > 0 and (cfg.max_prompt_length is None
                                  or int(cfg.max_prompt_length) != 0):
    truncation_settings(cfg)
  if cfg.source == "synthetic":
    synthetic.SyntheticTask(cfg.synthetic)


def _cache_root(cfg, workdir: Optional[str]) -> str:
  if cfg.cache_dir:
    return cfg.cache_dir
  if workdir and "://" not in str(workdir):
    return os.path.join(workdir, "data_cache")
  # No workdir, or a remote one (gs://): the cache is written with local file APIs, so it
  # lives on each host's local disk (keyed by fingerprint, safe to share between runs).
  return os.path.join(tempfile.gettempdir(), "daa_jax_data_cache")


def _plan(cfg, kind: str, split: str, workdir: Optional[str]) -> dict:
  """Which files to read, how, and which of their examples to keep."""
  if cfg.source == "synthetic":
    if split not in ("train", "eval"):
      raise ConfigError(f"split {split!r}: the synthetic task has 'train' and 'eval' only.")
    paths = synthetic.SyntheticTask(cfg.synthetic).files(_cache_root(cfg, workdir))
    name = {("pairs", "train"): "pairs", ("pairs", "eval"): "eval_pairs",
            ("sft", "train"): "sft", ("sft", "eval"): "eval"}[kind, split]
    columns = dict(readers.DEFAULT_COLUMNS)
    if kind == "pairs" and cfg.synthetic.get("pairs_dir"):
      path = os.path.join(cfg.synthetic.pairs_dir, f"{name}.jsonl")
      if not os.path.exists(path):
        raise ConfigError(f"config.data.synthetic.pairs_dir={cfg.synthetic.pairs_dir!r} has no "
                          f"{name}.jsonl; write pairs there or unset the field.")
      return dict(files=[path], fmt="jsonl", columns=columns, select=None)
    if name == "eval":  # eval.jsonl holds (prompt, reference): its SFT response is the reference.
      columns["response"] = "reference"
    return dict(files=[paths[name]], fmt="jsonl", columns=columns, select=None)
  columns = dict(cfg.columns)
  if kind == "pairs" and cfg.format == "tldr_sft":
    raise ConfigError("config.data.format='tldr_sft' has no preference pairs; use 'tldr' for "
                      "the comparisons.")
  if cfg.format == "tfds":
    if kind == "sft":
      raise ConfigError("config.data.format='tfds' holds TL;DR comparisons; for SFT use "
                        "format='tldr' on the comparison files or a 'tldr_sft' file.")
    from daa_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    data_dir, files = tfds_builder.prepare(
        cfg.source, cfg.tfds_data_dir or os.path.join(_cache_root(cfg, workdir), "tfds"),
        skip_invalid=cfg.skip_invalid)
    return dict(files=files, fmt="tfds", columns=columns, tfds_data_dir=data_dir,
                select=dict(split=split, separate_eval=False))
  find = hf_datasets.splits if cfg.format == "hf" else data_files.resolve_files
  if split == "eval" and cfg.eval_source:
    return dict(files=(hf_datasets.splits(cfg.eval_source) if cfg.format == "hf" else
                       data_files.resolve_files(cfg.eval_source, "eval_source")), fmt=cfg.format,
                columns=columns, select=None)
  return dict(files=find(cfg.source), fmt=cfg.format, columns=columns,
              select=dict(split=split, separate_eval=bool(cfg.eval_source)))


def _digest(item) -> str:
  return item.fingerprint if isinstance(item, hf_datasets.Split) else data_files.file_digest(item)


def _read_examples(plan: dict, kind: str, skip_invalid: bool, stats) -> list:
  if plan["fmt"] == "tfds":
    from daa_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    return tfds_builder.read_examples(plan["tfds_data_dir"], stats)
  read = readers.read_pairs if kind == "pairs" else readers.read_sft
  return list(read(plan["files"], plan["fmt"], plan["columns"], skip_invalid, stats))


def resolve_lengths(cfg: ml_collections.ConfigDict, kind: str = "pairs",
                    workdir: Optional[str] = None,
                    max_positions: int = 2048) -> ml_collections.ConfigDict:
  """Replaces 'auto' (0) `max_length` / `max_prompt_length` of `cfg` in place; returns cfg.

  The synthetic task's lengths are exact (prompt + separator, longest response + EOS);
  other data are read and tokenized (all splits of `source`) and fitted by `lengths.fit`.

  Args:
    cfg: `config.data`.
    kind: 'pairs' (both responses count) or 'sft'.
    workdir: for the synthetic task's and TFDS' generated files.
    max_positions: the model's position limit.
  """
  if int(cfg.max_length) > int(max_positions):
    raise ConfigError(
        f"config.data.max_length={int(cfg.max_length)} is above the model's "
        f"max_position_embeddings={int(max_positions)}: positions past it have no embedding. "
        f"Set --config.data.max_length={int(max_positions)} or less (or 0 to fit the data), "
        "or use a model with more positions.")
  auto_length = int(cfg.max_length) == 0
  auto_prompt = cfg.max_prompt_length is not None and int(cfg.max_prompt_length) == 0
  if not (auto_length or auto_prompt):
    return cfg
  validate(cfg)
  if cfg.source == "synthetic":
    s = cfg.synthetic
    fitted = (s.prompt_length + 1 + s.max_response_length + 1, s.prompt_length + 1)
  else:
    tokenizer = tokenize_lib.get_tokenizer(cfg.tokenizer)
    plan = _plan(cfg, kind, "train", workdir)
    examples = _read_examples(plan, kind, cfg.skip_invalid, collections.Counter())
    names = ("chosen", "rejected") if kind == "pairs" else ("response",)
    prompt_ids = tokenizer.encode_batch([e.prompt for e in examples])
    responses = [tokenizer.encode_batch([getattr(e, n) for e in examples]) for n in names]
    fitted = lengths_lib.fit([len(p) for p in prompt_ids],
                             [max(len(r[i]) for r in responses) + 1
                              for i in range(len(examples))], max_positions)
  if auto_length:
    cfg.max_length = int(min(fitted[0], max_positions))
  if auto_prompt:
    cfg.max_prompt_length = int(min(fitted[1], int(cfg.max_length) - 1))
  logging.info("config.data lengths fitted to %s: max_length=%d, max_prompt_length=%s",
               cfg.source, cfg.max_length, cfg.max_prompt_length)
  return cfg


def _load(cfg, kind: str, split: str, workdir: Optional[str]):
  validate(cfg)
  if int(cfg.max_length) == 0 or cfg.max_prompt_length == 0:
    cfg = resolve_lengths(ml_collections.ConfigDict(cfg.to_dict()), kind, workdir)
  settings = truncation_settings(cfg)
  tokenizer = tokenize_lib.get_tokenizer(cfg.tokenizer)
  plan = _plan(cfg, kind, split, workdir)
  template = None
  if cfg.get("chat_template"):
    from daa_jax.data import chat  # pylint: disable=g-import-not-at-top
    template = chat.ChatTemplate.load(cfg.chat_template, cfg.tokenizer)
  key = dict(
      version=dataset_lib.CACHE_VERSION, kind=kind, split=split, fmt=plan["fmt"],
      columns=plan["columns"], select=plan["select"],
      files=[_digest(f) for f in plan["files"]], tokenizer=tokenizer.fingerprint,
      truncation=settings.__dict__, skip_invalid=bool(cfg.skip_invalid),
      eval_split=cfg.eval_split, eval_fraction=cfg.eval_fraction)
  if template is not None:
    key["chat_template"] = template.fingerprint
  fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
  cls = dataset_lib.PairDataset if kind == "pairs" else dataset_lib.SFTDataset
  cache_path = os.path.join(_cache_root(cfg, workdir), f"{kind}-{split}-{fingerprint}.npz")
  cached = cls.load(cache_path, tokenizer)
  if cached is not None:
    logging.info("Loaded %s %s data from cache %s: %s", kind, split, cache_path, cached.stats)
    cached.from_cache = True
    _warn_truncation(cached, settings, kind, split)
    return cached
  stats = collections.Counter()
  examples = _read_examples(plan, kind, cfg.skip_invalid, stats)
  if not examples and stats["skipped_other_domain"]:
    raise DataError(
        f"config.data.{'eval_source' if plan['select'] is None and split == 'eval' else 'source'}"
        f": all {stats['read']} rows of {', '.join(plan['files'])} were skipped as another "
        f"domain ({stats['skipped_other_domain']} CNN/DailyMail rows: `info.post` is null); "
        "give files with TL;DR rows (`info.post` set).")
  if plan["select"] is not None:
    examples, stats["other_split"] = split_lib._select(examples, cfg=cfg, **plan["select"])
  if kind == "sft" and plan["fmt"] == "tldr":
    # One summary can be chosen in several comparisons; train on it once.
    seen, unique = set(), []
    for e in examples:
      if (e.prompt, e.response) not in seen:
        seen.add((e.prompt, e.response))
        unique.append(e)
    stats["duplicates_removed"] = len(examples) - len(unique)
    examples = unique
  if template is not None:
    examples = chat.apply(examples, template)
  built = cls.build(examples, tokenizer, settings, stats, fingerprint)
  built.save(cache_path)
  built.from_cache = False
  _warn_truncation(built, settings, kind, split)
  return built


def _warn_truncation(dataset, settings, kind: str, split: str) -> None:
  lengths_lib.warn_truncation(dataset.stats, settings.max_length,
                              f"{'pairs' if kind == 'pairs' else 'SFT examples'} ({split})",
                              dataset.stats.get("fitting_length") or None)


def load_pairs(data_config: ml_collections.ConfigDict, split: str = "train",
               workdir: Optional[str] = None) -> dataset_lib.PairDataset:
  """Loads, validates, tokenizes and caches preference pairs.

  Args:
    data_config: `config.data` (see `default_config`).
    split: 'train', 'eval', or a split name of the data ('valid2').
    workdir: the run's directory; the cache goes to `<workdir>/data_cache` unless
      `data_config.cache_dir` is set.

  Returns:
    A `PairDataset`. Raises DataError on a malformed row (unless skip_invalid) and ConfigError
    on a bad config value.
  """
  return _load(data_config, "pairs", split, workdir)


def load_sft(data_config: ml_collections.ConfigDict, split: str = "train",
             workdir: Optional[str] = None) -> dataset_lib.SFTDataset:
  """Loads SFT demonstrations: the synthetic demonstrator's, a 'tldr_sft' file's, or the
  chosen responses of 'tldr'/'hh'/generic pair files (deduplicated for 'tldr').

  For the synthetic task, split='eval' gives the held-out prompts with their reference
  summaries as responses (what win rates are judged against). Args as in `load_pairs`.
  """
  return _load(data_config, "sft", split, workdir)


class Loader:
  """Deterministic, resumable batches of a dataset.

  Iterating yields dicts of numpy arrays (`dataset.batch`), per process: rows
  [process_index * b, (process_index + 1) * b) of each global batch, b = batch_size /
  process_count. Training (drop_remainder=True) repeats epochs forever unless num_epochs is
  given; each epoch is a fresh permutation drawn from (seed, epoch). Evaluation
  (drop_remainder=False, usually shuffle=False) runs one epoch, covers every example once, and
  pads the last batch with copies of a real example marked by `valid [b] int32` = 0.
  """

  def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int = 0, process_count: int = 1,
               num_epochs: Optional[int] = None, state: Optional[Mapping[str, int]] = None):
    if batch_size < 1 or batch_size % process_count:
      raise ConfigError(f"batch_size={batch_size} must be a positive multiple of the process "
                        f"count {process_count}.")
    if not 0 <= process_index < process_count:
      raise ConfigError(f"process_index={process_index} is outside [0, {process_count}).")
    self.dataset = dataset
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed = int(seed)
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.num_epochs = num_epochs if num_epochs is not None or drop_remainder else 1
    self._epoch, self._position = 0, 0
    self._order_cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))
    if state is not None:
      self.restore(state)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch."""
    if self.drop_remainder:
      return len(self.dataset) // self.batch_size
    return math.ceil(len(self.dataset) / self.batch_size)

  def state(self) -> dict[str, int]:
    """Where the next batch comes from; JSON-serializable."""
    return {"epoch": self._epoch, "position": self._position}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from a `state()`: the next batch is the one that would have followed."""
    try:
      epoch, position = int(state["epoch"]), int(state["position"])
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"loader state {state!r} is not {{'epoch': int, 'position': int}}.") from e
    if epoch < 0 or not 0 <= position <= self.steps_per_epoch:
      raise DataError(f"loader state {state!r} is out of range for {self.steps_per_epoch} steps "
                      "per epoch; was the checkpoint written with another dataset or batch size?")
    self._epoch, self._position = epoch, position
    self._roll()

  def _roll(self) -> None:
    if self._position >= self.steps_per_epoch:
      self._epoch, self._position = self._epoch + 1, 0

  def epoch_order(self, epoch: int) -> np.ndarray:
    """[N] int64: the example order of `epoch`, a function of (seed, epoch) only."""
    if self._order_cache[0] != epoch:
      num = len(self.dataset)
      order = (np.random.default_rng([self.seed, epoch]).permutation(num) if self.shuffle
               else np.arange(num))
      self._order_cache = (epoch, order.astype(np.int64))
    return self._order_cache[1]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    if self.steps_per_epoch == 0:  # Checked here, so callers may inspect steps_per_epoch first.
      raise ConfigError(f"batch_size={self.batch_size} exceeds the {len(self.dataset)} "
                        "examples of the dataset; lower the batch size or add data.")
    start = self._position * self.batch_size
    indices = self.epoch_order(self._epoch)[start:start + self.batch_size]
    valid = np.ones(self.batch_size, np.int32)
    if len(indices) < self.batch_size:  # Only without drop_remainder: the padded last batch.
      valid[len(indices):] = 0
      indices = np.concatenate([indices, np.full(self.batch_size - len(indices), indices[0])])
    rows = slice(self.process_index * self.local_batch_size,
                 (self.process_index + 1) * self.local_batch_size)
    batch = self.dataset.batch(indices[rows])
    if not self.drop_remainder:
      batch["valid"] = valid[rows]
    self._position += 1
    self._roll()
    return batch
