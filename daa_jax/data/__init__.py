"""Preference and SFT data: readers (TL;DR, HH, JSONL/Parquet, TFDS, HF datasets), tokenization,
truncation, the held-out split, the cached `PairDataset`/`SFTDataset`, the resumable `Loader`
(`pipeline.load_pairs`, `pipeline.load_sft`, `pipeline.Loader`) and the synthetic gold-reward task.

Numpy only (no jax). Imports `daa_jax.errors` and itself only.
"""
