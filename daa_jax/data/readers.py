"""Readers of preference and SFT data files: TL;DR comparisons and SFT, Anthropic HH, generic.

Every reader turns rows into text examples with their origin (file, 1-based line or row) and
validates them as it goes: a malformed row raises `DataError` naming the file, the line and the
fix, or, with `skip_invalid=True`, is logged and counted in `stats['invalid_skipped']`. All of
this happens when a dataset is loaded, before any training step.

File types are told apart by extension: `.parquet` and `.arrow` (HF `save_to_disk`) are read
with pyarrow, rows numbered from 1; anything else (`.jsonl`, `.json`, `.jsonl.gz`, `.json.gz`)
is JSON lines, one object per line. OpenAI's summarize_from_feedback files are named
`batch*.json` but are JSON lines too.

Formats (`config.data.format`):
  tldr:     OpenAI summarize_from_feedback comparisons: `info.{post,title,subreddit}`,
            `summaries[].text`, `choice` (index of the preferred summary), `split`.
  tldr_sft: TL;DR SFT rows, either CarperAI/openai_summarize_tldr (`prompt`, `label`) or the
            original filtered TL;DR (`subreddit`, `title`, `post`, `summary`).
  hh:       Anthropic HH-RLHF: `chosen`/`rejected` full dialogues sharing a prompt.
  jsonl, parquet: generic rows with configurable column names (prompt, chosen, rejected,
            response for SFT, optional reference), taken verbatim.
  hf:       the same generic rows from a `datasets` source (hf_datasets.py); `paths` then
            holds its splits instead of file names.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Optional

from absl import logging

from daa_jax.errors import DataError

PAIR_FORMATS = ("tldr", "hh", "jsonl", "parquet", "hf")
SFT_FORMATS = ("tldr", "tldr_sft", "hh", "jsonl", "parquet", "hf")
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
HH_ASSISTANT = "\n\nAssistant:"
DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                   "response": "response", "reference": "reference"}
_SKIP_FIX = "or set config.data.skip_invalid=True to skip such rows"
# Split names recognised in file names (HF dataset dirs: `train-00000-of-00001.parquet`,
# hh-rlhf: `test.jsonl.gz`), used when rows carry no `split` field.
_FILE_SPLITS = ("train", "test", "valid", "validation", "valid1", "valid2", "eval", "dev")
_MAX_LOGGED_INVALID = 10


@dataclasses.dataclass(frozen=True)
class PairExample:
  """One preference pair as text, with where it came from."""
  prompt: str
  chosen: str
  rejected: str
  id: str
  split: Optional[str]
  source: str
  line: int  # 1-based line (JSON lines) or row (Parquet).
  reference: Optional[str] = None  # A reference summary for win rates, when the file has one.


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """One (prompt, response) demonstration as text, with where it came from."""
  prompt: str
  response: str
  id: str
  split: Optional[str]
  source: str
  line: int
  reference: Optional[str] = None  # A human reference for win rates, when the file has one.


class _RowError(Exception):
  """A problem with one row; the reader adds the file and line."""

  def __init__(self, problem: str, fix: str):
    super().__init__(problem)
    self.problem = problem
    self.fix = fix


class _SkipRow(Exception):
  """A well-formed row outside the task (a CNN/DM row in the TL;DR comparisons)."""


def _field(row: Mapping[str, Any], name: str, types=str, where: str = "", fix: str = "") -> Any:
  """Returns row[name], checking presence and type."""
  if name not in row or row[name] is None:
    raise _RowError(f"missing field {where}{name!r}",
                    fix or f"add {where}{name!r} or check config.data.format")
  value = row[name]
  # bool is an int subclass; a `choice` of true is a mistake, not an index.
  if not isinstance(value, types) or (types is int and isinstance(value, bool)):
    want = getattr(types, "__name__", str(types))
    raise _RowError(f"field {where}{name!r} should be {want}, got {type(value).__name__}",
                    f"store {where}{name!r} as {want}")
  return value


def _nonempty(text: str, what: str) -> str:
  if not text.strip():
    raise _RowError(f"the {what} is empty", f"remove the row or give it a non-empty {what}")
  return text


# A response that is empty or only whitespace is a legitimate row (a policy sample that is only
# EOS; the real HH test file has four empty chosen responses; the DPO reference code trains on
# them): it is kept, tokenized as EOS alone, and counted in the data statistics.
_RESPONSE_FIELDS = ("chosen", "rejected", "response")


def _distinct(chosen: str, rejected: str) -> None:
  if chosen == rejected:
    raise _RowError("chosen and rejected responses are identical",
                    "remove the row: an identical pair carries no preference")


def join_space(prompt: str, response: str) -> str:
  """Prefixes `response` with one space unless it or the end of `prompt` is whitespace.

  We tokenize prompt and response separately, so the space between "TL;DR:" and the summary
  must belong to one of them. It goes to the response: byte-level BPEs (GPT-NeoX) fold a leading
  space into the first word's token, so " word" is how the word appears after "TL;DR:" in
  pretraining text, and the prompt then ends on a stable "TL;DR:" token.
  """
  if response[:1].isspace() or prompt[-1:].isspace():
    return response
  return " " + response


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
  """The TL;DR prompt: `SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:`."""
  return TLDR_PROMPT.format(subreddit=subreddit, title=title, post=post)


def hh_split(dialogue: str) -> tuple[str, str]:
  """Splits an HH dialogue after its last "\\n\\nAssistant:" into (prompt, response)."""
  cut = dialogue.rfind(HH_ASSISTANT)
  if cut < 0:
    raise _RowError("the dialogue has no '\\n\\nAssistant:' turn",
                    "check that the file is Anthropic HH-RLHF (config.data.format='hh')")
  cut += len(HH_ASSISTANT)
  return dialogue[:cut], dialogue[cut:]


# --- Row parsers: dict -> fields. Each raises _RowError or _SkipRow. --------------------------


def _tldr_comparison(row: Mapping[str, Any]) -> dict:
  info = _field(row, "info", dict)
  if info.get("post") is None:
    if info.get("article") is not None:
      raise _SkipRow()  # CNN/DailyMail rows share the comparison files; not TL;DR.
    raise _RowError("missing field 'info.post'", "check config.data.format ('tldr' expects "
                    "OpenAI summarize_from_feedback comparisons)")
  prompt = tldr_prompt(_field(info, "subreddit", where="info."),
                       _field(info, "title", where="info."), _field(info, "post", where="info."))
  summaries = _field(row, "summaries", list)
  if len(summaries) != 2:
    raise _RowError(f"expected 2 summaries, got {len(summaries)}", "keep rows that compare two")
  texts = []
  for k, summary in enumerate(summaries):
    if not isinstance(summary, dict):
      raise _RowError(f"summaries[{k}] should be an object", "store summaries as {'text': ...}")
    texts.append(_field(summary, "text", where=f"summaries[{k}]."))
  choice = _field(row, "choice", int)
  if choice not in (0, 1):
    raise _RowError(f"'choice' is {choice}, not 0 or 1", "choice indexes the preferred summary")
  chosen, rejected = texts[choice], texts[1 - choice]
  _distinct(chosen.strip(), rejected.strip())
  split = row.get("split")
  return dict(prompt=prompt, chosen=join_space(prompt, chosen),
              rejected=join_space(prompt, rejected), id=str(info.get("id", "")),
              split=split if isinstance(split, str) else None)


def _tldr_sft(row: Mapping[str, Any]) -> dict:
  if "label" in row or "prompt" in row:  # CarperAI/openai_summarize_tldr.
    prompt, response = _field(row, "prompt"), _field(row, "label")
  elif "summary" in row or "post" in row:  # The original filtered TL;DR rows.
    prompt = tldr_prompt(_field(row, "subreddit"), _field(row, "title"), _field(row, "post"))
    response = _field(row, "summary")
  else:
    raise _RowError("the row has neither 'prompt'/'label' nor 'subreddit'/'title'/'post'/"
                    "'summary'", "check config.data.format ('tldr_sft')")
  _nonempty(prompt, "prompt")
  return dict(prompt=prompt, response=join_space(prompt, response), id=str(row.get("id", "")))


def _hh_pair(row: Mapping[str, Any]) -> dict:
  chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
  prompt, chosen_response = hh_split(chosen)
  if not rejected.startswith(prompt):
    raise _RowError("chosen and rejected do not share the dialogue up to the last "
                    "'\\n\\nAssistant:' of the chosen one",
                    "both dialogues must differ only in the final assistant turn")
  rejected_response = rejected[len(prompt):]
  _distinct(chosen_response, rejected_response)
  return dict(prompt=prompt, chosen=chosen_response, rejected=rejected_response)


def _hh_sft(row: Mapping[str, Any]) -> dict:
  prompt, response = hh_split(_field(row, "chosen"))
  return dict(prompt=prompt, response=response)


def _columns_fix(name: str) -> str:
  return f"add the column or map it with config.data.columns.{name}"


def _generic_pair(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict:
  prompt = _nonempty(_field(row, columns["prompt"], fix=_columns_fix("prompt")), "prompt")
  chosen = _field(row, columns["chosen"], fix=_columns_fix("chosen"))
  rejected = _field(row, columns["rejected"], fix=_columns_fix("rejected"))
  _distinct(chosen, rejected)
  reference = row.get(columns["reference"])
  if reference is not None and not isinstance(reference, str):
    raise _RowError(f"field {columns['reference']!r} should be str", "store it as a string")
  return dict(prompt=prompt, chosen=chosen, rejected=rejected, reference=reference)


def _generic_sft(row: Mapping[str, Any], columns: Mapping[str, str]) -> dict:
  prompt = _nonempty(_field(row, columns["prompt"], fix=_columns_fix("prompt")), "prompt")
  # A pairs file serves SFT through its chosen responses.
  name = columns["response"] if columns["response"] in row else columns["chosen"]
  reference = row.get(columns["reference"]) if name != columns["reference"] else None
  if reference is not None and not isinstance(reference, str):
    raise _RowError(f"field {columns['reference']!r} should be str", "store it as a string")
  return dict(prompt=prompt, response=_field(row, name, fix=_columns_fix("response")),
              reference=reference)


# --- Files -> rows. ------------------------------------------------------------------------


def split_from_filename(path: str) -> Optional[str]:
  """The split name in a file's name (`test.jsonl.gz` -> 'test'), or None."""
  for token in re.split(r"[-_.]", os.path.basename(path).lower()):
    if token in _FILE_SPLITS:
      return token
  return None


