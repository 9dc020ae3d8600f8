"""Sequence lengths that fit the data: `max_length` / `max_prompt_length` = 0 ('auto').

The batch length L is the 99th percentile of prompt + longest response + EOS, rounded up to
a multiple of 8 and capped by the model's positions; the prompt limit leaves room for the
99th-percentile response (and at least half of L for the prompt). So at most ~1% of the
examples are cut, and one outlier does not set L for every batch. When more than
`TRUNCATION_WARN_FRACTION` of the examples are cut anyway (explicit lengths, or a cap),
`warn_truncation` says so once, with the lengths that would fit.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from daa_jax.errors import warn_misfit

TRUNCATION_WARN_FRACTION = 0.03
QUANTILE = 0.99


def _round_up(n: float, multiple: int = 8) -> int:
  return int(math.ceil(n / multiple) * multiple)


def fit(prompt_lengths: Sequence[int], response_lengths: Sequence[int],
        max_positions: int) -> tuple[int, int]:
  """(max_length, max_prompt_length) for examples of these token lengths.

  Args:
    prompt_lengths: [N] prompt tokens per example.
    response_lengths: [N] tokens of each example's longest response, EOS included.
    max_positions: the model's position limit (an upper bound on max_length).

  Returns:
    max_length L (a multiple of 8, at most `max_positions`) and a prompt limit in [1, L).
  """
  prompts = np.asarray(prompt_lengths, np.float64)
  responses = np.asarray(response_lengths, np.float64)
  if prompts.size == 0:  # nothing to fit: as long as the model allows, half for the prompt
    return int(max_positions), max(int(max_positions) // 2, 1)
  total = np.quantile(prompts + responses, QUANTILE)
  max_length = max(8, min(_round_up(total), int(max_positions)))
  response_room = _round_up(np.quantile(responses, QUANTILE))
  max_prompt_length = max(max_length - response_room, max_length // 2)
  return max_length, int(min(max(max_prompt_length, 1), max_length - 1))


def needed(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
  """The max_length at which `QUANTILE` of the examples fit uncut (a multiple of 8)."""
  total = np.asarray(prompt_lengths) + np.asarray(response_lengths)
  return _round_up(np.quantile(total, QUANTILE)) if total.size else 8


def warn_truncation(stats: Mapping[str, int], max_length: int, what: str,
                    suggestion: int | None = None, fitted_limit: int = 0) -> None:
  """Warns once when more than a few percent of the examples were cut or dropped.

  Args:
    stats: a dataset's load statistics ('examples', 'truncated', 'prompt_truncated',
      'response_truncated', 'dropped').
    max_length: the batch length used.
    what: names the dataset in the message, e.g. 'pairs (train)'.
    suggestion: a max_length that would fit most examples, when known.
    fitted_limit: 0 when the user set max_length; else max_length was 'auto' (fitted to the
      training data) and this is the model's position limit the fit was capped at.
  """
  kept, dropped = int(stats.get("examples", 0)), int(stats.get("dropped", 0))
  total = kept + dropped
  cut = int(stats.get("truncated", 0)) + dropped
  if total == 0 or cut / total <= TRUNCATION_WARN_FRACTION:
    return
  counts = (f"({100 * cut / total:.0f}%: {stats.get('prompt_truncated', 0)} prompts and "
            f"{stats.get('response_truncated', 0)} responses truncated, {dropped} dropped)")
  if fitted_limit:
    # 'auto' already fitted the data: telling the user to set 0 would send them in a circle.
    need = f"; 99% of them fit in {suggestion} tokens" if suggestion else ""
    capped = (f", the model's position limit (max_position_embeddings={fitted_limit})"
              if max_length >= fitted_limit else " (fitted to the training data)")
    warn_misfit(
        f"config.data.max_length=0 (auto) set max_length={max_length}{capped}; it cuts {cut} "
        f"of {total} {what} {counts}{need}. Shorten the data, set "
        "--config.data.overlong=drop to leave them out, or use a model with more positions.")
    return
  fix = (f"--config.data.max_length={suggestion}" if suggestion else
         "a larger --config.data.max_length")
  warn_misfit(
      f"config.data.max_length={max_length} cuts {cut} of {total} {what} {counts}. Set "
      f"{fix} (and max_prompt_length), or 0 for both to fit them to the data.")
