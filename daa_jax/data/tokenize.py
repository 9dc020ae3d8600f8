"""Tokenizers (Hugging Face or built-in bytes) and the truncation policy.

A prompt and each of its responses are tokenized separately and concatenated, so the tokens of
prompt + response are exactly prompt tokens followed by response tokens, and the boundary (what
the loss masks) is known without re-tokenizing. EOS is appended to every response.

BOS: `encode_prompt` starts a sequence with the ids `tokenizer(text)` of transformers puts
before the text (the tokenizer's own `add_bos_token`/post-processor decides: Llama-3, Gemma-2
and Mistral add `<bos>`, GPT-NeoX and Qwen2 nothing), once: a text that already starts with them
(a chat template rendering `{{ bos_token }}`) gets no second one. Responses (`encode`) never get
any, so BOS is only ever at position 0. A trailing EOS such a post-processor adds is ignored:
EOS placement is the pipeline's job.

Truncation (`truncate`) follows the original DPO code: nothing is cut while prompt + longest
response + EOS fits `max_length`. Otherwise the prompt is cut to `max_prompt_length` (keeping its
end near "TL;DR:" by default), then each response is cut to what is left. A cut response keeps
its start and LOSES its EOS, as in the DPO code: it was not finished, and teaching the model to
stop where the budget ran out would bias it toward short, clipped answers. With
`overlong='drop'` such examples are dropped instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

from daa_jax.errors import ConfigError

TRUNCATION_SIDES = ("keep_end", "keep_start")
OVERLONG_POLICIES = ("truncate", "drop")


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is EOS, 257 is PAD. Needs no files."""

  eos_id = 256
  pad_id = 257
  vocab_size = 258
  fingerprint = "bytes-v1"
  bos_prefix: tuple[int, ...] = ()  # no BOS

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_prompt(self, text: str) -> list[int]:
    return self.encode(text)

  def encode_prompt_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.encode_batch(texts)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes bytes, skipping EOS/PAD; invalid UTF-8 (a sampled half-character) becomes U+FFFD.

    Any other id (a model's vocabulary may be padded past 258) is rendered as U+FFFD too, one
    per id: dropping it would hide exactly the junk an over-optimized policy emits.
    """
    out, run = [], []
    for i in (int(i) for i in ids):
      if 0 <= i < 256:
        run.append(i)
      elif i not in (self.eos_id, self.pad_id):
        out.append(bytes(run).decode("utf-8", errors="replace") + "\ufffd")
        run = []
    out.append(bytes(run).decode("utf-8", errors="replace"))
    return "".join(out)


class HFTokenizer:
  """A Hugging Face tokenizer (`transformers` or a bare `tokenizers` file) behind one interface.

  Special tokens are never added by `encode` (responses): EOS placement is the pipeline's job.
  `encode_prompt` starts a sequence with `bos_prefix`, the ids the tokenizer's own special-token
  rule puts before a text. Pythia has no pad token, so PAD falls back to EOS; masks come from
  lengths, never from `tokens != pad_id`.
  """

  def __init__(self, name: str):
    self.name = name
    eos = pad = None
    if os.path.isfile(name) or (os.path.isdir(name) and _is_bare_tokenizer_dir(name)):
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
      path = name if os.path.isfile(name) else os.path.join(name, "tokenizer.json")
      self._fast = Tokenizer.from_file(path)
      vocab = self._fast.get_vocab(with_added_tokens=True)
      eos = next((vocab[t] for t in ("<|endoftext|>", "</s>", "<eos>", "<|eos|>",
                                                      "<|end_of_text|>") if t in vocab),
                 None)
      pad = next((vocab[t] for t in ("<|padding|>", "<pad>", "[PAD]") if t in vocab), None)
      self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
      serialized = self._fast.to_str()
      with_specials = lambda t: self._fast.encode(t, add_special_tokens=True).ids
    elif not os.path.exists(name) and name.startswith(("/", "./", "../", "~")):  # a local path, not a hub id
      raise ConfigError(
          f"config.data.tokenizer={name!r}: no such file or directory (relative paths are "
          f"relative to {os.getcwd()}). Give 'bytes', a tokenizer.json file or a directory "
          "holding one (e.g. a model saved with save_pretrained), or a Hugging Face hub id.")
    else:
      try:
        from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
        hf = AutoTokenizer.from_pretrained(name)
      except (OSError, ValueError) as e:
        raise ConfigError(
            f"config.data.tokenizer={name!r}: cannot load it ({e}). Give 'bytes', a local "
            "tokenizer.json or directory, or a Hugging Face hub id already in the local cache "
            "(download it on a machine with network access first).") from e
      eos, pad = hf.eos_token_id, hf.pad_token_id
      self.vocab_size = len(hf)
      backend = getattr(hf, "backend_tokenizer", None)
      self._fast = backend
      self._slow = hf if backend is None else None
      serialized = (backend.to_str() if backend is not None
                    else json.dumps(sorted(hf.get_vocab().items())))
      # Ask transformers itself: its `add_bos_token` may differ from the backend's processor.
      with_specials = lambda t: list(hf(t, add_special_tokens=True)["input_ids"])
    if eos is None:
      raise ConfigError(f"config.data.tokenizer={name!r} has no EOS token; use a tokenizer "
                        "that defines one (e.g. '<|endoftext|>').")
    self.eos_id = int(eos)
    self.pad_id = int(eos if pad is None else pad)
    self.bos_prefix = _special_prefix(self.encode, with_specials)
    digest = hashlib.sha256(serialized.encode("utf-8")).hexdigest()[:16]
    bos = "-".join(map(str, self.bos_prefix))
    self.fingerprint = f"hf-{digest}-eos{self.eos_id}-pad{self.pad_id}-bos{bos}"

  def encode(self, text: str) -> list[int]:
    if self._fast is None:
      return self._slow.encode(text, add_special_tokens=False)
    return self._fast.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self._fast is None:
      return [self.encode(t) for t in texts]
    return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]

  def encode_prompt(self, text: str) -> list[int]:
    """`encode(text)` behind `bos_prefix`, unless it already starts with it."""
    return self._with_prefix(self.encode(text))

  def encode_prompt_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._with_prefix(ids) for ids in self.encode_batch(texts)]

  def _with_prefix(self, ids: list[int]) -> list[int]:
    prefix = list(self.bos_prefix)
    return ids if ids[:len(prefix)] == prefix else prefix + ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self._fast is None:
      return self._slow.decode(ids, skip_special_tokens=True)
    return self._fast.decode(ids, skip_special_tokens=True)


def _special_prefix(plain, with_specials) -> tuple[int, ...]:
  """The ids `with_specials(text)` puts before `plain(text)`'s (BOS), found on probe texts.

  Whatever it puts after them (an EOS some post-processors add) is not part of the prefix.
  """
  for probe in ("Hello world", "a", "0"):
    ids, full = list(plain(probe)), list(with_specials(probe))
    if not ids:
      continue
    for k in range(len(full) - len(ids) + 1):
      if full[k:k + len(ids)] == ids:
        return tuple(int(i) for i in full[:k])
  return ()


def _is_bare_tokenizer_dir(path: str) -> bool:
  """A directory holding only tokenizer.json (no transformers config) is read with `tokenizers`."""
  files = set(os.listdir(path))
  return "tokenizer.json" in files and "tokenizer_config.json" not in files


def get_tokenizer(name: str):
  """Returns a tokenizer with `encode`, `encode_batch` (no special tokens: responses),
  `encode_prompt`, `encode_prompt_batch` (start of a sequence: with BOS where the tokenizer adds
  it), `bos_prefix`, `decode`, `eos_id`, `pad_id`, `vocab_size` and `fingerprint` (a stable
  string for cache keys).

  Args:
    name: 'bytes' (built-in byte-level tokenizer), a tokenizer.json file, a directory (with
      tokenizer_config.json: transformers `AutoTokenizer`; with only tokenizer.json: the
      `tokenizers` library), or a Hugging Face hub id such as 'EleutherAI/pythia-1b'.
  """
  if name == "bytes":
    return ByteTokenizer()
  return HFTokenizer(name)


@dataclasses.dataclass(frozen=True)
class Truncation:
  """Length settings; see the module docstring for the policy."""
  max_length: int  # prompt + response + EOS, the batch length L.
  max_prompt_length: Optional[int] = None  # None: the prompt is never cut.
  truncation_side: str = "keep_end"  # Which part of an over-long prompt to keep.
  overlong: str = "truncate"  # 'truncate' or 'drop' examples that do not fit.

  def __post_init__(self):
    if self.max_length < 2:
      raise ConfigError(f"config.data.max_length={self.max_length}; it must be at least 2.")
    if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
      raise ConfigError(
          f"config.data.max_prompt_length={self.max_prompt_length} must be in [1, max_length="
          f"{self.max_length}) to leave room for a response; or None to never cut prompts.")
    if self.truncation_side not in TRUNCATION_SIDES:
      raise ConfigError(f"config.data.truncation_side={self.truncation_side!r}; use one of "
                        f"{TRUNCATION_SIDES}.")
    if self.overlong not in OVERLONG_POLICIES:
      raise ConfigError(f"config.data.overlong={self.overlong!r}; use one of "
                        f"{OVERLONG_POLICIES}.")


def truncate(prompt: list[int], responses: list[list[int]], eos_id: int, settings: Truncation,
             bos_prefix: Sequence[int] = ()):
  """Appends EOS to each response and applies the truncation policy.

  Args:
    prompt: prompt token ids.
    responses: token ids of each response (one for SFT, chosen and rejected for pairs).
    eos_id: appended to every response.
    settings: the length settings.
    bos_prefix: the tokenizer's BOS ids; a cut prompt that starts with them keeps them first
      (cutting the start off must not leave the model a sequence without its BOS).

  Returns:
    (prompt, responses, prompt_cut, response_cut), or None when the example is dropped.
  """
  responses = [list(r) + [eos_id] for r in responses]
  if len(prompt) + max(len(r) for r in responses) <= settings.max_length:
    return prompt, responses, False, False
  if settings.overlong == "drop":
    return None
  prompt_cut = False
  limit = settings.max_prompt_length
  if limit is not None and len(prompt) > limit:
    keep = len(bos_prefix) if list(prompt[:len(bos_prefix)]) == list(bos_prefix) else 0
    keep = min(keep, limit)
    if settings.truncation_side == "keep_end":
      prompt = list(prompt[:keep]) + list(prompt[len(prompt) - (limit - keep):])
    else:
      prompt = prompt[:limit]
    prompt_cut = True
  budget = settings.max_length - len(prompt)
  if budget < 1:  # Only when prompts are never cut: nothing of the response would fit.
    return None
  response_cut = any(len(r) > budget for r in responses)
  return prompt, [r[:budget] for r in responses], prompt_cut, response_cut


class Ragged:
  """Variable-length sequences stored flat: sequence i is `values[offsets[i]:offsets[i + 1]]`."""

  def __init__(self, values: np.ndarray, offsets: np.ndarray):
    self.values = np.asarray(values)
    self.offsets = np.asarray(offsets, np.int64)

  @classmethod
  def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "Ragged":
    """Token id lists -> int32 Ragged."""
    lengths = np.fromiter((len(s) for s in seqs), np.int64, count=len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.fromiter((t for s in seqs for t in s), np.int32, count=int(offsets[-1]))
    return cls(values, offsets)

  @classmethod
  def from_texts(cls, texts: Sequence[str]) -> "Ragged":
    """Strings -> their UTF-8 bytes as a uint8 Ragged, so an npz cache holds text without pickle."""
    encoded = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return cls(np.frombuffer(b"".join(encoded), np.uint8), offsets)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int32)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    return self.values[self.offsets[i]:self.offsets[i + 1]]

  def text(self, i: int) -> str:
    """Sequence i of a `from_texts` Ragged, as a string."""
    return self[i].tobytes().decode("utf-8")
