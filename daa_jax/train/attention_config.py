"""Checks of `config.train.packing` / `packing_block` against `config.model.attention_impl`
(one call in `config.validate`, so config.py stays short)."""

from __future__ import annotations

from daa_jax.errors import ConfigError

PACKING = (True, False, "fixed")


def validate_packing(config, prefix: str = "config.") -> None:
  """Raises ConfigError for a packing value outside True/False/'fixed', a bad block size, or
  'splash' attention with today's variable-offset packing."""
  t, job = config.train, config.get("job")
  packing = t.get("packing", True)
  if not any(packing is p or packing == p for p in PACKING) or isinstance(packing, int) and (
      not isinstance(packing, bool)):
    raise ConfigError(
        f"{prefix}train.packing={packing!r}; use True (one [prompt|chosen|rejected] row per "
        "pair, each part where the last one ends), 'fixed' (the same row with the prompt "
        f"padded to P and each response to R slots, multiples of {prefix}train.packing_block: "
        "one static attention mask, for attention_impl='splash') or False (two rows per pair).")
  block = t.get("packing_block", 128)
  if not isinstance(block, int) or isinstance(block, bool) or block < 1:
    raise ConfigError(f"{prefix}train.packing_block={block!r} must be a positive int (slots; "
                      "128, the TPU kernels' block size, unless a test wants small rows).")
  impl = config.get("model", {}).get("attention_impl")
  if impl == "splash" and job == "daa" and packing is True:
    raise ConfigError(
        f"{prefix}model.attention_impl='splash' with {prefix}train.packing=True: splash "
        "attention takes one static mask for every row, and packing=True puts the "
        "prompt/chosen/rejected boundaries at a different slot in each row. Set "
        f"{prefix}train.packing='fixed' (the same prompt-shared rows at fixed offsets, same "
        "log-probs) or False (two rows per pair).")
