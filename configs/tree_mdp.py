r"""The paper's Tree-MDP toy: DPO / IPO / SLiC on one preference pair, β ∈ {0.01, 0.1, 0.5}.

  python -m daa_jax.main --config configs/tree_mdp.py --workdir /tmp/tree

Writes `tree_mdp.json`, `tree_mdp.png` and `tree_mdp.pdf` to the workdir in a few seconds on
a CPU. The default policy shares parameters across states (`linear`: logits = reference +
φ(s)·W with 2 random features per state, seed 1), as a language model does, and shows the
paper's picture at small β: p(OOD) rises to ~1 while p(y_w) and p(y_l) both fall.

A tabular softmax policy (one free logit per state and action) does NOT show it — every
objective then moves the mass to y_w and p(OOD) falls — which is worth knowing: the
over-optimization mechanism needs generalization across states:

  python -m daa_jax.main --config configs/tree_mdp.py:policy=tabular --workdir /tmp/tree_tab

`arg` sets depth, branching, policy, reference, optimizer, lr, steps, seed; anything else
with `--config.betas='(0.01,0.1)'`, `--config.chosen=0 --config.rejected=1`, etc.
"""

from ml_collections import config_dict

from daa_jax.train import config as config_lib


def get_config(arg=None):
  """Returns the locked Tree-MDP ConfigDict."""
  a = config_lib.parse_arg(arg, depth=3, branching=3, policy="linear", reference="uniform",
                           optimizer="adam", lr=0.05, steps=1000, seed=1)
  c = config_dict.ConfigDict()
  c.job = "tree_mdp"
  c.seed = a.seed  # the 'random' reference and the 'linear' policy's features

  # The MDP. README, "Reproducing the paper": depth, reference and optimizer are not published; a depth-3, 3-action
  # tree with a uniform reference and a tabular softmax policy is the reconstruction.
  c.depth = a.depth
  c.branching = a.branching
  c.reference = a.reference  # uniform | random | data (SFT-like: mass on y_w and y_l)
  c.reference_scale = 2.0  # logit scale of the 'random' and 'data' references
  # tabular: one logit per (state, action). linear: logits = reference + φ(s)·W with
  # num_features fixed random features per state — shared parameters, like a language model.
  c.policy = a.policy  # tabular | linear
  c.num_features = 2
  # The preference pair as leaf indices (base-`branching` digits = the actions; negative
  # counts from the end). 0 vs −1 are the all-0 and all-(K−1) paths: they split at the root.
  c.chosen = 0
  c.rejected = -1

  # The objectives (names of daa_jax.train.objectives.OBJECTIVES) and their coefficients.
  c.objectives = ("dpo", "ipo", "slic")
  c.betas = (0.01, 0.1, 0.5)
  c.normalize = "sum"
  c.alpha = 0.0
  c.epsilon = 0.0
  c.sft_weight = 0.0

  # Adam: its step does not scale with β, so every β moves at the same speed and the curves
  # differ only where each loss stops pulling. (With sgd, scale lr by 1/β.)
  c.optimizer = a.optimizer  # adam | sgd
  c.lr = a.lr
  c.steps = a.steps
  c.log_every = 10  # recorded points per curve: steps / log_every + 1

  c.lock()
  return c
