"""Readers: real file formats, exact prompt formats, and every malformed-row error."""

import collections
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daa_jax.data import readers
from daa_jax.errors import DataError

POST = ("My (24F) boyfriend (25M) forgets every plan we make.\n\nWe agreed on dinner Friday, "
        "he booked a concert instead. What do I do?")


def tldr_row(choice=1, split="train", texts=(" He forgot our dinner plans again.",
                                             "Boyfriend double-booked; how to talk about it?")):
  """A row as in OpenAI's summarize_from_feedback comparisons/batch*.json."""
  return {"info": {"id": "t3_1ov8e0", "post": POST, "title": "Boyfriend keeps forgetting plans",
                   "subreddit": "relationships"},
          "split": split,
          "summaries": [{"text": t, "policy": p, "note": None}
                        for t, p in zip(texts, ("sup4_ppo_rm3_kl10", "ref"))],
          "choice": choice, "worker": "w3", "batch": "batch5", "extra": {"confidence": 7}}


def cnndm_row():
  return {"info": {"id": "dm-1", "article": "LONDON (CNN) -- ...", "site": "dailymail",
                   "title": "A story", "post": None},
          "split": "valid2", "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}


HH_PROMPT = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: How about Whiskers?"
             "\n\nHuman: Something shorter?\n\nAssistant:")


def hh_row(chosen=" Tom is short and classic.", rejected=" I don't know any names."):
  return {"chosen": HH_PROMPT + chosen, "rejected": HH_PROMPT + rejected}


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row))
      f.write("\n")
  return str(path)


def test_tldr_comparisons_prompt_format_and_choice(tmp_path):
  path = write_jsonl(tmp_path / "batch5.json", [tldr_row(choice=1), tldr_row(choice=0),
                                                cnndm_row(), tldr_row(split="valid1")])
  stats = collections.Counter()
  examples = list(readers.read_pairs([path], "tldr", stats=stats))
  assert len(examples) == 3 and stats["read"] == 4 and stats["skipped_other_domain"] == 1
  expected_prompt = ("SUBREDDIT: r/relationships\nTITLE: Boyfriend keeps forgetting plans\n"
                     f"POST: {POST}\nTL;DR:")
  first = examples[0]
  assert first.prompt == expected_prompt
  # choice=1 prefers the second summary, which gets one leading space; the first had one.
  assert first.chosen == " Boyfriend double-booked; how to talk about it?"
  assert first.rejected == " He forgot our dinner plans again."
  assert examples[1].chosen == " He forgot our dinner plans again."
  assert (first.split, first.line, first.source, first.id) == ("train", 1, path, "t3_1ov8e0")
  assert (examples[2].split, examples[2].line) == ("valid1", 4)


def test_tldr_sft_both_formats(tmp_path):
  carper = {"prompt": "SUBREDDIT: r/AskReddit\nTITLE: t\nPOST: p\nTL;DR:", "label": "short"}
  original = {"id": "t3_x", "subreddit": "AskReddit", "title": "t", "post": "p",
              "summary": " short"}
  path = write_jsonl(tmp_path / "train.jsonl", [carper, original])
  first, second = readers.read_sft([path], "tldr_sft")
  assert first.prompt == second.prompt == "SUBREDDIT: r/AskReddit\nTITLE: t\nPOST: p\nTL;DR:"
  assert first.response == second.response == " short"
  assert first.split == "train"  # From the file name.
  assert second.id == "t3_x"


def test_hh_prompt_is_shared_prefix_through_last_assistant(tmp_path):
  path = str(tmp_path / "train.jsonl.gz")
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(json.dumps(hh_row()) + "\n")
  (pair,) = readers.read_pairs([path], "hh")
  assert pair.prompt == HH_PROMPT
  assert pair.chosen == " Tom is short and classic."
  assert pair.rejected == " I don't know any names."
  (demo,) = readers.read_sft([path], "hh")
  assert (demo.prompt, demo.response) == (HH_PROMPT, " Tom is short and classic.")


def test_hh_without_shared_prefix_is_an_error(tmp_path):
  row = {"chosen": HH_PROMPT + " Tom.", "rejected": "\n\nHuman: Other?\n\nAssistant: No."}
  path = write_jsonl(tmp_path / "hh.jsonl", [row])
  with pytest.raises(DataError, match=r"hh\.jsonl, line 1: chosen and rejected do not share"):
    list(readers.read_pairs([path], "hh"))


def test_generic_jsonl_and_parquet_with_custom_columns(tmp_path):
  rows = [{"q": "2+2=", "good": "4", "bad": "5", "ref": "4"},
          {"q": "3+3=", "good": "6", "bad": "7", "ref": None}]
  columns = {"prompt": "q", "chosen": "good", "rejected": "bad", "reference": "ref"}
  jsonl = write_jsonl(tmp_path / "pairs.jsonl", rows)
  parquet = str(tmp_path / "pairs.parquet")
  pq.write_table(pa.Table.from_pylist(rows), parquet)
  arrow = str(tmp_path / "data-00000-of-00001.arrow")  # HF save_to_disk: an IPC stream.
  table = pa.Table.from_pylist(rows)
  with pa.ipc.new_stream(arrow, table.schema) as writer:
    writer.write_table(table)
  for path in (jsonl, parquet, arrow):
    a, b = readers.read_pairs([path], "jsonl", columns=columns)
    assert (a.prompt, a.chosen, a.rejected, a.reference) == ("2+2=", "4", "5", "4")
    assert (b.line, b.reference) == (2, None)
  # A pairs file serves SFT through its chosen column.
  sft = list(readers.read_sft([parquet], "parquet", columns=columns))
  assert [(e.prompt, e.response) for e in sft] == [("2+2=", "4"), ("3+3=", "6")]


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_ROWS = [
    ('{"prompt": "p", "chosen": "a", ', "line 2: the line is not valid JSON"),
    ({"prompt": "p", "chosen": "a"}, "line 2: missing field 'rejected'"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "line 2: the prompt is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"},
     "line 2: chosen and rejected responses are identical"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"},
     "line 2: field 'chosen' should be str, got int"),
    ('["p", "a", "b"]', "line 2: the line is a JSON list, not an object"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_rows_name_file_line_and_fix(tmp_path, bad, message):
  path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad, GOOD])
  with pytest.raises(DataError) as info:
    list(readers.read_pairs([path], "jsonl"))
  text = str(info.value)
  assert text.startswith(f"{path}, {message}")
  assert "Fix:" in text and "config.data.skip_invalid=True" in text


