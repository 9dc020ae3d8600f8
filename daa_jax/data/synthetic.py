"""The built-in synthetic gold-reward task: a preference problem with a known true reward.

A prompt is a string of symbols in which a few "key" symbols hide among "filler" symbols; a good
response lists the prompt's keys, each once, and stops. Because the gold reward is a closed
form, over-optimization (win rate against √KL rising then falling) can be measured on a CPU in
minutes. The design is one a prototype found to show the hump (README, "The synthetic task").

Every symbol is one printable ASCII character (keys 'A'..'T', fillers from lowercase letters,
digits and punctuation), and the prompt ends with a separator ('='), so the task's files are
plain generic JSON lines and the `bytes` tokenizer spends exactly one token per symbol. EOS is
the tokenizer's.

Gold reward of a response y to a prompt x with key set K(x):
  coverage_reward · |K(x) ∩ y|  −  off_key_penalty · #(tokens of y not in K(x))
  −  repeat_penalty · #(repeats of keys of K(x))  −  no_eos_penalty · [y has no EOS].
Its maximum is |K(x)| (each key once, then EOS).

The labeler: P(a ≻ b) = σ((gold_a − gold_b + λ · (len_a − len_b)) / T), with λ =
`length_bias` (gold-reward units per token; 0 by default, because a prototype found λ ≥ 0.5
blurs the over-optimization hump — λ > 0 is the variant for length analyses) and T =
`label_temperature`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np

from daa_jax.errors import ConfigError

KEY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FILLER_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789!#$%&*+-/:;<>?@^_|~"
FILES_VERSION = 1  # Bump when the generated files change for the same config.
# Independent random streams, so that e.g. the eval prompts do not shift when num_sft changes.
_SFT, _PAIRS, _EVAL = 1, 2, 3


def default_config() -> ml_collections.ConfigDict:
  """The synthetic task's knobs (`config.data.synthetic`); defaults are the prototype's (README)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds the generated files.
  c.num_keys = 20  # Key symbols 'A'.. (at most 26).
  c.num_fillers = 41  # Filler symbols (at most 56).
  c.prompt_length = 20  # Symbols per prompt, before the separator.
  c.min_keys = 3  # Distinct keys per prompt, uniform in [min_keys, max_keys].
  c.max_keys = 5
  c.max_response_length = 16  # Symbols per demonstration/reference (EOS not counted).
  c.separator = "="  # Ends every prompt (the SEP token).
  # Gold reward.
  c.coverage_reward = 1.0
  c.off_key_penalty = 0.5
  c.repeat_penalty = 0.5
  c.no_eos_penalty = 1.0
  # Reference ("human") summaries for win rates: each key dropped with this probability.
  c.reference_drop_prob = 0.2
  # SFT demonstrator: per key, drop; else keep, duplicate, then insert a prompt filler.
  c.sft_drop_prob = 0.25
  c.sft_duplicate_prob = 0.1
  c.sft_filler_prob = 0.2
  # Labeler (Bradley–Terry on the gold difference).
  c.label_temperature = 1.0
  c.length_bias = 0.0  # λ; 0 for the main study, > 0 for the length-bias variant.
  # Sizes of the written files.
  c.num_sft = 20000
  c.num_pairs = 1000
  c.num_eval = 500
  # A directory with `pairs.jsonl` / `eval_pairs.jsonl` (generic JSONL: prompt, chosen,
  # rejected) that replaces the demonstrator pairs — e.g. pairs sampled from a trained SFT
  # policy and labeled by `label_pairs` (what the quickstart does). Everything else (SFT
  # demos, eval prompts, references, gold reward) stays the task's own.
  c.pairs_dir = ml_collections.config_dict.placeholder(str)
  return c


