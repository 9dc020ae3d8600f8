"""Fixed-offset prompt-shared packing (`config.train.packing='fixed'`): every row is

  slot:     0 ... P-1            | P ... P+R-1        | P+R ... P+2R-1
  content:  pad, then the prompt | chosen, then pad   | rejected, then pad
  segment:  -1 ... -1, 0 ... 0   | 1 ... 1, -1 ... -1 | 2 ... 2, -1 ... -1

with P and R the same for every row of a run (the dataset's longest prompt and response,
rounded up to `config.train.packing_block`). The prompt is left-padded inside its P slots and
each response right-padded inside its R slots, so the attention rule (a chosen token sees the
prompt and the chosen tokens before it, a rejected token the prompt and the rejected tokens
before it, never the other response) is one static `[L,L]` mask, the same for every row: only
the prompt's left padding depends on the row, and it is excluded by segment ids. That is what
block-sparse kernels need (`models/splash.py`: whole blocks of the mask are skipped at compile
time). Rotary positions are copied from the two-row batch, so log-probs equal
`packing.pack_pairs`' rows and the two-row layout to float32 rounding
(tests/train/test_fixed_layout.py); the price is the padding of every row to P + 2R slots.

The packed batch has `packing.pack_pairs`' keys (so `packing.packed_pair_logps` and the step
take it unchanged) plus `prompt_slots [B]` (= P), whose presence marks the fixed layout; the
static sizes come from the shapes: R = `target_index.shape[-1]`, P = L - 2R.
"""

from __future__ import annotations

import functools
import math

from absl import logging
import numpy as np

from daa_jax.train import packing

BLOCK = 128  # default `config.train.packing_block`: the TPU kernels' block size


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, int(math.ceil(n / multiple)) * multiple)


def sizes(batch: dict) -> tuple[np.ndarray, np.ndarray]:
  """Prompt tokens `[B]` and slots each response needs `[B,2]` (its tokens or its targets,
  whichever is more) of a two-row batch."""
  real = np.asarray(batch["attention_mask"]) > 0  # [B,2,L]
  targets = np.asarray(batch["loss_mask"]) > 0
  length = real.shape[-1]
  start = np.where(targets.any(-1), targets.argmax(-1) + 1, length)
  before = np.arange(length) < start[..., None]
  prompt = (real & before).sum(-1)[:, 0]
  response = np.maximum((real & ~before).sum(-1), targets.sum(-1))
  return prompt, response


def bounds(batches, block: int = BLOCK) -> tuple[int, int]:
  """`(P, R)` that fit every pair of `batches`, each rounded up to a multiple of `block`."""
  prompt, response = 1, 1
  for batch in batches:
    p, r = sizes(batch)
    if len(p):
      prompt, response = max(prompt, int(p.max())), max(response, int(r.max()))
  return _round_up(prompt, block), _round_up(response, block)


def dataset_bounds(dataset, block: int = BLOCK, chunk: int = 1024) -> tuple[int, int]:
  """`bounds` over every pair of a `data.PairDataset` (one host-side pass)."""
  n = len(dataset)
  return bounds((dataset.batch(range(i, min(i + chunk, n))) for i in range(0, n, chunk)), block)


def packer(dataset, block: int = BLOCK):
  """`pack_fixed` with the (P, R) that fit every pair of `dataset` (logged)."""
  prompt_len, response_len = dataset_bounds(dataset, block)
  logging.info("packing='fixed': rows of %d prompt + 2 x %d response slots (block %d)",
               prompt_len, response_len, block)
  return functools.partial(pack_fixed, prompt_len=prompt_len, response_len=response_len,
                           pad_id=dataset.tokenizer.pad_id)


def packer_for(train_config, dataset):
  """The packer `config.train.packing` asks for: 'fixed' -> `packer`, True -> today's."""
  if train_config.get("packing") == "fixed":
    return packer(dataset, int(train_config.get("packing_block", BLOCK)))
  return packing.packer(dataset)


def pack_fixed(batch: dict, prompt_len: int | None = None, response_len: int | None = None,
               pad_id: int = 0, block: int = BLOCK) -> dict:
  """Packs a two-row preference batch into fixed-offset `[prompt P | chosen R | rejected R]` rows.

  Args:
    batch: numpy two-row batch (the data contract; see `packing.pack_pairs`).
    prompt_len: P; default this batch's longest prompt rounded up to `block` (fix it for a
      run to compile once: `dataset_bounds`).
    response_len: R; default likewise from the longest response.
    pad_id: the token written into padding slots.
    block: rounding of the default sizes.

  Returns:
    `packing.pack_pairs`' keys laid out as in the module docstring, plus `prompt_slots [B]`.

  Raises:
    ValueError: as `packing.pack_pairs`, or a prompt longer than P / a response longer than R.
  """
  prompt, response = sizes(batch)
  if prompt_len is None:
    prompt_len = _round_up(int(prompt.max(initial=1)), block)
  if response_len is None:
    response_len = _round_up(int(response.max(initial=1)), block)
  if len(prompt) and prompt.max() > prompt_len:
    raise ValueError(f"a prompt has {prompt.max()} tokens > prompt_len={prompt_len} of the "
                     "fixed layout; raise it (fixed_layout.dataset_bounds gives the dataset's).")
  if len(prompt) and response.max() > response_len:
    raise ValueError(f"a response needs {response.max()} slots > response_len={response_len} "
                     "of the fixed layout; raise it.")
  flexible = packing.pack_pairs(batch, response_length=response_len, pad_id=pad_id)
  seg = flexible["segment_ids"]  # [B,Lf]: prompt, chosen, rejected, then pad
  b, lf = seg.shape
  n_prompt = (seg == packing.PROMPT).sum(1, keepdims=True)
  n_chosen = (seg == packing.CHOSEN).sum(1, keepdims=True)
  slot = np.arange(lf)[None]
  p, r = int(prompt_len), int(response_len)
  # Flexible slot -> fixed slot (-1: padding, dropped).
  new = np.select([seg == packing.PROMPT, seg == packing.CHOSEN, seg == packing.REJECTED],
                  [p - n_prompt + slot, p + slot - n_prompt, p + r + slot - n_prompt - n_chosen],
                  -1)
  length = p + 2 * r
  rows, cols = np.nonzero(new >= 0)
  dest = new[rows, cols]
  out = {}
  for key, fill in (("tokens", pad_id), ("segment_ids", packing.PAD), ("positions", 0)):
    out[key] = np.full((b, length), fill, np.int32)
    out[key][rows, dest] = flexible[key][rows, cols]
  mask = flexible["target_mask"] > 0
  index = np.take_along_axis(new, flexible["target_index"].reshape(b, -1), axis=1)
  index = np.where(mask.reshape(b, -1), index, 0).reshape(flexible["target_index"].shape)
  packed = dict(flexible)
  packed.update(out, attention_mask=(out["segment_ids"] != packing.PAD).astype(np.int32),
                target_index=index.astype(np.int32),
                prompt_slots=np.full((b,), p, np.int32))
  return packed

