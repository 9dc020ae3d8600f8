"""HH dialogue through Gemma-2's chat template: rendering equals transformers', the prompt
mask ends exactly where the model's turn starts."""

import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from daa_jax.data import chat
from daa_jax.errors import DataError
from daa_jax.data import pipeline as data_pipeline

# Gemma-2-it's chat_template, as in its tokenizer_config.json.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}"
    "{% endif %}")

ROWS = [
    {"chosen": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Tom.\n\n"
               "Human: Another one?\n\nAssistant: How about Whiskers?",
     "rejected": "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Tom.\n\n"
                 "Human: Another one?\n\nAssistant: No."},
    {"chosen": "\n\nHuman: Hi there\n\nAssistant:  Hello! How can I help you today? ",
     "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."},
]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A byte-level BPE tokenizer trained here, with Gemma's special tokens and template."""
  path = tmp_path_factory.mktemp("gemma_tok")
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [r[k] for r in ROWS for k in ("chosen", "rejected")] * 4
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / "tokenizer.json"))
  with open(path / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
               "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
               "chat_template": GEMMA_TEMPLATE}, f)
  return str(path)


def test_hh_prompt_to_messages():
  prompt = ROWS[0]["chosen"][:ROWS[0]["chosen"].rfind("Assistant:") + len("Assistant:")]
  assert chat.hh_messages(prompt) == [
      {"role": "user", "content": "What is a good name for a cat?"},
      {"role": "assistant", "content": "Maybe Tom."},
      {"role": "user", "content": "Another one?"}]
  with pytest.raises(DataError, match="not HH dialogue"):
    chat.hh_messages("TL;DR: a post")


def test_rendering_equals_transformers(tokenizer_dir):
  hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  template = chat.ChatTemplate.load("tokenizer", tokenizer_dir)
  messages = chat.hh_messages("\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: Bye\n\nAssistant:")
  for gen in (True, False):
    assert template.render(messages, gen) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=gen)
  prompt, response = template.split(messages, "See you.")
  assert prompt.endswith("<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
  assert prompt.startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n")
  assert response == "See you.<end_of_turn>\n"


def test_prompt_mask_is_exact_at_the_template_boundary(tokenizer_dir, tmp_path):
  hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  source = tmp_path / "hh.jsonl"
  with open(source, "w") as f:
    for row in ROWS:
      f.write(json.dumps(row) + "\n")
  cfg = data_pipeline.default_config()
  cfg.update(source=str(source), format="hh", tokenizer=tokenizer_dir,
             chat_template="tokenizer", max_length=256, max_prompt_length=128,
             eval_source=str(source))
  ds = data_pipeline.load_pairs(cfg, "eval", workdir=str(tmp_path))
  batch = ds.batch(range(len(ROWS)))
  model_turn = hf.encode("<start_of_turn>model\n", add_special_tokens=False)
  eos = hf.convert_tokens_to_ids("<eos>")
  for row in range(len(ROWS)):
    p = int(batch["prompt_lengths"][row])
    for k, key in enumerate(("chosen", "rejected")):
      tokens, loss_mask = batch["tokens"][row, k], batch["loss_mask"][row, k]
      n = p + int(batch["lengths"][row, k])
      # The prompt ends with the model's turn marker; targets start right after it.
      assert list(tokens[p - len(model_turn):p]) == model_turn
      assert np.flatnonzero(loss_mask)[0] == p - 1 and np.flatnonzero(loss_mask)[-1] == n - 2
      # The response is the assistant turn through <end_of_turn>\n, then EOS.
      text = hf.decode(tokens[p:n], skip_special_tokens=False)
      reply = ROWS[row][key][ROWS[row][key].rfind("Assistant:") + len("Assistant:"):].strip()
      assert text == reply + "<end_of_turn>\n<eos>"
      # Tokenizing prompt and response apart equals tokenizing the whole conversation.
      messages = chat.hh_messages(ROWS[row][key][:ROWS[row][key].rfind("Assistant:") + 10])
      full = hf.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                    tokenize=False)
      assert list(tokens[:n]) == hf.encode(full, add_special_tokens=False) + [eos]


def test_missing_template_is_a_config_error(tmp_path):
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
  with pytest.raises(ConfigError, match=r"config\.data\.chat_template='tokenizer'.*no "
                                        r"chat_template"):
    chat.ChatTemplate.load("tokenizer", str(tmp_path))
  with pytest.raises(ConfigError, match="neither 'tokenizer' nor a template file"):
    chat.ChatTemplate.load("no_such.jinja", str(tmp_path))


def test_template_bos_is_not_doubled(tmp_path):
  """Llama-3-like tokenizer whose post-processor adds BOS, template rendering {{ bos_token }}:
  exactly one BOS, as transformers' apply_chat_template(tokenize=True)."""
  from tests.data.test_data_tokenize import llama3_like_tokenizer
  path = llama3_like_tokenizer(tmp_path / "tok")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  hf.chat_template = GEMMA_TEMPLATE
  hf.save_pretrained(path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  bos = hf.bos_token_id
  assert hf("Hi").input_ids[0] == bos  # the tokenizer itself adds BOS to a plain text
  source = tmp_path / "hh.jsonl"
  source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
  cfg = data_pipeline.default_config()
  cfg.update(source=str(source), format="hh", tokenizer=path, chat_template="tokenizer",
             max_length=256, max_prompt_length=128, eval_source=str(source))
  ds = data_pipeline.load_pairs(cfg, "eval", workdir=str(tmp_path))
  batch = ds.batch(range(len(ROWS)))
  for row in range(len(ROWS)):
    p = int(batch["prompt_lengths"][row])
    prompt = ROWS[row]["chosen"][:ROWS[row]["chosen"].rfind("Assistant:") + 10]
    messages = chat.hh_messages(prompt)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(getattr(expected, "input_ids", expected))
    assert expected[0] == bos and expected.count(bos) == 1
    assert list(batch["tokens"][row, 0, :p]) == expected == list(ds.prompt_tokens(row))
    for k in range(2):
      n = p + int(batch["lengths"][row, k])
      assert list(batch["tokens"][row, k, :n]).count(bos) == 1


def test_template_without_bos_gets_the_tokenizers(tmp_path):
  """A template that renders no BOS, for a tokenizer that adds one: the prompt starts with it,
  as `tokenizer(rendered_text)` does."""
  from tests.data.test_data_tokenize import llama3_like_tokenizer
  path = llama3_like_tokenizer(tmp_path / "tok")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  template = chat.ChatTemplate(GEMMA_TEMPLATE.replace("{{ bos_token }}", ""), "", "")
  source = tmp_path / "hh.jsonl"
  source.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
  jinja = tmp_path / "t.jinja"
  jinja.write_text(GEMMA_TEMPLATE.replace("{{ bos_token }}", ""))
  cfg = data_pipeline.default_config()
  cfg.update(source=str(source), format="hh", tokenizer=path, chat_template=str(jinja),
             max_length=256, max_prompt_length=128, eval_source=str(source))
  ds = data_pipeline.load_pairs(cfg, "eval", workdir=str(tmp_path))
  for row in range(len(ROWS)):
    prompt = ROWS[row]["chosen"][:ROWS[row]["chosen"].rfind("Assistant:") + 10]
    text = template.render(chat.hh_messages(prompt), add_generation_prompt=True)
    assert not text.startswith("<|begin_of_text|>")
    assert list(ds.prompt_tokens(row)) == hf(text).input_ids
    assert ds.prompt_tokens(row)[0] == hf.bos_token_id
