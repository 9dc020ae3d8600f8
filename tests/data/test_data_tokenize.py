"""Tokenizers, the truncation policy, and the batch masks (with pad == EOS too)."""

import json

import numpy as np
import pytest

from daa_jax.data import dataset as dataset_lib
from daa_jax.data import readers
from daa_jax.data import tokenize
from daa_jax.errors import ConfigError


def pair(prompt, chosen, rejected, line=1):
  return readers.PairExample(prompt=prompt, chosen=chosen, rejected=rejected, id=str(line),
                             split=None, source="mem.jsonl", line=line)


def build_pairs(examples, tokenizer, **settings):
  return dataset_lib.PairDataset.build(examples, tokenizer, tokenize.Truncation(**settings),
                                       {}, "test")


class PadIsEos(tokenize.ByteTokenizer):
  """Pythia's situation: the pad id equals the EOS id."""
  pad_id = 256


def test_byte_tokenizer():
  tok = tokenize.get_tokenizer("bytes")
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
  ids = tok.encode("TL;DR: é")
  assert ids == list("TL;DR: é".encode("utf-8")) and len(ids) == 9
  assert tok.decode(ids + [256, 257]) == "TL;DR: é"
  # An id past the bytes (a padded vocabulary's 258..263) is shown, one U+FFFD per id.
  assert tok.decode([65, 260, 66, 263, 256]) == "A\ufffdB\ufffd"
  assert tok.decode(list("é".encode("utf-8")) + [258]) == "é\ufffd"


@pytest.fixture(scope="module")
def neox_like_tokenizer_dir(tmp_path_factory):
  """A small byte-level BPE trained here, GPT-NeoX-like: '<|endoftext|>' is id 0, no pad."""
  from tokenizers import decoders, models, pre_tokenizers, trainers, Tokenizer
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  rng = np.random.default_rng(0)
  words = ["summary", "post", "boyfriend", "dinner", "plans", "forgot", "the", "and", "TL;DR:"]
  corpus = [" ".join(rng.choice(words, 12)) for _ in range(300)]
  tok.train_from_iterator(corpus, trainer)
  directory = tmp_path_factory.mktemp("neox_tok")
  tok.save(str(directory / "tokenizer.json"))
  return directory


def test_hf_tokenizer_from_file_pad_falls_back_to_eos(neox_like_tokenizer_dir):
  tok = tokenize.get_tokenizer(str(neox_like_tokenizer_dir / "tokenizer.json"))
  from tokenizers import Tokenizer
  path = str(neox_like_tokenizer_dir / "tokenizer.json")
  vocab_size = Tokenizer.from_file(path).get_vocab_size()
  assert tok.eos_id == 0 and tok.pad_id == 0 and tok.vocab_size == vocab_size > 256
  text = "the boyfriend forgot dinner plans TL;DR: summary"
  assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch([text, "post"]) == [tok.encode(text), tok.encode("post")]
  same = tokenize.get_tokenizer(str(neox_like_tokenizer_dir))  # A bare tokenizer.json dir.
  assert same.fingerprint == tok.fingerprint and same.fingerprint.startswith("hf-")


def test_hf_tokenizer_through_transformers(neox_like_tokenizer_dir, tmp_path):
  directory = tmp_path / "with_config"
  directory.mkdir()
  (directory / "tokenizer.json").write_text(
      (neox_like_tokenizer_dir / "tokenizer.json").read_text())
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
       "tokenizer_class": "PreTrainedTokenizerFast"}))
  tok = tokenize.get_tokenizer(str(directory))
  bare = tokenize.get_tokenizer(str(neox_like_tokenizer_dir / "tokenizer.json"))
  assert (tok.eos_id, tok.pad_id) == (0, 0)
  text = "dinner plans TL;DR: the summary"
  assert tok.encode(text) == bare.encode(text)


def test_unknown_tokenizer_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="config.data.tokenizer"):
    tokenize.get_tokenizer(str(tmp_path / "missing-tokenizer"))


