"""The synthetic gold-reward task: determinism, the gold reward, the labeler, its files."""

import json
import os

import numpy as np
import pytest

from daa_jax.data import synthetic
from daa_jax.errors import ConfigError
from daa_jax.data import pipeline as data_pipeline
from daa_jax.data import synthetic as synthetic_lib
from daa_jax.data import tokenize as tokenize_lib


def small_config(**overrides):
  cfg = synthetic.default_config()
  cfg.num_sft, cfg.num_pairs, cfg.num_eval = 300, 200, 100
  cfg.update(overrides)
  return cfg


def test_prompts_and_demos_follow_the_design():
  task = synthetic.SyntheticTask()
  prompts = task.sample_prompts(200, seed=0)
  for prompt in prompts:
    assert len(prompt) == 21 and prompt[-1] == "="
    keys = task.prompt_keys(prompt)
    assert 3 <= len(keys) <= 5 and len(set(keys)) == len(keys)
    assert set(prompt[:-1]) <= set(task.keys + task.fillers)
  assert len(task.keys) == 20 and len(task.fillers) == 41
  assert not set(task.keys) & set(task.fillers)
  rng = np.random.default_rng(0)
  for prompt in prompts:
    reference = task.reference_summary(prompt, rng)
    keys = task.prompt_keys(prompt)
    assert reference and [k for k in keys if k in reference] == list(reference)  # In order.
    demo = task.sft_demo(prompt, rng)
    assert demo and len(demo) <= 16 and set(demo) <= set(prompt[:-1])


def test_deterministic_per_seed(tmp_path):
  task = synthetic.SyntheticTask(small_config())
  assert task.sample_prompts(50, 7) == task.sample_prompts(50, 7)
  assert task.sample_prompts(50, 7) != task.sample_prompts(50, 8)
  prompts = task.sample_prompts(50, 7)
  assert task.sft_demos(prompts, 1) == task.sft_demos(prompts, 1)
  first, second = task.demo_pairs(64, 3), task.demo_pairs(64, 3)
  assert first["chosen"] == second["chosen"] and first["rejected"] == second["rejected"]
  a, b = task.write_files(str(tmp_path / "a")), task.write_files(str(tmp_path / "b"))
  for name in a:
    assert open(a[name]).read() == open(b[name]).read()
  other = synthetic.SyntheticTask(small_config(seed=1)).write_files(str(tmp_path / "c"))
  assert open(other["pairs"]).read() != open(a["pairs"]).read()


def test_gold_reward_closed_form():
  task = synthetic.SyntheticTask()
  prompt = "abAcdBefCgh0123456789="  # Keys A, B, C.
  assert task.gold_reward(prompt, "ABC") == 3.0
  assert task.gold_reward(prompt, "CBA") == 3.0  # Order does not matter.
  assert task.gold_reward(prompt, "AB") == 2.0
  assert task.gold_reward(prompt, "ABCa") == 2.5  # A filler: -0.5.
  assert task.gold_reward(prompt, "ABCD") == 2.5  # A key of another prompt: -0.5.
  assert task.gold_reward(prompt, "AABC") == 2.5  # A repeated key: -0.5.
  assert task.gold_reward(prompt, "ABC", has_eos=False) == 2.0
  assert synthetic_lib.gold_reward_fn(data_pipeline.default_config())(prompt, "ABC") == 3.0


def test_vectorized_gold_reward_matches_the_scalar_one():
  task = synthetic.SyntheticTask()
  tok = tokenize_lib.get_tokenizer("bytes")
  prompts = task.sample_prompts(64, 0)
  rng = np.random.default_rng(1)
  alphabet = list(task.keys + task.fillers)
  responses = ["".join(rng.choice(alphabet, rng.integers(0, 9))) for _ in prompts]
  responses[:32] = task.sft_demos(prompts[:32], 2)
  has_eos = rng.random(64) < 0.7
  prompt_tokens = np.full((64, 24), tok.pad_id)
  response_tokens = np.full((64, 18), tok.pad_id)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    prompt_tokens[i, :len(p)] = tok.encode(p)
    ids = tok.encode(r) + ([tok.eos_id] if has_eos[i] else [])
    response_tokens[i, :len(ids)] = ids
  lengths, found_eos = synthetic.split_at_eos(response_tokens, tok.eos_id)
  np.testing.assert_array_equal(found_eos, has_eos)
  np.testing.assert_array_equal(lengths[has_eos], [len(r) for r, e in zip(responses, has_eos)
                                                   if e])
  lengths[~has_eos] = [len(r) for r, e in zip(responses, has_eos) if not e]  # Not the pads.
  fast = task.gold_reward_tokens(prompt_tokens, [len(p) for p in prompts], response_tokens,
                                 lengths, found_eos)
  slow = [task.gold_reward(p, r, e) for p, r, e in zip(prompts, responses, has_eos)]
  np.testing.assert_allclose(fast, slow)


def test_references_beat_random_responses():
  task = synthetic.SyntheticTask()
  prompts = task.sample_prompts(1000, 0)
  references = task.references(prompts, 1)
  rng = np.random.default_rng(2)
  alphabet = list(task.keys + task.fillers)
  random = ["".join(rng.choice(alphabet, rng.integers(1, 17))) for _ in prompts]
  gold_ref = np.array([task.gold_reward(p, r) for p, r in zip(prompts, references)])
  gold_random = np.array([task.gold_reward(p, r) for p, r in zip(prompts, random)])
  gold_demo = np.array([task.gold_reward(p, r)
                        for p, r in zip(prompts, task.sft_demos(prompts, 3))])
  assert gold_ref.mean() > gold_demo.mean() > 0 > gold_random.mean()
  assert (gold_ref > gold_random).mean() > 0.95


