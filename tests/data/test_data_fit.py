"""Defaults that fit the user's data, and loud one-time warnings where data and config disagree."""

import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from daa_jax.train import config as config_lib
from daa_jax import errors
from daa_jax.train import optim
from daa_jax.data import lengths
from daa_jax.errors import DataError
from daa_jax.data import pipeline as data_pipeline
from daa_jax.train import init as init_lib
from daa_jax.train import fit as fit_lib
from daa_jax.evaluate import setup as setup_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                       "daa.py")


@pytest.fixture(autouse=True)
def fresh_warnings():
  errors._WARNED.clear()  # pylint: disable=protected-access
  yield


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def write_pairs(path, n, prompt_len=40, response_len=10, start=0):
  """n pairs with distinct prompts of exactly `prompt_len` bytes, responses `response_len`."""
  with open(path, "w") as f:
    for i in range(start, start + n):
      prompt = f"q{i:05d} ".ljust(prompt_len, "x")
      f.write(json.dumps(dict(prompt=prompt, chosen="a" * response_len,
                              rejected="b" * (response_len - 1))) + "\n")
  return str(path)


def config(tmp_path, source, **overrides):
  cfg = data_pipeline.default_config()
  cfg.update(dict(source=source, format="jsonl", cache_dir=str(tmp_path / "cache")))
  cfg.update(overrides)
  return cfg


def test_auto_lengths_fit_the_data_and_nothing_is_cut(tmp_path, caplog):
  path = write_pairs(tmp_path / "p.jsonl", 60, prompt_len=40, response_len=10)
  cfg = config(tmp_path, path)
  assert cfg.max_length == 0 and cfg.max_prompt_length == 0  # the defaults are 'auto'
  data_pipeline.resolve_lengths(cfg, "pairs")
  # 40 + 10 + EOS = 51 -> 56 (multiple of 8); the prompt keeps L - ceil8(11) = 40.
  assert (cfg.max_length, cfg.max_prompt_length) == (56, 40)
  pairs = data_pipeline.load_pairs(config(tmp_path, path), "train")  # 'auto' inside the loader too
  assert pairs.max_length == 56 and pairs.stats["truncated"] == 0
  assert not warnings_of(caplog)


def test_synthetic_auto_lengths_are_the_tasks_exact_ones():
  cfg = data_pipeline.default_config()
  data_pipeline.resolve_lengths(cfg)
  assert (cfg.max_length, cfg.max_prompt_length) == (38, 21)
  cfg = data_pipeline.default_config()
  cfg.synthetic.prompt_length = 30
  data_pipeline.resolve_lengths(cfg)
  assert (cfg.max_length, cfg.max_prompt_length) == (48, 31)


def test_fit_ignores_a_rare_outlier_and_respects_the_position_limit():
  prompts, responses = [20] * 199 + [2000], [9] * 200
  assert lengths.fit(prompts, responses, 2048) == (32, 16)  # 99th percentile: 29 -> 32
  assert lengths.fit([300] * 10, [300] * 10, 512)[0] == 512


def test_auto_lengths_without_data_take_the_model_position_limit():
  assert lengths.fit([], [], 2048) == (2048, 1024)  # not a fixed 512
  assert lengths.fit([], [], 4096) == (4096, 2048)
  assert lengths.fit([], [], 128) == (128, 64)


def test_auto_lengths_fit_long_data_up_to_the_model_positions_not_512(tmp_path):
  path = write_pairs(tmp_path / "p.jsonl", 40, prompt_len=900, response_len=100)
  cfg = data_pipeline.resolve_lengths(config(tmp_path, path), "pairs", max_positions=2048)
  # 900 + 100 + EOS = 1001 -> 1008: past the old fixed 512, within the model's 2048.
  assert cfg.max_length == 1008 and cfg.fitted_length_limit == 2048


def test_auto_length_capped_by_the_model_warns_without_suggesting_auto(tmp_path, caplog):
  path = write_pairs(tmp_path / "p.jsonl", 50, prompt_len=40, response_len=10)
  cfg = data_pipeline.resolve_lengths(config(tmp_path, path), "pairs", max_positions=32)
  assert (cfg.max_length, cfg.fitted_length_limit) == (32, 32)  # 56 would fit; the model has 32
  data_pipeline.load_pairs(cfg, "train")
  (found,) = [w for w in warnings_of(caplog) if "max_length" in w]
  assert "config.data.max_length=0 (auto) set max_length=32" in found
  assert "max_position_embeddings=32" in found and "99% of them fit in 56 tokens" in found
  assert "or 0 for both" not in found and "--config.data.max_length=" not in found
  assert "--config.data.overlong=drop" in found


