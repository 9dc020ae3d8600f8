"""A TFDS builder of the TL;DR comparisons, read back without TensorFlow.

`tensorflow_datasets` (with `array_record`) can write array_record files and read them with
`tfds.data_source` without TensorFlow installed (`tfds.load` would need it). Both are optional:
`pip install tensorflow-datasets array_record`. They are imported only here, only when
`config.data.format == 'tfds'`.

The builder reads OpenAI's summarize_from_feedback comparison files from a manual directory
through the same validating reader as format 'tldr', and writes one TFDS split per value of
the rows' `split` field ('train', 'valid1', 'valid2'). Prepared data lands in
`<data_dir>/<hash of the manual files>-<strict|skip>/`, so changed files are prepared anew.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
from typing import Optional

from daa_jax.data import readers
from daa_jax.errors import ConfigError, DataError
from daa_jax.data import files as data_files

NAME = "tldr_comparisons"
_STATS_FILE = "prepare_stats.json"


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import array_record  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError("config.data.format='tfds' needs tensorflow-datasets and array_record: "
                      "`pip install tensorflow-datasets array_record` (TensorFlow is not "
                      "needed), or use format='tldr' on the JSON files directly.") from e
  return tfds


@functools.lru_cache(maxsize=None)
def builder_class():
  """The `TldrComparisons` builder class, defined on first use (it subclasses a tfds class)."""
  tfds = _tfds()
  import numpy as np  # pylint: disable=g-import-not-at-top

  class TldrComparisons(tfds.core.GeneratorBasedBuilder):
    """OpenAI summarize_from_feedback TL;DR comparisons as (prompt, chosen, rejected) text."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Copy summarize_from_feedback's comparisons/batch*.json (JSON lines) into the manual "
        "directory (config.data.source).")

    # TFDS looks for a checksums file next to the builder's code through the third-party
    # `importlib_resources`, which it does not install; a manual-download builder has no URLs
    # to check, so say there is no code path.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # pylint: disable=no-self-argument
      return None

    def __init__(self, *, skip_invalid: bool = False, **kwargs):
      self._skip_invalid = skip_invalid
      self.prepare_stats = collections.Counter()
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=__doc__,
          features=tfds.features.FeaturesDict({
              "prompt": tfds.features.Text(), "chosen": tfds.features.Text(),
              "rejected": tfds.features.Text(), "id": tfds.features.Text(),
              "source": tfds.features.Text(), "line": np.int64}))

    def _split_generators(self, dl_manager):
      manual_dir = os.fspath(dl_manager.manual_dir)
      files = data_files.resolve_files(manual_dir)
      by_split = collections.defaultdict(list)
      for e in readers.read_pairs(files, "tldr", skip_invalid=self._skip_invalid,
                                  stats=self.prepare_stats):
        by_split[e.split or "train"].append(e)
      if not by_split:
        raise DataError(f"no TL;DR comparisons in {manual_dir}; check config.data.source.")
      return {split: self._generate_examples(examples) for split, examples in by_split.items()}

    def _generate_examples(self, examples):
      for e in examples:
        yield f"{e.source}:{e.line}", dict(prompt=e.prompt, chosen=e.chosen,
                                           rejected=e.rejected, id=e.id, source=e.source,
                                           line=e.line)

  return TldrComparisons


def _prepared_dir(data_dir: str) -> Optional[str]:
  """`data_dir/tldr_comparisons/<version>` if data_dir holds prepared data."""
  root = os.path.join(data_dir, NAME)
  if not os.path.isdir(root):
    return None
  versions = sorted(v for v in os.listdir(root)
                    if os.path.exists(os.path.join(root, v, "dataset_info.json")))
  return os.path.join(root, versions[-1]) if versions else None


def prepare(source: str, data_dir: str, skip_invalid: bool = False) -> tuple[str, list[str]]:
  """Prepares the TFDS dataset unless `source` or the keyed data dir already holds it.

  Args:
    source: a TFDS data dir holding prepared `tldr_comparisons`, or the manual directory
      of comparison JSON files.
    data_dir: where to prepare (config.data.tfds_data_dir).
    skip_invalid: skip malformed rows instead of raising DataError.

  Returns:
    (the TFDS data_dir to read, the prepared files, whose contents key the token cache).
  """
  tfds = _tfds()
  if _prepared_dir(source) is None:
    if not os.path.isdir(source):
      raise DataError(f"config.data.source={source!r}: format 'tfds' wants a directory (the "
                      "manual dir of comparison files, or a prepared TFDS data dir).")
    digest = hashlib.sha256()
    for path in data_files.resolve_files(source):
      digest.update(data_files.file_digest(path).encode())
    target = os.path.join(data_dir, f"{digest.hexdigest()[:16]}-"
                          f"{'skip' if skip_invalid else 'strict'}")
    if _prepared_dir(target) is None:
      builder = builder_class()(data_dir=target, file_format="array_record",
                                skip_invalid=skip_invalid)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=source))
      with open(os.path.join(_prepared_dir(target), _STATS_FILE), "w") as f:
        json.dump(dict(builder.prepare_stats), f)
    source = target
  prepared = _prepared_dir(source)
  files = sorted(os.path.join(prepared, n) for n in os.listdir(prepared))
  return source, files


def read_examples(data_dir: str, stats: Optional[collections.Counter] = None
                  ) -> list[readers.PairExample]:
  """All examples of a prepared data dir via `tfds.data_source`, in original file order."""
  tfds = _tfds()
  builder_class()  # Registers the builder name for tfds.data_source.
  info = tfds.builder(NAME, data_dir=data_dir).info
  examples = []
  for split in info.splits:
    source = tfds.data_source(NAME, data_dir=data_dir, split=split)
    for i in range(len(source)):
      record = source[i]
      text = lambda key: record[key].decode("utf-8") if isinstance(record[key], bytes) else str(
          record[key])
      examples.append(readers.PairExample(
          prompt=text("prompt"), chosen=text("chosen"), rejected=text("rejected"),
          id=text("id"), split=split, source=text("source"), line=int(record["line"])))
  # TFDS shuffles records when writing; file order makes 'tfds' and 'tldr' datasets identical.
  examples.sort(key=lambda e: (e.source, e.line))
  stats_path = os.path.join(_prepared_dir(data_dir), _STATS_FILE)
  if stats is not None and os.path.exists(stats_path):
    with open(stats_path) as f:
      stats.update(json.load(f))
  return examples
