"""`config.data.format='hf'`: preference data held by the Hugging Face `datasets` library.

`config.data.source` is a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
or a hub id (`org/name`, read with `datasets.load_dataset`; cached by `datasets` as usual).
Columns are mapped as for jsonl (`config.data.columns`), and every row goes through the same
validation as a file row, named `<source>[<split>], row <n>`. A `DatasetDict`'s split names
become the rows' splits (so `eval_split='auto'` finds `validation` or `test`); a single
`Dataset` is split by `eval_fraction` like a file without splits.

Needs the `datasets` package: `pip install -e ".[hf]"`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Optional

from daa_jax.errors import ConfigError
from daa_jax.errors import DataError

_SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a `datasets` source, read like a data file."""
  name: str  # `<source>[<split>]`: where a row came from, in messages and origins.
  split: Optional[str]
  fingerprint: str  # `datasets`' own fingerprint of the table: the token cache key.
  table: Any  # a `datasets.Dataset`

  def rows(self) -> Iterator[dict]:
    for row in self.table:
      yield dict(row)


def _import():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("config.data.format='hf' needs the `datasets` package: "
                      "pip install -e \".[hf]\" (or pip install datasets).") from e
  return datasets


def splits(source: str) -> list[Split]:
  """The splits of `source` (a `save_to_disk` directory or a hub id), in a stable order."""
  datasets = _import()
  source = source.strip()
  if os.path.isdir(source):
    if not any(os.path.exists(os.path.join(source, m)) for m in _SAVED_MARKERS):
      raise DataError(
          f"config.data.source={source!r} is a directory but not one written by `datasets`' "
          "save_to_disk (no dataset_dict.json or state.json); for .jsonl/.parquet files use "
          "config.data.format='jsonl' or 'parquet'.")
    loaded = datasets.load_from_disk(source)
  elif os.path.exists(source):
    raise DataError(f"config.data.source={source!r} is a file; format 'hf' reads a "
                    "save_to_disk directory or a hub id. For a file use format 'jsonl' or "
                    "'parquet'.")
  else:
    try:
      loaded = datasets.load_dataset(source)
    except Exception as e:  # pylint: disable=broad-except  (hub, network, missing dataset)
      raise DataError(f"config.data.source={source!r}: `datasets` could not load it as a hub "
                      f"dataset ({type(e).__name__}: {str(e)[:300]}). Give a save_to_disk "
                      "directory or a hub id you can reach (HF_HUB_OFFLINE uses the cache).") from e
  if isinstance(loaded, datasets.DatasetDict):
    return [Split(f"{source}[{name}]", name, loaded[name]._fingerprint, loaded[name])  # pylint: disable=protected-access
            for name in sorted(loaded)]
  return [Split(source, None, loaded._fingerprint, loaded)]  # pylint: disable=protected-access