def test_non_utf8_row(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
  with pytest.raises(DataError, match=r"data\.jsonl, line 2: the line is not valid UTF-8 "
                     r"\(invalid continuation byte: byte 0xe9"):
    list(readers.read_pairs([str(path)], "jsonl"))


def test_tldr_bad_rows(tmp_path):
  wrong_choice = tldr_row()
  wrong_choice["choice"] = "1"
  no_post = tldr_row()
  del no_post["info"]["post"]
  cases = [(wrong_choice, "line 2: field 'choice' should be int, got str"),
           (tldr_row(texts=(" Same.", "Same.")), "line 2: chosen and rejected responses are "
            "identical"),
           (no_post, "line 2: missing field 'info.post'")]
  for k, (bad, message) in enumerate(cases):
    path = write_jsonl(tmp_path / f"batch{k}.json", [tldr_row(), bad])
    with pytest.raises(DataError) as info:
      list(readers.read_pairs([path], "tldr"))
    assert str(info.value).startswith(f"{path}, {message}")


def test_skip_invalid_counts_every_bad_row(tmp_path):
  rows = [GOOD] + [bad for bad, _ in BAD_ROWS] + [GOOD]
  path = tmp_path / "data.jsonl"
  write_jsonl(path, rows)
  with open(path, "ab") as f:
    f.write(b'{"prompt": "\xff"}\n')
  stats = collections.Counter()
  examples = list(readers.read_pairs([str(path)], "jsonl", skip_invalid=True, stats=stats))
  assert len(examples) == 2
  assert stats["invalid_skipped"] == len(BAD_ROWS) + 1
  assert stats["read"] == len(BAD_ROWS) + 3
  assert [e.line for e in examples] == [1, len(BAD_ROWS) + 2]


def test_parquet_bad_rows_name_the_row(tmp_path):
  path = str(tmp_path / "pairs.parquet")
  pq.write_table(pa.Table.from_pylist([GOOD, {"prompt": "p", "chosen": "a", "rejected": None},
                                       {"prompt": b"\xff", "chosen": "a", "rejected": "b"}],
                                      schema=pa.schema([("prompt", pa.binary()),
                                                        ("chosen", pa.string()),
                                                        ("rejected", pa.string())])), path)
  with pytest.raises(DataError, match=r"pairs\.parquet, row 2: missing field 'rejected'"):
    list(readers.read_pairs([path], "parquet"))
  stats = collections.Counter()
  (good,) = readers.read_pairs([path], "parquet", skip_invalid=True, stats=stats)
  assert good.prompt == "p" and stats["invalid_skipped"] == 2


def test_missing_file_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    list(readers.read_pairs([os.path.join(tmp_path, "nope.jsonl")], "jsonl"))


def test_empty_responses_are_rows_and_are_counted(tmp_path):
  # A one-token sample of an SFT policy (" " or EOS alone) is a legitimate rejected response,
  # and the real HH test file has empty chosen responses: kept, counted, never an error.
  path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "p", "chosen": "a",
                                                       "rejected": " "},
                                                {"prompt": "q", "chosen": "", "rejected": "b"}])
  stats = collections.Counter()
  rows = list(readers.read_pairs([path], "jsonl", stats=stats))
  assert [r.rejected for r in rows] == ["b", " ", "b"] and stats["empty_responses"] == 2
  hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant:",
                                            "rejected": "\n\nHuman: hi\n\nAssistant: Hello."}])
  stats = collections.Counter()
  (row,) = readers.read_pairs([hh], "hh", stats=stats)
  assert (row.chosen, row.rejected, stats["empty_responses"]) == ("", " Hello.", 1)
  tldr = write_jsonl(tmp_path / "batch1.json", [tldr_row(texts=(" ok", ""))])
  (row,) = readers.read_pairs([tldr], "tldr")
  assert row.chosen == " "  # choice=1: the empty summary, after the joining space


def test_hh_identical_final_turns_are_a_row_error_or_counted_and_skipped(tmp_path):
  # Final turns identical after the shared prefix, and whole dialogues identical: each is a
  # DataError naming the file and line, or (skip_invalid) counted and skipped.
  same_turn = hh_row(chosen=" Tom.", rejected=" Tom.")
  same_dialogue = {"chosen": HH_PROMPT + " Felix.", "rejected": HH_PROMPT + " Felix."}
  for k, bad in enumerate((same_turn, same_dialogue)):
    path = write_jsonl(tmp_path / f"hh{k}.jsonl", [hh_row(), bad])
    with pytest.raises(DataError) as info:
      list(readers.read_pairs([path], "hh"))
    assert str(info.value).startswith(
        f"{path}, line 2: chosen and rejected responses are identical")
    stats = collections.Counter()
    rows = list(readers.read_pairs([path], "hh", skip_invalid=True, stats=stats))
    assert len(rows) == 1 and stats["invalid_skipped"] == 1
