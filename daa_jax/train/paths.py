"""A config's local paths, made absolute once where a job starts (main.py), so a relative
path means the same file from the working directory whichever module opens it later."""

from __future__ import annotations

import glob
import os

import ml_collections


# Path fields, by dotted suffix (matched at the root and inside a study's `sft`/`daa`).
# Always local: made absolute (orbax refuses relative paths). Local if present: a hub id such
# as `EleutherAI/pythia-1b` looks like a relative path, so only an existing local file or
# directory (a matching glob for data sources) is made absolute; anything else is left as
# typed. URLs (gs://...) are never touched.
LOCAL_PATHS = ("init_from", "run", "data.cache_dir", "data.tfds_data_dir",
               "data.synthetic.pairs_dir", "judge.cache_path")
LOCAL_IF_PRESENT = ("hf_model", "data.source", "data.eval_source", "data.tokenizer",
                    "data.chat_template", "eval.reference_source", "judge.reward_model",
                    "judge.tokenizer")
# Values of those fields that are keywords, not paths.
_PATH_KEYWORDS = ("synthetic", "bytes", "tokenizer")


def absolute_path(path: str) -> str:
  """`path` made absolute against the working directory (`~` expanded); URLs unchanged."""
  if not path or "://" in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def _absolute_if_present(value: str, comma_list: bool) -> str:
  items = [s.strip() for s in value.split(",")] if comma_list else [value]
  out = []
  for item in items:
    local = os.path.expanduser(item)
    if item and item not in _PATH_KEYWORDS and "://" not in item and (
        os.path.exists(local) or (comma_list and glob.glob(local))):
      item = os.path.abspath(local)
    out.append(item)
  return ",".join(out)


def resolve_paths(config) -> None:
  """Makes the config's local paths absolute, in place (`LOCAL_PATHS`, `LOCAL_IF_PRESENT`).

  Called once where a job starts (main.py), so every relative path a user types means the
  same file from the working directory whichever module opens it later. `init_from`'s
  `@STEP` suffix is kept.
  """
  def walk(node, prefix):
    for key in list(node.keys()):
      value = node[key]
      path = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{path}.")
        continue
      if not isinstance(value, str) or not value:
        continue
      matches = lambda table: any(path == s or path.endswith("." + s) for s in table)
      if matches(LOCAL_PATHS):
        head, at, step = value.partition("@") if key == "init_from" else (value, "", "")
        node[key] = absolute_path(head) + at + step
      elif matches(LOCAL_IF_PRESENT):
        node[key] = _absolute_if_present(value, comma_list=key in (
            "source", "eval_source", "reference_source"))
  walk(config, "")
