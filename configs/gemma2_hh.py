"""The paper's appendix: Gemma-2 2B on Anthropic HH, SFT on the chosen dialogues, then DAA.

  # 1. SFT from the base model on the preferred responses (the reference policy).
  python -m daa_jax.main --config configs/gemma2_hh.py:stage=sft \
      --config.data.source=hh-rlhf/ --workdir runs/gemma2_sft
  # 2. DPO (or ipo/slic) from the SFT run, the paper's DAA recipe.
  python -m daa_jax.main --config configs/gemma2_hh.py:stage=daa,objective=dpo,beta=0.05 \
      --config.init_from=runs/gemma2_sft --config.data.source=hh-rlhf/ \
      --workdir runs/gemma2_dpo_0.05
  # 3. Evaluation (dialogue LLM judge): configs/eval.py:run=runs/gemma2_dpo_0.05
  #    --config.judge.task=dialogue

`hh-rlhf/` holds Anthropic's train/test .jsonl(.gz) files. HH text goes to the base model as
is ("\\n\\nHuman: ... \\n\\nAssistant:"); `chat=True` renders it with Gemma-2-it's chat
template instead (`--config.data.tokenizer` must then be a tokenizer with one, e.g.
google/gemma-2-2b-it). Offline, shrunk to a tiny random Gemma-2 on the synthetic task:

  python -m daa_jax.main --config configs/gemma2_hh.py:stage=sft,runlocal=True --workdir /tmp/g_sft
"""

from daa_jax.train import config as config_lib
from daa_jax.errors import ConfigError
from daa_jax.models import config as model_configs


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage="sft", objective="dpo", beta=0.1, chat=False,
                           runlocal=False)
  if a.stage not in ("sft", "daa"):
    raise ConfigError(f"configs/gemma2_hh.py: stage={a.stage!r}; use sft or daa.")
  size = "tiny-gemma2" if a.runlocal else "gemma-2-2b"
  if a.stage == "sft":
    c = config_lib.load_sibling(__file__, "sft", f"size={size},runlocal={a.runlocal}")
    c.optim.lr = 1e-3 if a.runlocal else 5e-6  # the paper's SFT settings are not published (README)
    c.train.batch_size = 32 if a.runlocal else 64
  else:
    c = config_lib.load_sibling(
        __file__, "daa", f"size={size},objective={a.objective},beta={a.beta},"
        f"runlocal={a.runlocal}")
  if not a.runlocal:
    if a.stage == "sft":
      c.hf_model = model_configs.hub_id(size)  # google/gemma-2-2b; DAA: --config.init_from
    c.data.update(format="hh", tokenizer=model_configs.hub_id(size), max_length=512,
                  max_prompt_length=256, truncation_side="keep_end",
                  chat_template="tokenizer" if a.chat else "")
    if a.chat:
      c.data.tokenizer = "google/gemma-2-2b-it"
    # 2.6B params on a pod slice: bf16 compute, FSDP, scanned and rematerialized layers.
    c.model.update(dtype="bfloat16", scan_layers=True, remat_policy="dots_with_no_batch_dims")
    c.mesh = (1, -1, 1)
  return c.lock()
