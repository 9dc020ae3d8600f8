"""DAA training (DPO, IPO, SLiC and relatives) with the paper's recipe.

The paper (README, "Reproducing the paper"): RMSprop lr 5e-7, 150 warmup steps then
constant, batch 128 pairs as 8 micro-batches of 16, grad-norm clip 10, one epoch, checkpoints
at 21.5/43/64.5/86/100% of the epoch, starting from an SFT run
(`--config.init_from=SFT_RUN_DIR`) or HF weights (`--config.hf_model=EleutherAI/pythia-1b`).

  python -m daa_jax.main --config configs/daa.py:size=1b,objective=ipo,beta=0.05 \
      --config.init_from=runs/sft_1b --config.data.source=comparisons/ \
      --config.data.format=tldr --config.data.tokenizer=EleutherAI/pythia-1b --workdir runs/ipo

Precision (`precision=fp32|bf16|bf16_state`, config_lib.PRECISIONS): fp32 everywhere is the
default (CPU, exact); `bf16` computes in bfloat16 with a bfloat16 reference and float32
weights, gradients and RMSprop state. What fits where (python -m daa_jax.plan shows it):
Pythia-6.9B with RMSprop on one 141 GB H200 (bf16, full remat, scanned layers):

  python -m daa_jax.main --config configs/daa.py:size=6.9b,precision=bf16 \
      --config.model.remat_policy=full --config.model.scan_layers=True --config.mesh='(1,1,1)' ...

Pythia-1B on one v5e-8 host (8 x 16 GB, FSDP over the 8 chips):

  python -m daa_jax.main --config configs/daa.py:size=1b,precision=bf16 --config.mesh='(1,-1,1)' ...

Offline on the built-in synthetic task, shrunk for a laptop:

  python -m daa_jax.main --config configs/daa.py:size=tiny,objective=dpo,beta=0.1,runlocal=True \
      --workdir /tmp/dpo

`size=auto` (the default) takes the size of `init_from`'s run or `hf_model`'s architecture
(else a tiny model from scratch); the data lengths (`data.max_length`, 0) are fitted to the
data.
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib
from daa_jax.train import guard_config
from daa_jax.data import pipeline as data_pipeline


def get_config(arg=None):
  a = config_lib.parse_arg(arg, size="auto", objective="dpo", beta=0.1, precision="fp32",
                           runlocal=False)
  c = config_dict.ConfigDict()
  c.job = "daa"
  c.seed = 0
  c.model = config_lib.model_fields(a.size)
  c.hf_model = config_dict.placeholder(str)   # HF hub id or local dir: init + reference
  c.init_from = config_dict.placeholder(str)  # a daa_jax run dir (e.g. SFT), RUN_DIR@STEP
  c.data = data_pipeline.default_config()
  c.objective = config_lib.objective_fields(a.objective, a.beta)
  c.train = config_lib.train_fields()
  c.train.batch_size = 128
  c.train.grad_accum = 8
  c.optim = config_lib.optim_fields("paper")
  c.checkpoint = config_lib.checkpoint_fields()
  # The over-optimization guard (README, "The over-optimization guard"): off by default;
  # --config.guard.enabled=True --config.guard.stop=peak watches the win rate while training.
  c.guard = guard_config.guard_fields(enabled=False)
  c.log = config_lib.log_fields()  # --config.log.wandb=PROJECT: also to Weights & Biases
  c.mesh = (-1, 1, 1)
  config_lib.apply_precision(c, a.precision)
  if a.runlocal:
    config_lib.shrink_for_local(c)
  return c.lock()