def test_truncating_most_examples_warns_once_with_the_fix(tmp_path, caplog):
  path = write_pairs(tmp_path / "p.jsonl", 50, prompt_len=40, response_len=10)
  for _ in range(2):  # loading again (from the cache) does not repeat the warning
    ds = data_pipeline.load_pairs(config(tmp_path, path, max_length=38, max_prompt_length=21), "train")
  found = [w for w in warnings_of(caplog) if "config.data.max_length=38" in w]
  assert len(found) == 1, warnings_of(caplog)
  assert f"cuts {len(ds)} of {len(ds)} pairs (train) (100%" in found[0]
  assert "--config.data.max_length=56" in found[0]  # the length at which 99% fit
  assert "or 0 for both to fit them to the data" in found[0]  # set by hand: auto is the fix


def test_an_empty_hash_holdout_falls_back_to_the_lowest_hash_prompts(tmp_path, caplog):
  path = write_pairs(tmp_path / "p.jsonl", 20)
  cfg = config(tmp_path, path, eval_fraction=1e-5)  # the hash holds out none of 20
  train_ds, eval_ds = data_pipeline.load_pairs(cfg, "train"), data_pipeline.load_pairs(cfg, "eval")
  assert len(eval_ds) == 1 and len(train_ds) == 19
  assert not set(eval_ds.prompt_texts) & set(train_ds.prompt_texts)
  (message,) = [w for w in warnings_of(caplog) if "eval_fraction" in w]
  assert "held out none" in message and "--config.data.eval_fraction" in message


def test_warmup_longer_than_the_run_warns(caplog):
  cfg = config_lib.optim_fields("paper")  # 150 warmup steps
  optim.make(cfg, 5)
  (message,) = warnings_of(caplog)
  assert "config.optim.warmup_steps=150" in message and "5 steps" in message
  assert "--config.optim.warmup_steps=" in message
  caplog.clear()
  optim.make(cfg, 1500)
  assert not warnings_of(caplog)


def test_auto_judge_is_offline_without_an_api_key(monkeypatch, caplog):
  ev = config_lib.load_sibling(CONFIGS, "eval")
  run_cfg = ml_collections.ConfigDict(dict(judge=ev.judge, data=data_pipeline.default_config()))
  run_cfg.data.source = "pairs.jsonl"
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  name, judge = setup_lib.make_judge(run_cfg, None, None, "/tmp")
  assert (name, judge) == ("none", None)
  assert any("$OPENAI_API_KEY" in w and "reward_model" in w for w in warnings_of(caplog))
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
  assert setup_lib.make_judge(run_cfg, None, None, "/tmp")[0] == "llm"


def test_auto_model_size_follows_init_from_or_warns_for_scratch(tmp_path, caplog):
  path = write_pairs(tmp_path / "p.jsonl", 30)
  cfg = config_lib.load_sibling(CONFIGS, "daa")
  assert cfg.model.size == "auto"
  cfg.data.update(dict(source=path, cache_dir=str(tmp_path / "cache")))
  resolved = init_lib.resolve_auto(cfg, str(tmp_path / "run"))
  assert resolved.model.size == "tiny" and cfg.model.size == "auto"  # a copy
  assert resolved.data.max_length == 56
  assert any("config.model.size=auto" in w and "--config.hf_model" in w
             for w in warnings_of(caplog))
  sft_dir = tmp_path / "sft"
  sft_dir.mkdir()
  (sft_dir / "config.json").write_text(json.dumps({"model": {"size": "70m"}}))
  (sft_dir / "checkpoints" / "5" / "params").mkdir(parents=True)  # a committed export's place
  cfg.init_from = str(sft_dir)
  assert init_lib.resolve_auto(cfg, str(tmp_path / "run")).model.size == "70m"


def _save_hf_dataset(tmp_path, rows_by_split):
  datasets = pytest.importorskip(
      "datasets", reason="format='hf' needs the `datasets` package (pip install -e '.[hf]'; "
      ".ci/run installs it)")
  path = str(tmp_path / "hf_pairs")
  datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows_by_split.items()}
                      ).save_to_disk(path)
  return path


def _rows(n, start=0):
  return [dict(question=f"question {i}?", good=f"yes {i}", bad=f"no {i}")
          for i in range(start, start + n)]


def test_hf_datasets_directory_with_splits_and_column_mapping(tmp_path):
  path = _save_hf_dataset(tmp_path, {"train": _rows(12), "test": _rows(4, start=100)})
  cfg = config(tmp_path, path, format="hf")
  cfg.columns.update(dict(prompt="question", chosen="good", rejected="bad"))
  train_ds, eval_ds = data_pipeline.load_pairs(cfg, "train"), data_pipeline.load_pairs(cfg, "eval")
  assert len(train_ds) == 12 and len(eval_ds) == 4  # eval_split 'auto' finds 'test'
  assert eval_ds.prompt_texts[0] == "question 100?" and train_ds.chosen_texts[0] == "yes 0"
  assert train_ds.origin(0) == (f"{path}[train]", 1)
  sft = data_pipeline.load_sft(cfg, "train")  # SFT reads the chosen column
  assert len(sft) == 12 and sft.response_texts[3] == "yes 3"
  batch = next(data_pipeline.Loader(train_ds, batch_size=4, seed=0))
  # Bytes: 'yes i' + EOS vs 'no i' + EOS.
  np.testing.assert_array_equal(batch["lengths"][:, 0] - batch["lengths"][:, 1], np.ones(4))