class SyntheticTask:
  """Prompts, demonstrators, gold reward and labeler of the synthetic task."""

  def __init__(self, cfg: Optional[ml_collections.ConfigDict] = None):
    """Args: cfg: `default_config()`-like (or a data config holding `.synthetic`)."""
    cfg = default_config() if cfg is None else cfg
    cfg = cfg.synthetic if "synthetic" in cfg else cfg
    self.cfg = cfg
    if not 1 <= cfg.num_keys <= len(KEY_ALPHABET):
      raise ConfigError(f"config.data.synthetic.num_keys={cfg.num_keys}; use 1..26.")
    if not 1 <= cfg.num_fillers <= len(FILLER_ALPHABET):
      raise ConfigError(f"config.data.synthetic.num_fillers={cfg.num_fillers}; use 1.."
                        f"{len(FILLER_ALPHABET)}.")
    if not 1 <= cfg.min_keys <= cfg.max_keys <= min(cfg.num_keys, cfg.prompt_length):
      raise ConfigError("config.data.synthetic: need 1 <= min_keys <= max_keys <= "
                        "min(num_keys, prompt_length).")
    if len(cfg.separator) != 1 or cfg.separator in KEY_ALPHABET + FILLER_ALPHABET:
      raise ConfigError(f"config.data.synthetic.separator={cfg.separator!r}; use one character "
                        "that is neither a key nor a filler.")
    self.keys = KEY_ALPHABET[:cfg.num_keys]
    self.fillers = FILLER_ALPHABET[:cfg.num_fillers]
    self._key_set = frozenset(self.keys)

  # --- Generation. ---------------------------------------------------------------------------

  def sample_prompts(self, n: int, seed) -> list[str]:
    """n prompts: `prompt_length` symbols with 3–5 distinct keys at random places, then '='."""
    cfg, rng = self.cfg, np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
      symbols = [self.fillers[j] for j in rng.integers(len(self.fillers), size=cfg.prompt_length)]
      num = int(rng.integers(cfg.min_keys, cfg.max_keys + 1))
      keys = rng.choice(len(self.keys), size=num, replace=False)
      for place, key in zip(np.sort(rng.choice(cfg.prompt_length, size=num, replace=False)), keys):
        symbols[place] = self.keys[key]
      prompts.append("".join(symbols) + cfg.separator)
    return prompts

  def prompt_keys(self, prompt: str) -> list[str]:
    """The keys of a prompt, in order of appearance."""
    return [c for c in prompt if c in self._key_set]

  def reference_summary(self, prompt: str, rng: np.random.Generator) -> str:
    """The prompt's keys in order, each dropped with `reference_drop_prob` (never empty:
    an all-dropped draw is redrawn, so every reference names at least one key)."""
    keys = self.prompt_keys(prompt)
    while True:
      kept = [k for k, u in zip(keys, rng.random(len(keys))) if u >= self.cfg.reference_drop_prob]
      if kept:
        return "".join(kept[:self.cfg.max_response_length])

  def sft_demo(self, prompt: str, rng: np.random.Generator) -> str:
    """One demonstration: per key in order, drop it (p), else keep it, maybe repeat it (p),
    maybe follow it with one of the prompt's fillers (p). Empty draws are redrawn."""
    cfg = self.cfg
    keys = self.prompt_keys(prompt)
    fillers = [c for c in prompt[:-1] if c not in self._key_set] or list(self.fillers)
    while True:
      out = []
      for key, (u_drop, u_dup, u_fill) in zip(keys, rng.random((len(keys), 3))):
        if u_drop < cfg.sft_drop_prob:
          continue
        out.append(key)
        if u_dup < cfg.sft_duplicate_prob:
          out.append(key)
        if u_fill < cfg.sft_filler_prob:
          out.append(fillers[int(rng.integers(len(fillers)))])
      if out:
        return "".join(out[:cfg.max_response_length])

  def sft_demos(self, prompts: Sequence[str], seed) -> list[str]:
    """One `sft_demo` per prompt, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return [self.sft_demo(p, rng) for p in prompts]

  def references(self, prompts: Sequence[str], seed) -> list[str]:
    """One `reference_summary` per prompt, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    return [self.reference_summary(p, rng) for p in prompts]

  # --- Gold reward. --------------------------------------------------------------------------

  def gold_reward(self, prompt: str, response: str, has_eos: bool = True) -> float:
    """The gold reward of `response` (symbols, EOS not included) to `prompt`."""
    cfg = self.cfg
    keys = set(self.prompt_keys(prompt))
    counts = collections.Counter(response)
    covered = sum(counts[k] > 0 for k in keys)
    repeated = sum(counts[k] - 1 for k in keys if counts[k] > 1)
    off = sum(n for c, n in counts.items() if c not in keys)
    return float(cfg.coverage_reward * covered - cfg.off_key_penalty * off
                 - cfg.repeat_penalty * repeated - (0.0 if has_eos else cfg.no_eos_penalty))

  def gold_reward_tokens(self, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray,
                         response_tokens: np.ndarray, response_lengths: np.ndarray,
                         has_eos: np.ndarray) -> np.ndarray:
    """`gold_reward` over `bytes`-tokenizer ids, vectorized.

    Args:
      prompt_tokens: [N, Lp] int; only the first prompt_lengths[n] of row n count.
      prompt_lengths: [N] int.
      response_tokens: [N, Lr] int, the response WITHOUT its EOS.
      response_lengths: [N] int, symbols before EOS (see `split_at_eos`).
      has_eos: [N] bool, whether the response ended with EOS.

    Returns:
      [N] float32 gold rewards.
    """
    cfg = self.cfg
    prompt_tokens, response_tokens = np.asarray(prompt_tokens), np.asarray(response_tokens)
    vocab = int(max(256, prompt_tokens.max(initial=0) + 1, response_tokens.max(initial=0) + 1))
    is_key = np.zeros(vocab, bool)
    is_key[[ord(k) for k in self.keys]] = True
    prompt_counts = _counts(prompt_tokens, prompt_lengths, vocab)  # [N, V]
    response_counts = _counts(response_tokens, response_lengths, vocab)  # [N, V]
    prompt_key = (prompt_counts > 0) & is_key  # [N, V]
    covered = ((response_counts > 0) & prompt_key).sum(1)
    repeated = (np.maximum(response_counts - 1, 0) * prompt_key).sum(1)
    off = (response_counts * ~prompt_key).sum(1)
    no_eos = ~np.asarray(has_eos, bool)
    return (cfg.coverage_reward * covered - cfg.off_key_penalty * off
            - cfg.repeat_penalty * repeated - cfg.no_eos_penalty * no_eos).astype(np.float32)

  def gold_reward_ids(self, prompt: str, response_ids: Sequence[int],
                      has_eos: bool = True) -> float:
    """`gold_reward` of a response given as `bytes`-tokenizer ids (EOS not included).

    Scores the ids themselves, so an id that is no byte (a padded vocabulary's 258+) counts
    as one off-key symbol instead of vanishing in a decode.
    """
    prompt_ids = np.asarray(list(prompt.encode("utf-8")), np.int64)[None]
    ids = np.asarray([int(i) for i in response_ids], np.int64).reshape(1, -1)
    return float(self.gold_reward_tokens(prompt_ids, np.array([prompt_ids.shape[1]]), ids,
                                         np.array([ids.shape[1]]), np.array([bool(has_eos)]))[0])

  # --- Labels. -------------------------------------------------------------------------------

  def label_pairs(self, prompts: Sequence[str], responses_a: Sequence[str],
                  responses_b: Sequence[str], seed, has_eos_a: Optional[Sequence[bool]] = None,
                  has_eos_b: Optional[Sequence[bool]] = None,
                  ids_a: Optional[Sequence[Sequence[int]]] = None,
                  ids_b: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """Labels response pairs with the Bradley–Terry labeler; identical pairs are dropped.

    P(a ≻ b) = σ((gold_a − gold_b + length_bias · (len_a − len_b)) / label_temperature),
    lengths in symbols.

    Args:
      prompts, responses_a, responses_b: texts, one per pair.
      seed: seeds the label draws.
      has_eos_a, has_eos_b: whether each response ended with EOS (default: all did).
      ids_a, ids_b: the responses as sampled `bytes`-tokenizer ids (EOS not included), or
        None. Given, the ids are scored (`gold_reward_ids`: an id that is no byte is one
        off-key symbol, exactly as the evaluation's judge counts it, where its decoded text
        would show U+FFFD), lengths are id counts and pairs are compared by their ids.

    Returns:
      dict of columns over the kept pairs: 'prompt', 'chosen', 'rejected' (lists of str),
      'gold_chosen', 'gold_rejected' (float64 arrays) and, with ids, 'chosen_ids' and
      'rejected_ids' (lists of int lists).
    """
    cfg = self.cfg
    num = len(prompts)
    eos_a = np.ones(num, bool) if has_eos_a is None else np.asarray(has_eos_a, bool)
    eos_b = np.ones(num, bool) if has_eos_b is None else np.asarray(has_eos_b, bool)
    with_ids = ids_a is not None and ids_b is not None
    if with_ids:
      # The ids, not their decoded text: a decode renders a non-byte id as U+FFFD, a symbol
      # the task's keys never match, but several ids could share one rendering.
      sym_a = [tuple(int(t) for t in x) for x in ids_a]
      sym_b = [tuple(int(t) for t in x) for x in ids_b]
      gold_a = np.array([self.gold_reward_ids(p, r, e) for p, r, e in zip(prompts, sym_a, eos_a)])
      gold_b = np.array([self.gold_reward_ids(p, r, e) for p, r, e in zip(prompts, sym_b, eos_b)])
    else:
      sym_a, sym_b = list(responses_a), list(responses_b)
      gold_a = np.array([self.gold_reward(p, r, e) for p, r, e in zip(prompts, sym_a, eos_a)])
      gold_b = np.array([self.gold_reward(p, r, e) for p, r, e in zip(prompts, sym_b, eos_b)])
    length_gap = np.array([len(a) - len(b) for a, b in zip(sym_a, sym_b)], float)
    logits = (gold_a - gold_b + cfg.length_bias * length_gap) / cfg.label_temperature
    a_wins = np.random.default_rng(seed).random(num) < 1.0 / (1.0 + np.exp(-logits))
    keep = np.array([(a, ea) != (b, eb) for a, b, ea, eb in
                     zip(sym_a, sym_b, eos_a, eos_b)], bool).reshape(num)
    out = collections.defaultdict(list)
    texts, golds, syms = (responses_a, responses_b), (gold_a, gold_b), (sym_a, sym_b)
    for i in np.flatnonzero(keep):
      won, lost = (0, 1) if a_wins[i] else (1, 0)
      out["prompt"].append(prompts[i])
      out["chosen"].append(texts[won][i])
      out["rejected"].append(texts[lost][i])
      out["gold_chosen"].append(golds[won][i])
      out["gold_rejected"].append(golds[lost][i])
      if with_ids:
        out["chosen_ids"].append(list(syms[won][i]))
        out["rejected_ids"].append(list(syms[lost][i]))
    columns = dict(prompt=out["prompt"], chosen=out["chosen"], rejected=out["rejected"],
                   gold_chosen=np.array(out["gold_chosen"], float),
                   gold_rejected=np.array(out["gold_rejected"], float))
    if with_ids:
      columns.update(chosen_ids=out["chosen_ids"], rejected_ids=out["rejected_ids"])
    return columns

  def demo_pairs(self, n: int, seed, prompts: Optional[Sequence[str]] = None) -> dict:
    """n labeled pairs of two independent SFT-demonstrator samples per prompt.

    Stands in for pairs sampled from a trained SFT policy, so that preference data exists
    without a model. Prompts with identical samples are skipped, so more than n are drawn.

    Args:
      n: number of pairs wanted (fewer when `prompts` is given and runs out).
      seed: an int or a sequence of ints.
      prompts: prompts to use, in order; default: fresh `sample_prompts`.

    Returns:
      `label_pairs`' columns.
    """
    root = np.random.SeedSequence(seed)
    columns = collections.defaultdict(list)
    chunk = 0
    while len(columns["prompt"]) < n:
      streams = root.spawn(1)[0].spawn(4)  # Each spawn from root gives a fresh child.
      if prompts is None:
        batch = self.sample_prompts(max(64, n), streams[0])
      else:
        batch = list(prompts[chunk:chunk + max(64, n)])
        if not batch:
          break
      chunk += len(batch)
      labeled = self.label_pairs(batch, self.sft_demos(batch, streams[1]),
                                 self.sft_demos(batch, streams[2]), streams[3])
      for key, values in labeled.items():
        columns[key].extend(values)
    out = {key: values[:n] for key, values in columns.items()}
    out["gold_chosen"] = np.array(out["gold_chosen"], float)
    out["gold_rejected"] = np.array(out["gold_rejected"], float)
    return out

  # --- Files. --------------------------------------------------------------------------------

  def write_files(self, out_dir: str) -> dict[str, str]:
    """Writes the task as generic JSON lines under `out_dir`; deterministic in `cfg.seed`.

    Files: `sft.jsonl` (prompt, response), `pairs.jsonl` (prompt, chosen, rejected, gold_chosen,
    gold_rejected), `eval.jsonl` (prompt, reference) and `eval_pairs.jsonl` (demonstrator pairs
    on the eval prompts, with their reference). Training prompts never equal an eval prompt.

    Returns:
      {'sft': path, 'pairs': path, 'eval': path, 'eval_pairs': path}.
    """
    cfg = self.cfg
    eval_prompts = self.sample_prompts(cfg.num_eval, [cfg.seed, _EVAL, 0])
    references = self.references(eval_prompts, [cfg.seed, _EVAL, 1])
    held_out = set(eval_prompts)
    sft_prompts = [p for p in self.sample_prompts(cfg.num_sft, [cfg.seed, _SFT, 0])
                   if p not in held_out]
    sft = self.sft_demos(sft_prompts, [cfg.seed, _SFT, 1])
    pair_prompts = [p for p in self.sample_prompts(2 * cfg.num_pairs + 64, [cfg.seed, _PAIRS, 0])
                    if p not in held_out]
    pairs = self.demo_pairs(cfg.num_pairs, [cfg.seed, _PAIRS, 1], prompts=pair_prompts)
    eval_pairs = self.demo_pairs(cfg.num_eval, [cfg.seed, _EVAL, 2], prompts=eval_prompts)
    reference_of = dict(zip(eval_prompts, references))
    eval_pairs["reference"] = [reference_of[p] for p in eval_pairs["prompt"]]
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl")
             for name in ("sft", "pairs", "eval", "eval_pairs")}
    _write_jsonl(paths["sft"], dict(prompt=sft_prompts, response=sft))
    _write_jsonl(paths["pairs"], pairs)
    _write_jsonl(paths["eval"], dict(prompt=eval_prompts, reference=references))
    _write_jsonl(paths["eval_pairs"], eval_pairs)
    return paths

  def files(self, cache_root: str) -> dict[str, str]:
    """`write_files` into `cache_root/synthetic-<hash of the config>/`, once."""
    digest = hashlib.sha256(json.dumps(
        [FILES_VERSION, {k: v for k, v in self.cfg.to_dict().items() if k != "pairs_dir"}],
        sort_keys=True).encode()).hexdigest()[:16]
    out_dir = os.path.join(cache_root, f"synthetic-{digest}")
    names = ("sft", "pairs", "eval", "eval_pairs")
    if not os.path.exists(os.path.join(out_dir, "DONE")):
      os.makedirs(cache_root, exist_ok=True)
      # Generate aside and rename, so a concurrent or interrupted writer leaves no partial set.
      tmp = tempfile.mkdtemp(dir=cache_root, prefix=".synthetic-")
      self.write_files(tmp)
      open(os.path.join(tmp, "DONE"), "w").close()
      try:
        os.rename(tmp, out_dir)
      except OSError:  # Another process got there first; its files are identical.
        shutil.rmtree(tmp, ignore_errors=True)
    return {name: os.path.join(out_dir, f"{name}.jsonl") for name in names}


