"""A data source's files: directory/glob/file resolution and content digests (cache keys)."""

from __future__ import annotations

import glob
import hashlib
import os
from daa_jax.errors import DataError


_DATA_EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".arrow")


# Metadata files that HF dataset directories keep beside the data.
_NOT_DATA = ("dataset_info.json", "state.json", "dataset_dict.json", "features.json",
             "config.json")


def resolve_files(source: str, field: str = "source") -> list[str]:
  """Data files of a comma list of files, directories (searched recursively) and globs."""
  files = []
  for item in (s.strip() for s in source.split(",")):
    if not item:
      continue
    if os.path.isdir(item):
      found = []
      for root, dirs, names in os.walk(item):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, n) for n in sorted(names)
                  if n.endswith(_DATA_EXTENSIONS) and n not in _NOT_DATA
                  and not n.startswith(".")]
    elif any(ch in item for ch in "*?["):
      found = sorted(glob.glob(item))
    elif os.path.isfile(item):
      found = [item]
    else:
      raise DataError(f"config.data.{field}: {item} does not exist; fix the path.")
    if not found:
      raise DataError(f"config.data.{field}: no data files ({'/'.join(_DATA_EXTENSIONS)}) in "
                      f"{item}.")
    files += found
  return files


def file_digest(path: str) -> str:
  """sha256 of a file's bytes: the token cache is keyed by content, not by path or mtime."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
