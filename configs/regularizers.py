"""Objectives that resist over-optimization, compared on the paper's KL axis.

  python -m daa_jax.main --config configs/regularizers.py:quick --workdir /tmp/reg_quick
  python -m daa_jax.main --config configs/regularizers.py --workdir /tmp/reg

The quickstart's study (synthetic task, tiny2, SFT -> policy-sample pairs, the same SFT
policy for every run) with every objective over its own grid of strengths: DPO, IPO and SLiC
(β), χPO (β), SimPO (β, γ = 0.5, no reference pass), DPO-Positive (β, λ = 50) and TR-DPO
(DPO with the reference softly updated every epoch, α = 0.6). Every schedule checkpoint is
evaluated (the guard measures them while training), the law is fitted per objective, and
report.md's "Objectives at matched KL" table gives, per objective, the peak win rate and √KL
at the peak with intervals, α and β, the win rate at the largest KL and a paired test against
DPO at matched √KL; figures/objectives.png puts every objective on one plot. `:quick` uses
two strengths per objective, 6 epochs and 250 prompts.
"""

from daa_jax.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, quick=False)
  epochs = 6.0 if a.quick else 12.0
  c = config_lib.load_sibling(__file__, "quickstart", f"epochs={epochs}")
  c.objectives = ("dpo", "ipo", "slic", "chipo", "simpo", "dpop", "tr_dpo")
  # Strengths per objective: β spreads the runs along the KL axis (SimPO's β scales a
  # per-token margin, hence larger values).
  full = {"dpo": (0.1, 0.3, 1.0), "ipo": (0.1, 0.3, 1.0), "slic": (0.1, 0.3, 1.0),
          "chipo": (0.1, 0.3, 1.0), "simpo": (1.0, 3.0, 10.0), "dpop": (0.1, 0.3, 1.0),
          "tr_dpo": (0.1, 0.3, 1.0)}
  c.grids = {k: (v[0], v[2]) if a.quick else v for k, v in full.items()}
  spe = 31  # optimizer steps per epoch (1000 pairs, batch 32)
  # TR-DPO updates its reference, so it needs a live one (the others keep the cached one).
  c.variants = {"tr_dpo": {"name": "dpo", "reference": "live", "ref_update": "soft",
                           "ref_update_every": spe, "ref_update_alpha": 0.6}}
  c.daa.checkpoint.epoch_fractions = ((0.25, 0.5, 1.0, 2.0, 4.0, epochs) if a.quick else
                                      (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, epochs))
  if a.quick:
    c.eval.update(num_prompts=250, num_pairs=250)
  return c.lock()
