"""load_pairs/load_sft, the token cache, splits, and the deterministic resumable Loader."""

import json

import numpy as np
import pytest

from daa_jax.errors import ConfigError, DataError
from daa_jax.data import pipeline as data_pipeline


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


def generic_pairs(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"prompt": f"question {i}: " + "x" * int(rng.integers(1, 6)),
           "chosen": "good" * int(rng.integers(1, 3)), "rejected": "bad" * int(rng.integers(1, 4))}
          for i in range(n)]


def tldr_row(split="train", choice=1):
  """A summarize_from_feedback comparison row (test_data_readers has the full one)."""
  return {"info": {"id": "t3_a", "post": "He forgot dinner.", "title": "Plans",
                   "subreddit": "relationships"}, "split": split, "choice": choice,
          "summaries": [{"text": " He forgot our dinner plans again."},
                        {"text": "Boyfriend double-booked."}]}


HH_PROMPT = "\n\nHuman: Name a cat?\n\nAssistant: Whiskers?\n\nHuman: Shorter?\n\nAssistant:"


def hh_row(chosen=" Tom is short and classic.", rejected=" I don't know any names."):
  return {"chosen": HH_PROMPT + chosen, "rejected": HH_PROMPT + rejected}


def config(tmp_path, source, fmt="jsonl", **overrides):
  cfg = data_pipeline.default_config()
  cfg.source = source
  cfg.format = fmt
  cfg.max_length = 32
  cfg.max_prompt_length = 16
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.update(overrides)
  return cfg


@pytest.fixture
def pairs(tmp_path):
  # 24 prompts; the hash holds out none at 1%, so the lowest-hash one is held out (the
  # hold-out is never empty): 23 train pairs.
  path = write_jsonl(tmp_path / "pairs.jsonl", generic_pairs(24))
  return data_pipeline.load_pairs(config(tmp_path, path, eval_fraction=0.01), "train")


