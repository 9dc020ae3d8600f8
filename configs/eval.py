"""Evaluation of a training run's checkpoints: KL from samples, held-out metrics, win rates.

  python -m daa_jax.main --config configs/eval.py:run=RUN_DIR --workdir RUN_DIR
  daa-jax eval RUN_DIR                      # the same

Every params export of the run (its schedule checkpoints) without `eval/<step>/summary.json`
is evaluated; the run's own config.json supplies the model, data, objective and reference.
Common overrides:

  --config.eval.include_reference=True      # also the reference policy, as step 0 (KL 0)
  --config.eval.num_prompts=256 --config.eval.samples_per_prompt=4
  --config.judge.name=llm --config.judge.model=gpt-4-turbo-2024-04-09   # $OPENAI_API_KEY
  --config.judge.name=reward_model --config.judge.reward_model=/path/to/hf_rm
  --config.mesh='(1,-1,1)'                  # default: the run's mesh
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib
from daa_jax.train import guard_config


def get_config(arg=None):
  a = config_lib.parse_arg(arg, run="")
  c = config_dict.ConfigDict()
  c.job = "eval"
  c.run = a.run  # the training run's workdir; empty: --workdir
  c.mesh = config_dict.placeholder(tuple)  # None: the run's config.mesh

  c.eval = config_dict.ConfigDict()
  c.eval.num_prompts = 500        # distinct held-out prompts (±0.035 on a win rate)
  c.eval.samples_per_prompt = 1
  # New tokens per sample, the same for every sample. 0: 32 on the synthetic task, else
  # data.max_length - data.max_prompt_length (512 - 256 = 256 for TL;DR, the longest response
  # training could hold; human TL;DRs are < ~50 tokens). summary.json: truncation_rate.
  c.eval.max_new_tokens = 0
  # Human references for TL;DR win rates: TL;DR SFT files (format tldr_sft), joined to the
  # comparisons on the post id (else the prompt text). None: the data's `reference` column,
  # else each prompt's first chosen summary (mostly a model sample). summary.json: reference.
  c.eval.reference_source = config_dict.placeholder(str)
  # Exact samples from the policy (temperature 1, no truncation): what the KL estimators need.
  c.eval.temperature = 1.0        # 0: greedy
  c.eval.top_k = 0                # 0: off
  c.eval.top_p = 1.0              # 1: off
  c.eval.batch_size = 64          # sequences per sampling step (rounded to the data axes)
  c.eval.seed = 0                 # samples are a function of (seed, batch_size)
  c.eval.forward_kl = True        # also KL(π_ref‖πθ) from reference samples
  c.eval.include_reference = False  # also evaluate the reference policy itself as step 0
  c.eval.num_pairs = 2000         # held-out preference pairs (0: all)
  c.eval.steps = config_dict.placeholder(tuple)  # None: every exported step

  # Who scores a sample against its reference: name = auto (gold on the synthetic task, else
  # llm) | gold | reward_model | llm | none (KL only); the llm and reward_model settings are
  # in daa_jax/train/guard_config.py's judge_fields (shared with config.guard.judge).
  c.judge = guard_config.judge_fields()
  return c.lock()
