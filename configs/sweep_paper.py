"""The paper's grid: DPO/IPO/SLiC × Pythia 1B/2.8B/6.9B × 7 β on TL;DR, SFT reference per size.

  python -m daa_jax.main --config configs/sweep_paper.py --workdir gs://bucket/sweep \
      --config.daa.data.source=/data/tldr/comparisons --config.sft.data.source=/data/tldr/comparisons

runs it locally, one run after another (finished runs are skipped, interrupted ones resume);

  python -m daa_jax.main --config configs/sweep_paper.py:mode=commands --workdir runs/sweep

writes `runs/sweep/commands.sh` with one launch line per run, for a cluster. Each run is then
evaluated (`configs/eval.py`, the LLM judge: set $OPENAI_API_KEY) and `python -m
daa_jax.study.fits runs/sweep` fits and plots. README, "Reproducing the paper": four of the seven β are known (0.01,
0.0175, 0.025, 0.0375); the other three here (0.05, 0.075, 0.1) are a guess, documented as such.
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, mode="local", sizes="1b,2.8b,6.9b", judge="llm")
  c = config_dict.ConfigDict()
  c.job = "sweep"
  c.mode = a.mode
  c.sizes = tuple(a.sizes.split(","))
  c.objectives = ("dpo", "ipo", "slic")
  c.betas = (0.01, 0.0175, 0.025, 0.0375, 0.05, 0.075, 0.1)
  c.sft_source = "train"
  c.hf_model_template = "EleutherAI/pythia-{size}"  # SFT starts from the base model
  c.pairs = "data"  # the dataset's human comparisons
  c.policy_pairs = config_dict.ConfigDict(dict(num_pairs=0, num_eval_pairs=0, seed=0,
                                               batch_size=64))
  c.fit_r0 = "sft"
  # Data-order seeds of every DAA run: several give seed-level intervals in summary.csv.
  c.seeds = (0,)

  tldr = dict(source="", format="tldr", tokenizer="EleutherAI/pythia-1b", max_length=512,
              max_prompt_length=256)
  sft = config_lib.load_sibling(__file__, "sft", "size=1b")
  sft.data.update(tldr)
  c.sft = sft
  daa = config_lib.load_sibling(__file__, "daa", "size=1b")  # the paper's recipe
  daa.data.update(tldr)
  c.daa = daa

  ev = config_lib.load_sibling(__file__, "eval")
  ev.eval.update(num_prompts=256, samples_per_prompt=1)  # the paper: 256 held-out prompts
  c.eval = ev.eval
  c.judge = ev.judge
  c.judge.name = a.judge
  return c.lock()
