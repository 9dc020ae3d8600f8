"""Checks of `config.train.packing` / `packing_block` against `config.model.attention_impl`
(one call in `config.validate`, so config.py stays short), and what `attention_impl='auto'`
resolves to (`resolve_auto`, called where the run's ModelConfig is built: `train/init.py`)."""

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


def resolve_auto(model_cfg, platform: str, job: str | None, packing) -> tuple[str, str]:
  """The kernel `attention_impl='auto'` runs on `platform`, and why (one line for the log).

  TPU: 'splash' (models/splash.py). CUDA: 'gpu_flash' (models/gpu_flash.py, jax's Triton
  flash kernel). CPU and other platforms: 'xla' (the dense path, the fastest one on CPU at
  the rows we train). Where the platform's fused kernel cannot run this config exactly,
  'auto' picks 'blockwise' (models/attention.py: exact for every mask, window and cap, memory
  lean, plain JAX) and says so rather than change the data layout behind the user's back:

    * TPU with a DAA job and `train.packing=True`: splash takes one static mask for every row,
      and variable-offset rows have none; set `train.packing='fixed'` (same log-probs) to get
      splash;
    * CUDA with sliding-window layers (Mistral, Qwen2, Gemma-2) shorter than the model's
      `max_position_embeddings`: the Triton kernel has no window (splash has: it runs them);
    * CUDA with logit soft-capping (Gemma-2): the Triton kernel has no cap.

  Args:
    model_cfg: the run's ModelConfig (soft-capping, sliding layers).
    platform: 'tpu', 'cuda' or 'gpu' (jax's name for CUDA), 'cpu', ...
    job: `config.job` ('daa', 'sft', ...).
    packing: `config.train.packing`.

  Returns:
    (kernel, reason): the `attention_impl` to run and a short reason.
  """
  platform = "cuda" if platform == "gpu" else platform
  fused = {"tpu": "splash", "cuda": "gpu_flash"}.get(platform)
  if fused is None:
    return "xla", f"auto on {platform}: the dense path"
  window = any(model_cfg.sliding_layers) and (
      model_cfg.sliding_window < model_cfg.max_position_embeddings)
  if window and fused == "gpu_flash":
    return "blockwise", (f"auto on {platform}: blockwise, not {fused}: {fused} does not "
                         f"implement sliding windows (sliding_window="
                         f"{model_cfg.sliding_window})")
  if fused == "gpu_flash" and model_cfg.attn_logit_softcapping > 0:
    return "blockwise", ("auto on cuda: blockwise, not gpu_flash: the Triton kernel has no "
                         "logit soft-capping")
  if fused == "splash" and job == "daa" and packing is True:
    return "blockwise", ("auto on tpu: blockwise, not splash: splash needs "
                         "config.train.packing='fixed' (or False); set it for the kernel")
  return fused, f"auto on {platform}: the fused kernel"
