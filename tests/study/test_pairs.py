"""The sweep's policy pairs are labeled by their sampled ids, the evaluation's gold score."""

import json

import pytest

from daa_jax.data import readers
from daa_jax.data import synthetic as synthetic_lib
from daa_jax.data import tokenize as tokenize_lib
from daa_jax.study import pairs as pairs_lib


def _pair(task, tmp_path, extra):
  """One prompt; sample a = the prompt's keys + `extra` ids, sample b = the keys alone."""
  prompt = task.sample_prompts(1, [0])[0]
  keys = [ord(k) for k in task.prompt_keys(prompt)]
  ids = (keys + list(extra), keys)
  tok = tokenize_lib.ByteTokenizer()
  texts = tuple([tok.decode(x)] for x in ids)
  path = tmp_path / "pairs.jsonl"
  stats = pairs_lib.write_pairs(task, str(path), [prompt], texts, ([True], [True]),
                                tuple([x] for x in ids), seed=[0, 1], limit=10)
  (row,) = [json.loads(line) for line in open(path)]
  return prompt, ids, row, stats


def _gold(row, ids):
  """The gold score the row gives the response with these ids."""
  for side in ("chosen", "rejected"):
    if row[f"{side}_ids"] == ids:
      return row[f"gold_{side}"]
  raise AssertionError(f"{ids} not in {row}")


def test_a_sampled_id_260_is_one_off_key_penalty(tmp_path):
  task = synthetic_lib.SyntheticTask()
  prompt, (with_260, keys), row, stats = _pair(task, tmp_path, [260])
  assert stats["pairs"] == 1
  # The ids travel beside the text; the text shows the non-byte id as U+FFFD.
  assert sorted([row["chosen_ids"], row["rejected_ids"]]) == sorted([with_260, keys])
  assert "\ufffd" in row["chosen"] + row["rejected"]
  # Still a generic pairs file: the reader takes prompt, chosen, rejected and leaves the rest.
  (pair,) = list(readers.read_pairs([str(tmp_path / "pairs.jsonl")], "jsonl"))
  assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, row["chosen"], row["rejected"])
  assert _gold(row, with_260) == task.gold_reward_ids(prompt, with_260)
  assert _gold(row, with_260) == pytest.approx(
      _gold(row, keys) - task.cfg.off_key_penalty, abs=1e-6)


def test_ids_not_their_decoded_text_are_scored(tmp_path):
  # "é" is two byte ids that decode to one character: scored by text it would cost one
  # off-key penalty; the policy sampled two off-key symbols, and the judge counts two.
  task = synthetic_lib.SyntheticTask()
  prompt, (with_e, keys), row, _ = _pair(task, tmp_path, list("é".encode("utf-8")))
  text = tokenize_lib.ByteTokenizer().decode(with_e)
  assert task.gold_reward(prompt, text) == pytest.approx(
      task.gold_reward_ids(prompt, keys) - task.cfg.off_key_penalty, abs=1e-6)
  assert _gold(row, with_e) == pytest.approx(
      _gold(row, keys) - 2 * task.cfg.off_key_penalty, abs=1e-6)
