"""Preference and SFT data: readers, tokenization, the resumable loader, the synthetic task.

The trainer's entry points:

  data_config = daa_jax.data.default_config()          # config.data
  pairs = daa_jax.data.load_pairs(data_config, 'train', workdir)
  pairs = pairs.with_column('ref_logps', ref_logps)    # optional [N, 2] per-example arrays
  loader = daa_jax.data.Loader(pairs, batch_size=32, seed=0)
  for batch in loader: ...                             # dataset.py documents the batch keys
  state = loader.state()                               # {'epoch': e, 'position': p}

Numpy only: nothing here imports jax.
"""

from daa_jax.data.dataset import PairDataset
from daa_jax.data.dataset import SFTDataset
from daa_jax.data.pipeline import default_config
from daa_jax.data.pipeline import FORMATS
from daa_jax.data.pipeline import load_pairs
from daa_jax.data.pipeline import load_sft
from daa_jax.data.pipeline import Loader
from daa_jax.data.pipeline import resolve_lengths
from daa_jax.data.pipeline import validate
from daa_jax.data.synthetic import gold_reward_fn
from daa_jax.data.synthetic import SyntheticTask
from daa_jax.data.tokenize import get_tokenizer

__all__ = ["PairDataset", "SFTDataset", "default_config", "FORMATS", "load_pairs", "load_sft",
           "Loader", "resolve_lengths", "validate", "gold_reward_fn", "SyntheticTask", "get_tokenizer"]