def all_batches(loader, n):
  return [next(loader) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_same_batches_and_fresh_permutation_per_epoch(pairs):
  loader = data_pipeline.Loader(pairs, batch_size=4, seed=3)
  assert loader.steps_per_epoch == len(pairs) // 4
  first = all_batches(loader, 3 * loader.steps_per_epoch)
  assert_same(first, all_batches(data_pipeline.Loader(pairs, batch_size=4, seed=3), len(first)))
  other = next(data_pipeline.Loader(pairs, batch_size=4, seed=4))
  assert not np.array_equal(other["index"], first[0]["index"])
  steps = loader.steps_per_epoch
  epochs = [np.concatenate([b["index"] for b in first[e * steps:(e + 1) * steps]])
            for e in range(3)]
  for indices in epochs:  # Each epoch: distinct examples, the remainder dropped.
    assert len(set(indices.tolist())) == steps * 4
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("stop", [1, 5, 6, 7])  # 5 steps per epoch: stop across the boundary.
def test_restore_yields_exactly_the_remaining_sequence(pairs, stop):
  reference = all_batches(data_pipeline.Loader(pairs, batch_size=4, seed=1), 12)
  loader = data_pipeline.Loader(pairs, batch_size=4, seed=1)
  all_batches(loader, stop)
  state = json.loads(json.dumps(loader.state()))  # As a checkpoint would store it.
  assert state == {"epoch": stop // 5, "position": stop % 5}
  resumed = data_pipeline.Loader(pairs, batch_size=4, seed=1, state=state)
  assert_same(all_batches(resumed, 12 - stop), reference[stop:])
  other = data_pipeline.Loader(pairs, batch_size=4, seed=1)
  other.restore(state)
  assert_same([next(other)], reference[stop:stop + 1])


def test_restore_rejects_a_bad_state(pairs):
  loader = data_pipeline.Loader(pairs, batch_size=4, seed=1)
  with pytest.raises(DataError, match="out of range"):
    loader.restore({"epoch": 0, "position": 99})
  with pytest.raises(DataError, match="epoch"):
    loader.restore({"step": 3})


def test_process_slices_are_disjoint_and_cover_the_global_batch(pairs):
  global_batches = all_batches(data_pipeline.Loader(pairs, batch_size=8, seed=2), 4)
  per_process = [all_batches(data_pipeline.Loader(pairs, batch_size=8, seed=2, process_index=k,
                                         process_count=4), 4) for k in range(4)]
  for step, global_batch in enumerate(global_batches):
    slices = [per_process[k][step] for k in range(4)]
    for key in global_batch:
      np.testing.assert_array_equal(np.concatenate([s[key] for s in slices]), global_batch[key])
    assert all(s["tokens"].shape == (2, 2, 32) for s in slices)
  with pytest.raises(ConfigError, match="multiple of the process count"):
    data_pipeline.Loader(pairs, batch_size=6, seed=0, process_count=4)
  too_big = data_pipeline.Loader(pairs, batch_size=24, seed=0)
  assert too_big.steps_per_epoch == 0
  with pytest.raises(ConfigError, match="exceeds the 23 examples"):
    next(too_big)


def test_eval_iterator_covers_every_example_once(pairs):
  for process_count in (1, 2):
    seen = []
    for k in range(process_count):
      loader = data_pipeline.Loader(pairs, batch_size=6, seed=0, shuffle=False, drop_remainder=False,
                           process_index=k, process_count=process_count)
      assert loader.steps_per_epoch == 4  # ceil(23 / 6)
      batches = list(loader)
      assert len(batches) == 4
      for batch in batches:
        seen += batch["index"][batch["valid"] == 1].tolist()
      assert batches[-1]["valid"].sum() == (5 if process_count == 1 else 3 - k)
    assert sorted(seen) == list(range(len(pairs)))


def test_with_column_slices_by_example_index(pairs):
  ref_logps = np.arange(len(pairs) * 2, dtype=np.float32).reshape(-1, 2)
  with_refs = pairs.with_column("ref_logps", ref_logps)
  batch = next(data_pipeline.Loader(with_refs, batch_size=4, seed=0))
  np.testing.assert_array_equal(batch["ref_logps"], ref_logps[batch["index"]])
  assert "ref_logps" not in next(data_pipeline.Loader(pairs, batch_size=4, seed=0))
  with pytest.raises(DataError, match="rows"):
    pairs.with_column("ref_logps", ref_logps[:-1])


def test_cache_hit_and_invalidation(tmp_path):
  path = tmp_path / "pairs.jsonl"
  write_jsonl(path, generic_pairs(10))
  cfg = config(tmp_path, str(path), eval_fraction=0.01)
  first = data_pipeline.load_pairs(cfg, "train")
  second = data_pipeline.load_pairs(cfg, "train")
  assert not first.from_cache and second.from_cache
  assert second.fingerprint == first.fingerprint and second.stats == first.stats
  assert_same([second.batch(range(len(second)))], [first.batch(range(len(first)))])
  assert second.prompt_texts == first.prompt_texts and second.origin(3) == (str(path), 4)
  cfg.max_length = 30  # A length setting changes the key.
  assert not data_pipeline.load_pairs(cfg, "train").from_cache
  cfg.max_length = 32
  write_jsonl(path, generic_pairs(10, seed=1))  # So does the file's content.
  changed = data_pipeline.load_pairs(cfg, "train")
  assert not changed.from_cache and changed.fingerprint != first.fingerprint


def test_tldr_split_field_selects_train_and_eval(tmp_path):
  rows = [tldr_row(split="train"), tldr_row(split="valid1", choice=0), tldr_row(split="valid2")]
  path = write_jsonl(tmp_path / "batch1.json", rows)
  cfg = config(tmp_path, path, fmt="tldr", max_length=256, max_prompt_length=200)
  train, valid = data_pipeline.load_pairs(cfg, "train"), data_pipeline.load_pairs(cfg, "eval")
  assert (len(train), len(valid), len(data_pipeline.load_pairs(cfg, "valid2"))) == (1, 1, 1)
  assert train.stats["other_split"] == 2
  assert valid.chosen_texts == [" He forgot our dinner plans again."]
  assert valid.reference_texts == valid.chosen_texts
  sft = data_pipeline.load_sft(config(tmp_path, ",".join([path, path]), fmt="tldr", max_length=256,
                             max_prompt_length=200), "train")
  assert len(sft) == 1 and sft.stats["duplicates_removed"] == 1


def test_eval_fraction_holds_out_whole_prompts(tmp_path):
  rows = generic_pairs(200)
  rows += [dict(r, chosen=r["chosen"] + "!") for r in rows]  # Every prompt twice.
  path = write_jsonl(tmp_path / "pairs.jsonl", rows)
  cfg = config(tmp_path, path, eval_fraction=0.25)
  train, held_out = data_pipeline.load_pairs(cfg, "train"), data_pipeline.load_pairs(cfg, "eval")
  assert len(train) + len(held_out) == 400 and 40 < len(held_out) < 160
  assert not set(train.prompt_texts) & set(held_out.prompt_texts)
  cfg.eval_source = write_jsonl(tmp_path / "eval.jsonl", generic_pairs(3, seed=5))
  assert len(data_pipeline.load_pairs(cfg, "train")) == 400 and len(data_pipeline.load_pairs(cfg, "eval")) == 3


def test_directory_source_and_skip_invalid_counts(tmp_path):
  directory = tmp_path / "hh"
  directory.mkdir()
  write_jsonl(directory / "train.jsonl", [hh_row(), hh_row(rejected=" Tom is short and classic."),
                                          hh_row(chosen=" Felix.")])
  write_jsonl(directory / "test.jsonl", [hh_row(chosen=" Kitty.")])
  (directory / "dataset_info.json").write_text("{}")  # HF metadata, not data.
  cfg = config(tmp_path, str(directory), fmt="hh", max_length=128, max_prompt_length=100)
  with pytest.raises(DataError, match=r"train\.jsonl, line 2: chosen and rejected responses "
                     "are identical"):
    data_pipeline.load_pairs(cfg, "train")
  cfg.skip_invalid = True
  train = data_pipeline.load_pairs(cfg, "train")
  assert len(train) == 2 and train.stats["invalid_skipped"] == 1
  assert train.stats["read"] == 4 and train.stats["other_split"] == 1
  assert data_pipeline.load_pairs(cfg, "eval").chosen_texts == [" Kitty."]


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="config.data.format"):
    data_pipeline.load_pairs(config(tmp_path, "x.jsonl", fmt="csv"))
  with pytest.raises(ConfigError, match="max_prompt_length"):
    data_pipeline.load_pairs(config(tmp_path, "x.jsonl", max_prompt_length=40))
  with pytest.raises(DataError, match="config.data.source: .*missing.jsonl does not exist"):
    data_pipeline.load_pairs(config(tmp_path, str(tmp_path / "missing.jsonl")))
  with pytest.raises(ConfigError, match="no preference pairs"):
    data_pipeline.load_pairs(config(tmp_path, "x.jsonl", fmt="tldr_sft"))


def test_pythia_like_pad_equals_eos_through_load_pairs(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.BPE())  # A byte-level tokenizer with only '<|endoftext|>' (id 0).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.add_special_tokens(["<|endoftext|>"])
  tok.add_tokens(sorted(set(pre_tokenizers.ByteLevel.alphabet())))
  tok.save(str(tmp_path / "tokenizer.json"))
  path = write_jsonl(tmp_path / "pairs.jsonl", generic_pairs(8))
  cfg = config(tmp_path, path, tokenizer=str(tmp_path / "tokenizer.json"), eval_fraction=0.01)
  pairs = data_pipeline.load_pairs(cfg, "train")
  assert pairs.tokenizer.pad_id == pairs.tokenizer.eos_id == 0
  batch = pairs.batch(range(len(pairs)))
  np.testing.assert_array_equal(batch["loss_mask"].sum(-1), batch["lengths"])
  ends = batch["prompt_lengths"][:, None] + batch["lengths"] - 1
  np.testing.assert_array_equal(np.take_along_axis(batch["tokens"], ends[..., None], -1), 0)
  assert (batch["tokens"][batch["attention_mask"] == 0] == 0).all()


def test_a_file_named_test_is_data_to_train_on(tmp_path):
  # HH's harmless-base/test.jsonl.gz alone: its file name names no train file, so its rows are
  # split like unlabelled rows (or are all training rows when eval has its own source).
  directory = tmp_path / "harmless-base"
  directory.mkdir()
  write_jsonl(directory / "test.jsonl", generic_pairs(40) + [dict(prompt="q", chosen="",
                                                                     rejected="bad")])
  cfg = config(tmp_path, str(directory), eval_fraction=0.5)
  train = data_pipeline.load_pairs(cfg, "train")
  assert len(train) + len(data_pipeline.load_pairs(cfg, "eval")) == 41
  cfg.eval_source = write_jsonl(tmp_path / "eval.jsonl", generic_pairs(3, seed=5))
  train = data_pipeline.load_pairs(cfg, "train")
  assert len(train) == 41 and train.stats["empty_responses"] == 1


def test_rows_of_another_domain_and_missing_splits_say_so(tmp_path):
  cnndm = {"info": {"id": "dm-1", "article": "LONDON (CNN) -- ...", "site": "dailymail"},
           "split": "train", "choice": 0, "summaries": [{"text": "a"}, {"text": "b"}]}
  path = write_jsonl(tmp_path / "batch9.json", [cnndm, cnndm])
  with pytest.raises(DataError, match=r"config.data.source: all 2 rows of .*batch9.json were "
                     r"skipped as another domain \(2 CNN/DailyMail rows"):
    data_pipeline.load_pairs(config(tmp_path, path, fmt="tldr"), "train")
  valid_only = write_jsonl(tmp_path / "batch2.json", [tldr_row(split="valid1")])
  with pytest.raises(DataError, match=r"no examples of split 'train' .*\['valid1'\].*label "
                     "training rows split 'train'"):
    data_pipeline.load_pairs(config(tmp_path, valid_only, fmt="tldr", max_length=256,
                           max_prompt_length=200), "train")
