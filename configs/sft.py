"""Supervised fine-tuning on the preferred responses: the reference policy of a DAA study.

  python -m daa_jax.main --config configs/sft.py:size=1b --config.hf_model=EleutherAI/pythia-1b \
      --config.data.source=tldr_sft.jsonl --config.data.format=tldr_sft \
      --config.data.tokenizer=EleutherAI/pythia-1b --workdir runs/sft_1b

Offline on the built-in synthetic task (its demonstrations):

  python -m daa_jax.main --config configs/sft.py:size=tiny,runlocal=True --workdir /tmp/sft

`size=auto` (the default) takes the size of `init_from`'s run or `hf_model`'s architecture
(else a tiny model from scratch); the data lengths (`data.max_length`, 0) are fitted to the
data.
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib
from daa_jax.data import pipeline as data_pipeline


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="auto", precision="fp32", runlocal=False)
  c = config_dict.ConfigDict()
  c.job = "sft"
  c.seed = 0
  c.model = config_lib.model_fields(a.size)
  c.hf_model = config_dict.placeholder(str)
  c.init_from = config_dict.placeholder(str)
  c.data = data_pipeline.default_config()
  # Unused by SFT; kept so every training config has the same fields.
  c.objective = config_lib.objective_fields()
  c.train = config_lib.train_fields()
  c.train.batch_size = 64
  c.train.grad_accum = 1
  c.optim = config_lib.optim_fields("adamw")
  c.optim.lr = 1e-5  # The paper's SFT hyperparameters are unknown (README); a common Pythia choice.
  c.checkpoint = config_lib.checkpoint_fields()
  c.log = config_lib.log_fields()  # --config.log.wandb=PROJECT: also to Weights & Biases
  c.checkpoint.epoch_fractions = (1.0,)
  c.mesh = (-1, 1, 1)
  config_lib.apply_precision(c, a.precision)
  if a.runlocal:
    config_lib.shrink_for_local(c)
    c.optim.lr = 1e-3
  return c.lock()
