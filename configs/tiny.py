"""A tiny, fast config for tests: a 2-layer model on a small synthetic dataset.

  python -m daa_jax.main --config configs/tiny.py:job=daa --workdir /tmp/tiny
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib
from daa_jax.train import guard_config
from daa_jax.data import pipeline as data_pipeline


def get_config(arg=None):
  a = config_lib.parse_arg(arg, job="daa", objective="dpo", beta=0.1, size="tiny")
  c = config_dict.ConfigDict()
  c.job = a.job
  c.seed = 0
  c.model = config_lib.model_fields(a.size)
  c.hf_model = config_dict.placeholder(str)
  c.init_from = config_dict.placeholder(str)
  c.data = data_pipeline.default_config()
  c.data.synthetic.num_sft = 256
  c.data.synthetic.num_pairs = 128
  c.data.synthetic.num_eval = 64
  c.objective = config_lib.objective_fields(a.objective, a.beta)
  c.train = config_lib.train_fields()
  c.train.batch_size = 16
  c.train.max_steps = 6
  c.train.log_every = 1
  c.train.progress = False
  c.optim = config_lib.optim_fields("adamw")
  c.optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
  c.checkpoint = config_lib.checkpoint_fields()
  c.log = config_lib.log_fields()  # --config.log.wandb=PROJECT: also to Weights & Biases
  c.guard = guard_config.guard_fields(enabled=False)  # --config.guard.enabled=True
  c.guard.eval.update(num_prompts=16, num_pairs=16, batch_size=16)
  c.checkpoint.epoch_fractions = ()
  c.checkpoint.async_save = False
  c.mesh = (-1, 1, 1)
  return c.lock()