def _record_batches(path: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if path.endswith(".parquet"):
    return pq.ParquetFile(path).iter_batches(batch_size=1024)
  try:  # HF `save_to_disk` writes the Arrow IPC stream format; others write the file format.
    return iter(pa.ipc.open_stream(path))
  except pa.ArrowInvalid:
    reader = pa.ipc.open_file(path)
    return (reader.get_batch(i) for i in range(reader.num_record_batches))


def _iter_table_rows(path: str) -> Iterator[tuple[int, Optional[dict], Optional[_RowError]]]:
  """Rows of a Parquet or Arrow file, numbered from 1."""
  number = 0
  for batch in _record_batches(path):
    for row in batch.to_pylist():
      number += 1
      error = None
      for key, value in row.items():
        if isinstance(value, bytes):  # A binary column: decode it as UTF-8 text.
          try:
            row[key] = value.decode("utf-8")
          except UnicodeDecodeError as e:
            error = _RowError(f"column {key!r} is not valid UTF-8 ({e.reason} at byte {e.start})",
                              "re-encode the text as UTF-8")
            break
      yield number, (None if error else row), error


def _iter_rows(path: str) -> Iterator[tuple[int, Optional[dict], Optional[_RowError]]]:
  """Yields (1-based line or row, row dict or None, error or None) for each non-blank row."""
  if path.endswith((".parquet", ".arrow")):
    yield from _iter_table_rows(path)
    return
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield number, None, _RowError(
            f"the line is not valid UTF-8 ({e.reason}: byte 0x{raw[e.start]:02x} at column "
            f"{e.start + 1})", "re-encode the file as UTF-8")
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        yield number, None, _RowError(f"the line is not valid JSON ({e.msg} at column {e.colno})",
                                      "write one JSON object per line (JSON lines)")
        continue
      if not isinstance(row, dict):
        yield number, None, _RowError(f"the line is a JSON {type(row).__name__}, not an object",
                                      "write one JSON object per line (JSON lines)")
        continue
      yield number, row, None


def _read(paths: Iterable[str], parse, skip_invalid: bool, stats: collections.Counter,
          make) -> Iterator[Any]:
  for path in paths:
    if hasattr(path, "rows"):  # a split of a `datasets` source (format 'hf', hf_datasets.py)
      rows = ((n, row, None) for n, row in enumerate(path.rows(), start=1))
      path, file_split, unit = path.name, path.split, "row"
    else:
      if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist; check config.data.source.")
      rows = _iter_rows(path)
      file_split = split_from_filename(path)
      unit = "row" if path.endswith((".parquet", ".arrow")) else "line"
    for number, row, error in rows:
      stats["read"] += 1
      if error is None:
        try:
          fields = parse(row)
        except _RowError as e:
          error = e
        except _SkipRow:
          stats["skipped_other_domain"] += 1
          continue
      if error is not None:
        message = f"{path}, {unit} {number}: {error.problem}. Fix: {error.fix}, {_SKIP_FIX}."
        if not skip_invalid:
          raise DataError(message)
        stats["invalid_skipped"] += 1
        if stats["invalid_skipped"] <= _MAX_LOGGED_INVALID:
          logging.warning("Skipping invalid row: %s", message)
        continue
      stats["empty_responses"] += sum(
          not fields[k].strip() for k in _RESPONSE_FIELDS if isinstance(fields.get(k), str))
      fields.setdefault("id", "")
      if not fields["id"]:
        row_id = row.get("id")
        fields["id"] = (str(row_id) if isinstance(row_id, (str, int)) and row_id != ""
                        else f"{os.path.basename(path)}:{number}")
      if fields.get("split") is None:
        fields["split"] = row.get("split") if isinstance(row.get("split"), str) else file_split
      yield make(source=path, line=number, **fields)
  if stats["invalid_skipped"] > _MAX_LOGGED_INVALID:
    logging.warning("Skipped %d invalid rows in total.", stats["invalid_skipped"])
  if stats["skipped_other_domain"]:
    logging.info("Skipped %d non-TL;DR rows (CNN/DailyMail articles: `info.post` is null).",
                 stats["skipped_other_domain"])


def read_pairs(paths: Iterable[str], fmt: str, columns: Optional[Mapping[str, str]] = None,
               skip_invalid: bool = False,
               stats: Optional[collections.Counter] = None) -> Iterator[PairExample]:
  """Yields the preference pairs of `paths`, validated.

  Args:
    paths: data files, read in order.
    fmt: 'tldr', 'hh', 'jsonl' or 'parquet' ('jsonl' and 'parquet' are the same generic
      column reader; the file extension picks the file type).
    columns: generic column names (keys of `DEFAULT_COLUMNS`); missing keys take the defaults.
    skip_invalid: skip and count malformed rows instead of raising `DataError`.
    stats: a Counter updated with 'read', 'invalid_skipped', 'skipped_other_domain',
      'empty_responses' (kept: responses that are empty or only whitespace).

  Yields:
    `PairExample`s in file order.
  """
  cols = {**DEFAULT_COLUMNS, **(columns or {})}
  parsers = {"tldr": _tldr_comparison, "hh": _hh_pair,
             "jsonl": lambda row: _generic_pair(row, cols),
             "parquet": lambda row: _generic_pair(row, cols),
             "hf": lambda row: _generic_pair(row, cols)}
  if fmt not in parsers:
    raise DataError(f"format {fmt!r} has no preference pairs; use one of {PAIR_FORMATS} "
                    "(config.data.format).")
  yield from _read(paths, parsers[fmt], skip_invalid,
                   collections.Counter() if stats is None else stats, PairExample)


def read_sft(paths: Iterable[str], fmt: str, columns: Optional[Mapping[str, str]] = None,
             skip_invalid: bool = False,
             stats: Optional[collections.Counter] = None) -> Iterator[SFTExample]:
  """Yields the (prompt, response) demonstrations of `paths`, validated.

  For 'tldr' (comparisons) and 'hh' the demonstrations are the chosen responses. Duplicates
  (one summary chosen in several comparisons) are left to the caller.

  Args:
    paths: data files, read in order.
    fmt: one of `SFT_FORMATS`.
    columns: generic column names; a generic file without the response column serves its
      chosen column instead.
    skip_invalid: skip and count malformed rows instead of raising `DataError`.
    stats: a Counter updated with 'read', 'invalid_skipped', 'skipped_other_domain',
      'empty_responses' (kept: responses that are empty or only whitespace).

  Yields:
    `SFTExample`s in file order.
  """
  cols = {**DEFAULT_COLUMNS, **(columns or {})}

  def from_pair(parse):
    def parse_sft(row):
      fields = parse(row)
      return dict(prompt=fields["prompt"], response=fields.pop("chosen"),
                  id=fields.get("id", ""), split=fields.get("split"))
    return parse_sft

  parsers = {"tldr": from_pair(_tldr_comparison), "tldr_sft": _tldr_sft, "hh": _hh_sft,
             "jsonl": lambda row: _generic_sft(row, cols),
             "parquet": lambda row: _generic_sft(row, cols),
             "hf": lambda row: _generic_sft(row, cols)}
  if fmt not in parsers:
    raise DataError(f"format {fmt!r} has no SFT data; use one of {SFT_FORMATS} "
                    "(config.data.format).")
  yield from _read(paths, parsers[fmt], skip_invalid,
                   collections.Counter() if stats is None else stats, SFTExample)
