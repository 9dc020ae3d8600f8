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


WORDS = ["summary", "post", "boyfriend", "dinner", "plans", "forgot", "the", "and", "TL;DR:"]


def llama3_like_tokenizer(directory, bos_post_processor=True):
  """A byte-level BPE trained here, saved with transformers: Llama-3-like, its post-processor
  puts '<|begin_of_text|>' (id 0) before every text ('eos_too': and '<|end_of_text|>' after);
  '<|end_of_text|>' is EOS (id 1)."""
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers, Tokenizer
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<start_of_turn>", "<end_of_turn>"]
  tok.train_from_iterator(
      [" ".join(np.random.default_rng(i).choice(WORDS, 12)) for i in range(300)],
      trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                          show_progress=False))
  if bos_post_processor:
    end = " <|end_of_text|>" if bos_post_processor == "eos_too" else ""
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A" + end, pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0), ("<|end_of_text|>", 1)])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
  hf.save_pretrained(str(directory))
  return str(directory)


@pytest.fixture(scope="module")
def llama3_like_dir(tmp_path_factory):
  return llama3_like_tokenizer(tmp_path_factory.mktemp("llama3_tok"))


TEXTS = ["the boyfriend forgot dinner plans TL;DR:", " post", "summary and the post"]


def test_prompt_bos_equals_transformers(llama3_like_dir):
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(llama3_like_dir)
  for tok in (tokenize.get_tokenizer(llama3_like_dir),  # through transformers
              tokenize.get_tokenizer(llama3_like_dir + "/tokenizer.json")):  # bare tokenizers
    assert tok.bos_prefix == (0,) and tok.eos_id == 1
    for text in TEXTS:
      assert tok.encode_prompt(text) == hf(text).input_ids  # BOS, once, at the start
      assert tok.encode_prompt(text)[0] == 0 and tok.encode(text) == hf(text).input_ids[1:]
    assert tok.encode_prompt_batch(TEXTS) == [hf(t).input_ids for t in TEXTS]
    # A text that already starts with BOS (a template rendering it) gets no second one.
    assert tok.encode_prompt("<|begin_of_text|>the post") == hf.encode(
        "<|begin_of_text|>the post", add_special_tokens=False)
    assert tok.encode_prompt("<|begin_of_text|>the post").count(0) == 1
  assert tokenize.get_tokenizer(llama3_like_dir).fingerprint.endswith("-bos0")


def test_trailing_eos_of_a_post_processor_is_not_taken(tmp_path):
  """A post-processor adding BOS and EOS (Llama's add_bos_token + add_eos_token): BOS is taken,
  EOS is not (the pipeline places EOS after responses only)."""
  import transformers
  path = llama3_like_tokenizer(tmp_path, bos_post_processor="eos_too")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  tok = tokenize.get_tokenizer(path)
  assert tok.bos_prefix == (0,)
  for text in TEXTS:
    expected = hf(text).input_ids
    assert expected[0] == 0 and expected[-1] == 1  # transformers adds both
    assert tok.encode_prompt(text) == expected[:-1]


def test_no_bos_for_neox_like(neox_like_tokenizer_dir):
  """GPT-NeoX / Qwen2: no post-processor BOS, so none is added."""
  for path in (str(neox_like_tokenizer_dir), str(neox_like_tokenizer_dir / "tokenizer.json")):
    tok = tokenize.get_tokenizer(path)
    assert tok.bos_prefix == ()
    assert tok.encode_prompt(TEXTS[0]) == tok.encode(TEXTS[0])
  assert tokenize.ByteTokenizer().encode_prompt("ab") == [97, 98]


def test_pairs_start_with_bos_and_truncation_keeps_it(llama3_like_dir):
  bos_tok = tokenize.get_tokenizer(llama3_like_dir)
  plain = tokenize.get_tokenizer(llama3_like_dir + "/tokenizer.json")
  plain.bos_prefix = ()  # the same vocabulary without BOS: what the masks were before
  long_prompt = " ".join(WORDS * 4)
  examples = [pair("the post TL;DR:", " summary", " the plans", line=1),
              pair(long_prompt, " dinner and the post", " forgot", line=2),
              pair("and TL;DR:", " boyfriend " * 3, " post", line=3)]
  for side in ("keep_end", "keep_start"):
    settings = dict(max_length=24, max_prompt_length=10, truncation_side=side)
    with_bos, without = build_pairs(examples, bos_tok, **settings), build_pairs(
        examples, plain, **settings)
    assert with_bos.stats["prompt_truncated"] == 1
    b, old = with_bos.batch(range(3)), without.batch(range(3))
    assert (b["tokens"][:, :, 0] == 0).all()  # every row starts with BOS
    assert (b["tokens"][:, :, 1:] != 0).all()  # and has it nowhere else
    for i, e in enumerate(examples):
      p = int(b["prompt_lengths"][i])
      ids = bos_tok.encode_prompt(e.prompt)
      if len(ids) <= 10:
        assert p == len(ids) and list(b["tokens"][i, 0, :p]) == ids
      else:  # cut to 10, BOS kept first: the end (or the start) of the text after it
        kept = [0] + (ids[-9:] if side == "keep_end" else ids[1:10])
        assert p == 10 and list(b["tokens"][i, 0, :p]) == kept
      # The response part is unchanged: the same tokens, lengths and loss mask, shifted by
      # the prompt's length change.
      q = int(old["prompt_lengths"][i])
      np.testing.assert_array_equal(b["lengths"][i], old["lengths"][i])
      for k in range(2):
        n = int(b["lengths"][i, k])
        np.testing.assert_array_equal(b["tokens"][i, k, p:p + n], old["tokens"][i, k, q:q + n])
        np.testing.assert_array_equal(b["loss_mask"][i, k, p - 1:p - 1 + n],
                                      old["loss_mask"][i, k, q - 1:q - 1 + n])
        assert b["loss_mask"][i, k].sum() == n and not b["loss_mask"][i, k, :p - 1].any()


def test_truncate_keeps_bos_when_cutting_the_prompt_start():
  settings = tokenize.Truncation(max_length=6, max_prompt_length=3)
  prompt, responses, cut, _ = tokenize.truncate([0, 5, 6, 7, 8], [[9]], 1, settings, (0,))
  assert prompt == [0, 7, 8] and responses == [[9, 1]] and cut
  # A prompt without the BOS (not from encode_prompt) is cut as before.
  assert tokenize.truncate([5, 6, 7, 8, 4], [[9]], 1, settings, (0,))[0] == [7, 8, 4]
  one = tokenize.Truncation(max_length=6, max_prompt_length=1)
  assert tokenize.truncate([0, 5, 6, 7, 8, 3], [[9]], 1, one, (0,))[0] == [0]


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