def test_hf_rows_are_validated_like_file_rows(tmp_path):
  rows = _rows(5)
  rows[2]["good"] = None  # (an empty response is a legitimate row; a missing one is not)
  path = _save_hf_dataset(tmp_path, {"train": rows})
  cfg = config(tmp_path, path, format="hf")
  cfg.columns.update(dict(prompt="question", chosen="good", rejected="bad"))
  with pytest.raises(DataError, match=r"hf_pairs\[train\], row 3: missing field 'good'"):
    data_pipeline.load_pairs(cfg, "train")
  not_saved = tmp_path / "plain_dir"
  not_saved.mkdir()
  with pytest.raises(DataError, match="save_to_disk"):
    data_pipeline.load_pairs(config(tmp_path, str(not_saved), format="hf"), "train")


def _daa_config():
  cfg = config_lib.load_sibling(CONFIGS, "daa")  # batch 128 (8 x 16), 150 warmup steps
  cfg.data.source = "pairs.jsonl"
  return cfg


def test_small_data_adapts_unset_batch_and_warmup_and_says_so(caplog):
  cfg = fit_lib.fit_to_data(_daa_config(), 190, data_parallel=1, explicit=frozenset())
  # 190 // 16 = 11 steps per epoch (>= 8, paper checkpoints 2, 5, 7, 9, 11 distinct).
  assert (cfg.train.batch_size, cfg.train.grad_accum) == (16, 8)
  assert cfg.optim.warmup_steps == 1  # 10% of 11 steps
  (message,) = warnings_of(caplog)
  assert "train.batch_size 128 -> 16" in message and "optim.warmup_steps 150 -> 1" in message
  # The text states the warmup that was set (1 of 11 steps), not a bound it was not cut to.
  assert "11 optimizer steps (11 per epoch, warmup 1 step(s) = 9% of them)" in message
  assert "25%" not in message
  # On 8 data-parallel devices the micro-batch must still split over them.
  cfg = fit_lib.fit_to_data(_daa_config(), 190, data_parallel=8, explicit=frozenset())
  assert (cfg.train.batch_size, cfg.train.grad_accum) == (16, 2)


def test_explicit_overrides_are_kept_and_a_nonsensical_one_warns(caplog):
  cfg = fit_lib.fit_to_data(_daa_config(), 190, 1, frozenset({"train.batch_size"}))
  assert cfg.train.batch_size == 128 and cfg.optim.warmup_steps == 0  # warmup still adapts
  assert any("config.train.batch_size=128 (as set) gives 1 optimizer step" in w
             for w in warnings_of(caplog))
  caplog.clear()
  errors._WARNED.clear()  # pylint: disable=protected-access
  big = _daa_config()
  big.train.update(batch_size=128, grad_accum=8)
  cfg = fit_lib.fit_to_data(big, 92000, 1, frozenset())
  assert (cfg.train.batch_size, cfg.optim.warmup_steps) == (128, 150)  # the paper's data
  assert not warnings_of(caplog)


def test_too_few_training_rows_is_a_data_error():
  with pytest.raises(DataError, match="leaves 15 training pairs.*at least 16"):
    fit_lib.fit_to_data(_daa_config(), 15, 1, frozenset())


def test_a_barely_moved_policy_is_flagged():
  assert fit_lib.moved_summary({"daa/margin": 1e-4, "daa/margin_std": 1e-4}, 0.1)[
      "policy_moved"] is False
  assert fit_lib.moved_summary({"daa/margin": 0.5, "daa/margin_std": 0.2}, 0.1)["policy_moved"]


def test_explicit_max_length_above_the_model_positions_is_a_config_error(tmp_path):
  path = write_pairs(tmp_path / "p.jsonl", 20)
  cfg = config(tmp_path, path, max_length=1024, max_prompt_length=256)
  with pytest.raises(errors.ConfigError, match="max_length=1024.*max_position_embeddings=512"):
    data_pipeline.resolve_lengths(cfg, "pairs", max_positions=512)
  cfg = config(tmp_path, path, max_length=512, max_prompt_length=256)
  assert data_pipeline.resolve_lengths(cfg, "pairs", max_positions=512).max_length == 512