def _counts(tokens: np.ndarray, lengths: np.ndarray, vocab: int) -> np.ndarray:
  """[N, V] counts of each id among the first lengths[n] tokens of each row."""
  num, length = tokens.shape
  valid = np.arange(length) < np.asarray(lengths)[:, None]
  flat = (np.arange(num)[:, None] * vocab + tokens)[valid]
  return np.bincount(flat, minlength=num * vocab).reshape(num, vocab)


def split_at_eos(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """For sampled responses [N, L]: (symbols before the first EOS [N], whether EOS occurs [N])."""
  is_eos = np.asarray(tokens) == eos_id
  has_eos = is_eos.any(1)
  return np.where(has_eos, is_eos.argmax(1), tokens.shape[1]), has_eos


def _write_jsonl(path: str, columns: dict) -> None:
  names = list(columns)
  with open(path, "w", encoding="utf-8") as f:
    for values in zip(*(columns[n] for n in names)):
      row = {n: (float(v) if isinstance(v, (np.floating, float)) else v)
             for n, v in zip(names, values)}
      f.write(json.dumps(row) + "\n")


def gold_reward_fn(cfg: Optional[ml_collections.ConfigDict] = None
                   ) -> Callable[..., float]:
  """The gold reward for judges: `fn(prompt_text, response_text, has_eos=True) -> float`.

  Args:
    cfg: the synthetic config (`config.data.synthetic`) or the data config holding it.
  """
  return SyntheticTask(cfg).gold_reward
