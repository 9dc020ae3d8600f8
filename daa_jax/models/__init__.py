"""Decoder models: `model.CausalLM(config)` for every family, `config.ModelConfig` and the size
tables, the family registry (`registry.MODULES`: one line per family), shared layers and
attention kernels, sharding rules (logical axes → mesh axes) and HF ↔ daa_jax conversion.

Imports `daa_jax.errors` and itself only; nothing here touches data, training or evaluation.
"""
