"""Prompt-shared pair packing: one row `[prompt | chosen | rejected]` per preference pair.

The standard preference batch (`tokens [B,2,L]`) runs the prompt through the model twice,
once in the chosen row and once in the rejected row. Packing lays a pair out as one row

  slot:     0 ... P-1 | P ... P+Rc-1 | P+Rc ... P+Rc+Rr-1 | pad ... Lp-1
  segment:  0 (prompt)| 1 (chosen)   | 2 (rejected)       | -1
  position: 0 ... P-1 | P ... P+Rc-1 | P ... P+Rr-1       | 0

with an attention rule richer than "same segment": a token sees earlier tokens of its own
segment and the whole prompt, so the rejected response never sees the chosen one and its
rotary positions restart where the prompt ends, exactly as in its own row. The prompt is
computed once per pair (for TL;DR-shaped data, 384 + 48 tokens, that is 480 instead of 864
tokens per pair), and the vocabulary projection runs only at the 2·R positions that predict
response tokens: the hidden state of the last prompt token predicts the first token of both
responses.

`pack_pairs` runs on the host (numpy) from the standard batch; `packed_pair_logps` computes
the `[B,2]` sequence log-probs from a packed batch, equal to `step.pair_logps` on the two-row
batch up to float32 rounding (tests/test_packing.py).

Packed batch (numpy, B rows; Lp = packed length, R = target slots per response):
  tokens          [B, Lp]    int32  prompt, chosen response, rejected response, then pad.
  segment_ids     [B, Lp]    int32  PROMPT (0), CHOSEN (1), REJECTED (2), PAD (-1).
  positions       [B, Lp]    int32  rotary positions copied from the two-row batch.
  attention_mask  [B, Lp]    int32  1 on real tokens.
  target_index    [B, 2, R]  int32  packed slot whose hidden state predicts target r.
  targets         [B, 2, R]  int32  the target token ids.
  target_mask     [B, 2, R]  int32  1 on real targets; `sum(-1)` == `loss_mask.sum(-1)`.
  every other key of the input batch (`lengths`, `prompt_lengths`, `ref_logps`, ...) unchanged.

The attention rule is the model's `shared_segment=PROMPT`: a token sees earlier tokens of its
own segment and of the prompt segment (`CausalLM.__call__`).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.models import model as model_lib
from daa_jax.train import objectives

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
# Keys of the two-row layout that packing replaces; all others pass through.
_ROW_KEYS = ("tokens", "loss_mask", "attention_mask", "positions")


# --- Host side ---------------------------------------------------------------------------


def _row_spans(attention_mask: np.ndarray, loss_mask: np.ndarray):
  """Prompt and response slots of one row of the two-row layout.

  The response starts at the first target (slot t + 1 for the first t with loss_mask[t]);
  the prompt is every real token before it. A row without targets is all prompt.

  Args:
    attention_mask: [L] nonzero on real tokens.
    loss_mask: [L] nonzero at t iff token t + 1 is a response token.

  Returns:
    (prompt_slots, response_slots), int arrays of slot indices into the row.
  """
  real = attention_mask > 0
  targets = np.flatnonzero(loss_mask > 0)
  start = targets[0] + 1 if len(targets) else len(real)
  slots = np.flatnonzero(real)
  return slots[slots < start], slots[slots >= start]


def packed_sizes(batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """Packed row length `[B]` and targets per response `[B,2]` of a two-row batch.

  Vectorized `_row_spans` (the dataset-wide `bounds` pass runs it over every pair).
  """
  real = np.asarray(batch["attention_mask"]) > 0  # [B,2,L]
  targets = np.asarray(batch["loss_mask"]) > 0
  length = real.shape[-1]
  start = np.where(targets.any(-1), targets.argmax(-1) + 1, length)  # [B,2] first response slot
  before = np.arange(length) < start[..., None]  # [B,2,L]
  prompt = (real & before).sum(-1)
  response = (real & ~before).sum(-1)
  return prompt[:, 0] + response[:, 0] + response[:, 1], targets.sum(-1)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def bounds(batches: Iterable[dict], multiple: int = 8) -> tuple[int, int]:
  """Static `(length, response_length)` that fit every pair of `batches`, rounded up.

  Pass every batch of a dataset (e.g. `dataset.batch(range(i, i + 1024))` chunks) to get
  one packed shape for a whole run: one compilation.
  """
  length, response = 1, 1
  for batch in batches:
    needed, targets = packed_sizes(batch)
    if len(needed):
      length = max(length, int(needed.max()))
      response = max(response, int(targets.max()))
  return _round_up(length, multiple), _round_up(response, multiple)


def dataset_bounds(dataset, multiple: int = 8, chunk: int = 1024) -> tuple[int, int]:
  """`bounds` over every pair of a `data.PairDataset` (one host-side pass)."""
  n = len(dataset)
  return bounds((dataset.batch(range(i, min(i + chunk, n))) for i in range(0, n, chunk)),
                multiple)


def packer(dataset, multiple: int = 8):
  """`pack_pairs` with the fixed shape that fits every pair of `dataset` (logged)."""
  length, response_length = dataset_bounds(dataset, multiple)
  logging.info("packing: rows of %d slots, %d targets per response", length, response_length)
  return functools.partial(pack_pairs, length=length, response_length=response_length,
                           pad_id=dataset.tokenizer.pad_id)


def pack_pairs(batch: dict, length: int | None = None, response_length: int | None = None,
               pad_id: int = 0, multiple: int = 8) -> dict:
  """Packs a two-row preference batch into one `[prompt | chosen | rejected]` row per pair.

  Works for any batch that follows the data contract (right- or left-padded rows, chosen
  and rejected of different lengths, empty responses): each row's real tokens before its
  first target are its prompt and must be identical, tokens and positions, in both rows.

  Args:
    batch: numpy dict with `tokens`, `loss_mask`, `attention_mask`, `positions` `[B,2,L]`
      (plus any other keys, passed through).
    length: Lp, the packed row length; default: this batch's longest pair, rounded up to
      `multiple` (fix it for a run to compile once, see `dataset_bounds`).
    response_length: R, target slots per response; default like `length`.
    pad_id: the token written into padding slots.
    multiple: rounding of the default sizes.

  Returns:
    The packed batch (module docstring).

  Raises:
    ValueError: the prompts of a pair differ, a target's predecessor is padding, or a pair
      does not fit `length` / `response_length`.
  """
  tokens = np.asarray(batch["tokens"])
  num_pairs = tokens.shape[0]
  if tokens.ndim != 3 or tokens.shape[1] != 2:
    raise ValueError(f"pack_pairs needs tokens [B,2,L]; got shape {tokens.shape}.")
  attention_mask = np.asarray(batch["attention_mask"])
  loss_mask = np.asarray(batch["loss_mask"])
  positions = np.asarray(batch["positions"])
  needed, num_targets = packed_sizes(batch)
  if length is None:
    length = _round_up(int(needed.max(initial=1)), multiple)
  if response_length is None:
    response_length = _round_up(int(num_targets.max(initial=1)), multiple)
  if num_pairs and needed.max() > length:
    raise ValueError(f"a pair needs {needed.max()} packed slots > length={length}; raise it "
                     "(packing.dataset_bounds gives the dataset's maximum).")
  if num_pairs and num_targets.max() > response_length:
    raise ValueError(f"a response has {num_targets.max()} targets > response_length="
                     f"{response_length}; raise it.")

  out_tokens = np.full((num_pairs, length), pad_id, np.int32)
  out_segments = np.full((num_pairs, length), PAD, np.int32)
  out_positions = np.zeros((num_pairs, length), np.int32)
  target_index = np.zeros((num_pairs, 2, response_length), np.int32)
  targets = np.zeros((num_pairs, 2, response_length), np.int32)
  target_mask = np.zeros((num_pairs, 2, response_length), np.int32)
  for b in range(num_pairs):
    spans = [_row_spans(attention_mask[b, s], loss_mask[b, s]) for s in (0, 1)]
    prompt = spans[0][0]
    if not (len(prompt) == len(spans[1][0])
            and np.array_equal(tokens[b, 0, prompt], tokens[b, 1, spans[1][0]])
            and np.array_equal(positions[b, 0, prompt], positions[b, 1, spans[1][0]])):
      raise ValueError(f"pair {b}: the chosen and rejected rows have different prompts "
                       "(tokens or positions); packing needs a shared prompt.")
    n_prompt = len(prompt)
    out_tokens[b, :n_prompt] = tokens[b, 0, prompt]
    out_positions[b, :n_prompt] = positions[b, 0, prompt]
    out_segments[b, :n_prompt] = PROMPT
    start = n_prompt
    for s, segment in ((0, CHOSEN), (1, REJECTED)):
      row_prompt, response = spans[s]
      end = start + len(response)
      out_tokens[b, start:end] = tokens[b, s, response]
      out_positions[b, start:end] = positions[b, s, response]
      out_segments[b, start:end] = segment
      # Row slot -> packed slot (-1: padding, never a valid predictor).
      slot_map = np.full((tokens.shape[2],), -1, np.int64)
      slot_map[row_prompt] = np.arange(n_prompt)
      slot_map[response] = np.arange(start, end)
      predictors = np.flatnonzero(loss_mask[b, s] > 0)  # t predicts token t + 1
      if len(predictors) and (slot_map[predictors].min() < 0
                              or predictors.max() + 1 >= tokens.shape[2]
                              or not attention_mask[b, s, predictors + 1].all()):
        raise ValueError(f"pair {b}, row {s}: loss_mask marks a target whose token or "
                         "predecessor is padding; the batch breaks the data contract.")
      k = len(predictors)
      target_index[b, s, :k] = slot_map[predictors]
      targets[b, s, :k] = tokens[b, s, predictors + 1]
      target_mask[b, s, :k] = 1
      start = end

  packed = {k: v for k, v in batch.items() if k not in _ROW_KEYS}
  packed.update(tokens=out_tokens, segment_ids=out_segments, positions=out_positions,
                attention_mask=(out_segments != PAD).astype(np.int32),
                target_index=target_index, targets=targets, target_mask=target_mask)
  return packed


# --- Device side -------------------------------------------------------------------------


def packed_pair_logps(model: model_lib.CausalLM, params, packed: dict,
                      logps_chunk: int = 0) -> jax.Array:
  """Summed response log-probs `[B,2]` (float32) of a packed batch (see `pack_pairs`).

  Equal to `step.pair_logps(model, params, two_row_batch)` up to float32 rounding. Only the
  `2·R` predicting positions go through the vocabulary projection.

  Args:
    model: the `CausalLM`.
    params: its params.
    packed: the packed batch as arrays.
    logps_chunk: > 0: the vocabulary projection and log-softmax over chunks of this many
      target positions (no `[2B,R,V]` logits).
  """
  variables = {"params": params}
  num_pairs, _, response_length = packed["target_index"].shape
  # train/fixed_layout.py's rows: the static (P, R) of `[prompt P | chosen R | rejected R]`.
  layout = None
  if "prompt_slots" in packed:
    layout = (packed["tokens"].shape[1] - 2 * response_length, response_length)
  # Each token sees its own segment and the prompt; padding (segment PAD) is masked out.
  hidden = model.apply(variables, packed["tokens"], attention_mask=packed["attention_mask"],
                       positions=packed["positions"], segment_ids=packed["segment_ids"],
                       shared_segment=PROMPT, layout=layout,
                       method=model_lib.CausalLM.hidden_states)  # [B,Lp,D]
  index = packed["target_index"].reshape(num_pairs, 2 * response_length)  # [B,2R]
  picked = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B,2R,D]
  picked = picked.reshape(2 * num_pairs, response_length, hidden.shape[-1])  # [2B,R,D]
  targets = packed["targets"].reshape(2 * num_pairs, response_length)
  mask = packed["target_mask"].reshape(2 * num_pairs, response_length)
  head = lambda h: model.apply(variables, h, method=model_lib.CausalLM.logits_from_hidden)
  if logps_chunk:  # fused: the head runs per chunk, no [2B,R,V] logits
    summed, _ = objectives.sequence_logps(picked, targets, mask, chunk_size=logps_chunk,
                                          project=head)
  else:
    summed, _ = objectives.sequence_logps(head(picked), targets, mask)  # [2B,R,V] logits
  return summed.reshape(num_pairs, 2)