def test_truncation_counts_and_eos_policy():
  tok = tokenize.ByteTokenizer()
  examples = [
      pair("P" * 5, "ab", "abcd", line=1),  # 5 + 5 = 10: fits exactly.
      pair("P" * 8, "ab", "abc", line=2),  # 8 + 4 > 10: prompt cut to 6, responses fit.
      pair("P" * 5, "a" * 9, "b", line=3),  # 5 + 10 > 10: prompt fits, chosen cut to 5.
      pair("Q" * 4 + "P" * 4, "a" * 9, "b", line=4),  # both cut: prompt to 6, chosen to 4.
  ]
  data = build_pairs(examples, tok, max_length=10, max_prompt_length=6)
  assert data.stats["truncated"] == 3
  assert data.stats["prompt_truncated"] == 2 and data.stats["response_truncated"] == 2
  assert data.stats["dropped"] == 0 and len(data) == 4
  batch = data.batch([0, 1, 2, 3])
  np.testing.assert_array_equal(batch["prompt_lengths"], [5, 6, 5, 6])
  np.testing.assert_array_equal(batch["lengths"], [[3, 5], [3, 4], [5, 2], [4, 2]])
  # keep_end keeps the end of the prompt (near "TL;DR:").
  assert tok.decode(batch["tokens"][3, 0, :6]) == "QQPPPP"
  # A cut response keeps its start and loses its EOS; an uncut one ends with EOS.
  np.testing.assert_array_equal(batch["tokens"][2, 0, 5:10], tok.encode("aaaaa"))
  assert batch["tokens"][2, 1, 6] == tok.eos_id
  keep_start = build_pairs(examples[3:], tok, max_length=10, max_prompt_length=6,
                           truncation_side="keep_start")
  assert tok.decode(keep_start.batch([0])["tokens"][0, 0, :6]) == "QQQQPP"
  dropped = build_pairs(examples, tok, max_length=10, max_prompt_length=6, overlong="drop")
  assert dropped.stats["dropped"] == 3 and len(dropped) == 1
  # Without a prompt limit, a prompt that fills max_length leaves no room: dropped.
  no_limit = build_pairs(examples + [pair("P" * 12, "a", "b", line=5)], tok, max_length=10)
  assert no_limit.stats["dropped"] == 1 and len(no_limit) == 4


def test_truncation_settings_are_validated():
  with pytest.raises(ConfigError, match="max_prompt_length"):
    tokenize.Truncation(max_length=10, max_prompt_length=10)
  with pytest.raises(ConfigError, match="truncation_side"):
    tokenize.Truncation(max_length=10, truncation_side="left")


@pytest.mark.parametrize("tokenizer", [tokenize.ByteTokenizer(), PadIsEos()],
                         ids=["pad!=eos", "pad==eos"])
def test_masks_cover_exactly_response_and_eos(tokenizer):
  rng = np.random.default_rng(0)
  examples = [pair("x" * rng.integers(1, 9), "c" * rng.integers(1, 8), "r" * rng.integers(1, 8),
                   line=i) for i in range(16)]
  data = build_pairs(examples, tokenizer, max_length=12, max_prompt_length=6)
  assert data.stats["response_truncated"] > 0 and data.stats["truncated"] < 16
  batch = data.batch(np.arange(16))
  tokens, loss_mask = batch["tokens"], batch["loss_mask"]
  assert tokens.shape == loss_mask.shape == (16, 2, 12) and tokens.dtype == np.int32
  np.testing.assert_array_equal(loss_mask.sum(-1), batch["lengths"])
  assert not loss_mask[..., -1].any()
  for b in range(16):
    prompt_len = batch["prompt_lengths"][b]
    for p in range(2):
      n = prompt_len + batch["lengths"][b, p]
      expected = np.zeros(12, np.int32)
      expected[prompt_len - 1:n - 1] = 1  # Position t predicts token t + 1.
      np.testing.assert_array_equal(loss_mask[b, p], expected)
      targets = tokens[b, p, 1:][loss_mask[b, p, :-1] == 1]
      text = examples[b].chosen if p == 0 else examples[b].rejected
      if batch["lengths"][b, p] == len(text) + 1:  # Whole response, then EOS.
        assert targets[-1] == tokenizer.eos_id and tokenizer.decode(targets[:-1]) == text
      else:  # Cut to fit: its start, no EOS.
        assert tokenizer.eos_id not in targets and tokenizer.decode(targets) == text[:len(targets)]
      np.testing.assert_array_equal(batch["attention_mask"][b, p], np.arange(12) < n)
      np.testing.assert_array_equal(batch["positions"][b, p],
                                    np.where(np.arange(12) < n, np.arange(12), 0))
      assert (tokens[b, p, n:] == tokenizer.pad_id).all()


def test_sft_batch_has_no_pair_axis():
  examples = [readers.SFTExample(prompt="abc", response="de", id="1", split=None,
                                 source="m.jsonl", line=1)]
  data = dataset_lib.SFTDataset.build(examples, tokenize.ByteTokenizer(),
                                      tokenize.Truncation(max_length=8), {}, "test")
  batch = data.batch([0])
  assert batch["tokens"].shape == (1, 8) and batch["lengths"].tolist() == [3]
  np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch["tokens"][0, :6], list(b"abcde") + [256])
  assert data.response_texts == ["de"] and data.reference_texts == ["de"]
