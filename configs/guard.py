"""The over-optimization guard's evidence: DPO at the quickstart's β for twice its epochs.

  python -m daa_jax.main --config configs/guard.py --workdir /tmp/guard

The quickstart's study (synthetic task, tiny2, SFT -> policy-sample pairs), DPO only, 24
epochs instead of 12, with the guard watching every run at every epoch and every schedule
checkpoint with the evaluation's settings (500 prompts), rule `peak` as a dry run: each run
records the step where the rule stops and the point it keeps, and trains on, so the points
past the stop show what stopping saved and what it lost (a real stop makes the same decisions:
tests/study/test_guard.py). `guard.md` in the workdir tabulates, per β: the stop step, the kept
point's √KL and win rate, the best win rate of all the run's points, their paired difference
and the steps saved. `--config.daa.guard.dry_run=False` stops for real.
"""

from daa_jax.train import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, epochs=24.0, sft_steps=1500)
  c = config_lib.load_sibling(__file__, "quickstart",
                              f"epochs={a.epochs},sft_steps={a.sft_steps}")
  c.objectives = ("dpo",)
  spe = 31  # optimizer steps per epoch at the quickstart's 1000 pairs, batch 32
  c.daa.checkpoint.epoch_fractions = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, a.epochs)
  c.daa.guard.update(enabled=True, stop="peak", dry_run=True, every=spe, alpha=0.05)
  return c.lock()
