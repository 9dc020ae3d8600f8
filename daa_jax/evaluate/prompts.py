"""The evaluation's prompt set (held-out prompts, their human references) and generation budget."""

from __future__ import annotations

import dataclasses
import os
from absl import logging
import numpy as np
from daa_jax.data import pipeline as data_pipeline
from daa_jax.data import readers as data_readers
from daa_jax.errors import ConfigError, DataError
from daa_jax.data import files as data_files


_SYNTHETIC_MAX_NEW_TOKENS = 32  # 2x the task's longest reference (16 symbols + EOS)


@dataclasses.dataclass
class PromptSet:
  """Held-out prompts, left-padded: `tokens`/`mask` `[N,P]`, with their texts and references.

  `reference` says what the references are: {'kind': 'synthetic' | 'human' | 'chosen',
  'source', 'human', 'prompts'} (human: how many prompts have a human-written reference).
  """
  tokens: np.ndarray
  mask: np.ndarray
  texts: list[str]
  references: list[str]
  reference: dict = dataclasses.field(default_factory=dict)


def _human_references(source: str) -> dict[str, str]:
  """{post id or prompt text: reference} of TL;DR SFT files (format 'tldr_sft': the filtered
  TL;DR posts with their human summaries, or CarperAI/openai_summarize_tldr)."""
  try:
    files = data_files.resolve_files(source)
  except DataError as err:
    raise ConfigError(f"config.eval.reference_source={source!r}: {err} Give TL;DR SFT files "
                      "(format tldr_sft) with the human reference summaries.") from None
  out = {}
  for e in data_readers.read_sft(files, "tldr_sft"):
    out.setdefault(e.prompt.strip(), e.response)
    if e.id and not e.id.startswith(os.path.basename(e.source) + ":"):
      out.setdefault(e.id, e.response)
  return out


def prompt_set(data_config, workdir: str, num_prompts: int, pad_id: int,
               reference_source: str | None = None) -> PromptSet:
  """The first `num_prompts` distinct prompts of the eval split and their references.

  References, in order of preference: a human reference per prompt from `reference_source`
  (TL;DR SFT files joined on the post id, else on the prompt text; the paper judges against
  the human-written TL;DR), the data's own `reference` column, the synthetic task's reference
  summaries, else the chosen response of the prompt's first comparison (mostly a model sample
  in TL;DR: named 'chosen' in `reference`).
  """
  ds = data_pipeline.load_sft(data_config, "eval", workdir=workdir)
  human = _human_references(reference_source) if reference_source else {}
  texts, refs, seen, index, joined = [], [], set(), [], 0
  for i, (text, ref, id_) in enumerate(zip(ds.prompt_texts, ds.reference_texts, ds.ids)):
    if text not in seen and len(index) < num_prompts:
      seen.add(text)
      found = human.get(id_) or human.get(text.strip())
      joined += found is not None
      texts.append(text)
      refs.append(found if found is not None else ref)
      index.append(i)
  if data_config.source == "synthetic":
    reference = {"kind": "synthetic", "source": "the task's reference summaries"}
  elif reference_source:
    reference = {"kind": "human", "source": f"config.eval.reference_source={reference_source}",
                 "human": joined}
    if joined < len(index):
      logging.warning("eval: %d of %d prompts have no human reference in %s (joined on the post "
                      "id, then the prompt text); they use their chosen response.",
                      len(index) - joined, len(index), reference_source)
  elif ds.stats.get("references"):
    reference = {"kind": "human", "source": "the data's reference column",
                 "human": int(ds.stats["references"])}
  else:
    reference = {"kind": "chosen", "source": "the chosen response of each prompt's first pair; "
                 "give human references with config.eval.reference_source"}
  reference["prompts"] = len(index)
  if len(index) < num_prompts:
    logging.warning("eval: %d distinct held-out prompts, fewer than config.eval.num_prompts=%d.",
                    len(index), num_prompts)
  prompts = [ds.prompt_tokens(i) for i in index]
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for row, p in enumerate(prompts):  # left padding: every row's last prompt token is last
    tokens[row, width - len(p):] = p
    mask[row, width - len(p):] = 1
  return PromptSet(tokens, mask, texts, refs, reference)


def generation_budget(config) -> int:
  """New tokens each evaluation sample may have: the same for every sample, whatever the other
  prompts of the set (left padding puts them all at one width).

  `config.eval.max_new_tokens` when > 0; else 32 on the synthetic task (twice its longest
  reference); else `data.max_length − data.max_prompt_length` (the paper's 512 − 256 = 256):
  the longest response the training data could hold. Human TL;DR references are under ~50
  tokens, so only samples that ramble past what training ever showed are cut, and the
  `truncation_rate` of each checkpoint reports how many were (a cut sample under-estimates
  its KL and shows the judge a clipped response).
  """
  e, d = config.eval, config.data
  if int(e.max_new_tokens) > 0:
    return int(e.max_new_tokens)
  if d.source == "synthetic":
    return _SYNTHETIC_MAX_NEW_TOKENS
  prompt = d.get("max_prompt_length")
  return max(int(d.max_length) - int(prompt if prompt else int(d.max_length) // 2), 1)