def test_demo_pair_labels_are_noisy_but_informative():
  pairs = synthetic.SyntheticTask().demo_pairs(2000, 0)
  assert len(pairs["prompt"]) == 2000
  assert all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))
  contradict = np.mean(pairs["gold_chosen"] < pairs["gold_rejected"])
  agree = np.mean(pairs["gold_chosen"] > pairs["gold_rejected"])
  assert 0.15 < contradict < 0.3 and agree > 2 * contradict  # a prototype measured ~23%.


def _with(**overrides):
  cfg = synthetic.default_config()
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize("length_bias", [0.0, 0.5])
def test_label_length_bias_at_the_configured_strength(length_bias):
  task = synthetic.SyntheticTask(_with(length_bias=length_bias))
  prompt = "abAcdBefCgDh01234567="  # Keys A, B, C, D.
  # Equal gold, lengths 2 and 5: "AB" covers 2 keys; "ABCab" covers 3 and has 2 fillers.
  assert task.gold_reward(prompt, "AB") == task.gold_reward(prompt, "ABCab") == 2.0
  n = 20000
  labeled = task.label_pairs([prompt] * n, ["AB"] * n, ["ABCab"] * n, seed=0)
  longer_chosen = np.mean([c == "ABCab" for c in labeled["chosen"]])
  expected = 1.0 / (1.0 + np.exp(-length_bias * 3))  # σ(λ·Δlen), Δlen = 3.
  assert abs(longer_chosen - expected) < 0.015  # > 4 standard errors at n = 20000.


def test_label_temperature_and_identical_pairs():
  task = synthetic.SyntheticTask(_with(label_temperature=0.01))
  prompt = "abAcdBefCgh0123456789="
  labeled = task.label_pairs([prompt] * 3, ["AB", "A", "ABC"], ["A", "AB", "ABC"], seed=0)
  assert labeled["chosen"] == ["AB", "AB"]  # Near-deterministic; the identical pair dropped.


def test_bad_knobs_are_config_errors():
  with pytest.raises(ConfigError, match="num_keys"):
    synthetic.SyntheticTask(_with(num_keys=30))
  with pytest.raises(ConfigError, match="separator"):
    synthetic.SyntheticTask(_with(separator="A"))


def test_load_pairs_and_sft_generate_and_read_the_files(tmp_path):
  cfg = data_pipeline.default_config()
  cfg.synthetic.update(dict(num_sft=300, num_pairs=200, num_eval=100))
  pairs = data_pipeline.load_pairs(cfg, "train", workdir=str(tmp_path))
  assert len(pairs) == 200 and pairs.files[0].startswith(str(tmp_path / "data_cache"))
  files = json.loads(open(pairs.files[0]).readline())
  assert set(files) == {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"}
  batch = next(data_pipeline.Loader(pairs, batch_size=16, seed=0))
  assert batch["tokens"].shape == (16, 2, 38)
  # One token per symbol: 20 symbols + '=' of prompt, then response symbols + EOS.
  assert (batch["prompt_lengths"] == 21).all()
  np.testing.assert_array_equal(
      batch["lengths"][:, 0], [len(pairs.chosen_texts[i]) + 1 for i in batch["index"]])
  sft, eval_sft = data_pipeline.load_sft(cfg, "train", str(tmp_path)), data_pipeline.load_sft(cfg, "eval",
                                                                            str(tmp_path))
  eval_pairs = data_pipeline.load_pairs(cfg, "eval", str(tmp_path))
  assert len(sft) == 300 and len(eval_sft) == 100 and 90 < len(eval_pairs) <= 100
  assert not set(eval_sft.prompt_texts) & set(sft.prompt_texts + pairs.prompt_texts)
  reference_of = dict(zip(eval_sft.prompt_texts, eval_sft.reference_texts))
  assert all(reference_of[p] == r for p, r in zip(eval_pairs.prompt_texts,
                                                  eval_pairs.reference_texts))
  again = data_pipeline.load_pairs(cfg, "train", workdir=str(tmp_path))
  assert again.from_cache and len(os.listdir(tmp_path / "data_cache")) == 5  # 1 dir + 4 npz.


def test_a_non_byte_id_costs_one_off_key_penalty_by_ids_and_through_decode():
  # The sweep labels its policy pairs from decoded texts: a non-byte id must not vanish there.
  task = synthetic.SyntheticTask()
  tok = tokenize_lib.get_tokenizer("bytes")
  prompt = "abAcdBefCgh0123456789="  # Keys A, B, C.
  ids = [ord(c) for c in "ABC"]
  penalty = task.cfg.off_key_penalty
  assert task.gold_reward_ids(prompt, ids) == 3.0
  assert task.gold_reward_ids(prompt, ids + [260]) == 3.0 - penalty
  assert task.gold_reward(prompt, tok.decode(ids + [260, 261])) == 3.0 - 2 * penalty
  assert task.gold_reward_ids(prompt, ids, has_eos=False) == 3.0 - task.cfg.no_eos_penalty
