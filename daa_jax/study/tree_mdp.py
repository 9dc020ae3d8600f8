"""The paper's Tree-MDP toy: where a DAA puts the probability that one preference leaves free.

A deterministic tree MDP (Rafailov et al. 2024, §"mechanism"; the paper's finding 6): one start
state, `branching` actions per state, each action leads to its own child state; after `depth`
actions a leaf moves to an absorbing state with probability 1 (so it adds nothing to a
trajectory's log-prob). A trajectory is therefore a root-to-leaf path, i.e. a sequence of
`depth` actions, and there are branching**depth of them.

The policy is tabular by default: one logit per (internal state, action), softmax over
actions (a reconstruction: the paper does not publish them). `policy='linear'` instead shares parameters across
states, logits(s) = ref_logits(s) + φ(s)·W with fixed random features φ(s) ∈ R^F, the way a
language model's states share weights. The reference π_ref is uniform by default (or random /
concentrated on the data paths); the policy starts at π_ref. The data is a single preference
y_w ≻ y_l between two distinct paths. A DAA (`daa_jax.train.objectives`) trains the policy with
trajectory log-probs = the sum of action log-probs along the path. Every other path is out of
distribution (OOD): the loss never sees it, so only the parameterization decides its mass.

What it shows (measured; see tests/test_tree_mdp.py). Tabular: every objective lowers p(y_l)
(to ~0 at β ≤ 0.1) and moves the mass to y_w — p(y_w) rises and p(OOD) falls — because at the
state where the paths split the gradient of log π(y_w) − log π(y_l) moves logit from y_l's
action to y_w's while the OOD actions keep theirs and lose share, and below the split only
y_w's and y_l's own states change. Smaller β only travels further (larger KL).
The paper's picture (p(OOD) rising, both in-distribution probabilities falling) needs shared
parameters: with `policy='linear'` the update on y_l's states spills onto every state and,
for most feature draws (9 of seeds 0–11 at F = 2, β = 0.01) p(y_w) rises briefly and then
falls with p(y_l) while p(OOD) goes to ~1 — "likelihood displacement" through shared weights.
Larger β displaces fewer draws (β = 0.5: DPO 6, SLiC 3, IPO 2 of 12), as the paper finds.

Everything is one jitted program per objective: `lax.scan` over optimizer steps, `vmap` over
β, computing p(y_w), p(y_l), p(OOD) and KL(πθ‖π_ref) after every step (kept every
`log_every`).

Run: python -m daa_jax.main --config configs/tree_mdp.py --workdir /tmp/tree
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from daa_jax.train import objectives
from daa_jax.errors import ConfigError

REFERENCES = ("uniform", "random", "data")
POLICIES = ("tabular", "linear")
OPTIMIZERS = ("adam", "sgd")


@dataclasses.dataclass(frozen=True)
class Tree:
  """Index tables of a complete tree with `branching` actions per state and `depth` levels.

  States are numbered breadth-first (root 0). Leaf/trajectory t takes the actions given by
  the base-`branching` digits of t, most significant first.

  Attributes:
    depth: actions per trajectory (D).
    branching: actions per state (K).
    states: [T, D] int32, the state where each trajectory takes its d-th action.
    actions: [T, D] int32, the action taken there.
  """
  depth: int
  branching: int
  states: np.ndarray
  actions: np.ndarray

  @property
  def num_states(self) -> int:
    """Internal (decision) states: 1 + K + ... + K^(D−1)."""
    return sum(self.branching**d for d in range(self.depth))

  @property
  def num_trajectories(self) -> int:
    return self.branching**self.depth


def make_tree(depth: int, branching: int) -> Tree:
  """Builds the `Tree` index tables (numpy; nothing touches devices)."""
  if depth < 1 or branching < 2:
    raise ConfigError(f"config.depth={depth}, config.branching={branching}: need depth ≥ 1 "
                      "and branching ≥ 2 so two distinct trajectories exist.")
  num = branching**depth
  leaves = np.arange(num)
  # Digit d (most significant first) of the leaf index is the action at depth d.
  actions = np.stack([(leaves // branching**(depth - 1 - d)) % branching
                      for d in range(depth)], axis=1)  # [T,D]
  states = np.zeros_like(actions)  # [T,D]
  for d in range(1, depth):
    offset = sum(branching**i for i in range(d))  # first state at depth d
    prefix = leaves // branching**(depth - d)  # index of the depth-d ancestor among K^d
    states[:, d] = offset + prefix
  return Tree(depth, branching, states.astype(np.int32), actions.astype(np.int32))


def trajectory_logps(logits: jax.Array, tree: Tree) -> jax.Array:
  """log π(trajectory) for every leaf path.

  Args:
    logits: [S, K] tabular policy logits.
    tree: the index tables.

  Returns:
    [T] float32 log-probs; exp sums to 1.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [S,K]
  return logp[tree.states, tree.actions].sum(axis=-1)  # [T,D] -> [T]


def reference_logits(config, tree: Tree) -> np.ndarray:
  """The reference (= initial policy) logits [S, K] named by `config.reference`.

  'uniform': all zeros, every trajectory has probability K^−D.
  'random': N(0, reference_scale²) logits from `config.seed`.
  'data': an "SFT"-like reference: +reference_scale on the actions of y_w and y_l at every
    state of their paths, so the in-distribution trajectories start with most of the mass.
  """
  shape = (tree.num_states, tree.branching)
  if config.reference == "uniform":
    return np.zeros(shape, np.float32)
  if config.reference == "random":
    return config.reference_scale * np.random.default_rng(config.seed).standard_normal(
        shape).astype(np.float32)
  if config.reference == "data":
    logits = np.zeros(shape, np.float32)
    for leaf in _pair(config, tree):
      logits[tree.states[leaf], tree.actions[leaf]] = config.reference_scale
    return logits
  raise ConfigError(f"config.reference={config.reference!r}; use one of {REFERENCES}.")


def _pair(config, tree: Tree) -> tuple[int, int]:
  """(chosen, rejected) leaf indices; negative indices count from the last leaf."""
  num = tree.num_trajectories
  chosen, rejected = config.chosen % num, config.rejected % num
  for field, value in (("chosen", config.chosen), ("rejected", config.rejected)):
    if not -num <= value < num:
      raise ConfigError(f"config.{field}={value} is not a leaf index of a tree with {num} "
                        "leaves; use 0..branching**depth−1 (or negative from the end).")
  if chosen == rejected:
    raise ConfigError(f"config.chosen and config.rejected name the same leaf ({chosen}); a "
                      "preference pair needs two distinct trajectories.")
  return chosen, rejected


def _optimizer(config) -> optax.GradientTransformation:
  if config.optimizer == "adam":
    return optax.adam(config.lr)
  if config.optimizer == "sgd":
    return optax.sgd(config.lr)
  raise ConfigError(f"config.optimizer={config.optimizer!r}; use one of {OPTIMIZERS}.")


def _policy(config, tree: Tree, ref_logits: jax.Array):
  """(init_params, params -> logits [S, K]) for `config.policy`; both start at π_ref."""
  if config.policy == "tabular":
    return ref_logits, lambda logits: logits
  if config.policy == "linear":
    # A stream apart from the 'random' reference's, so the two draws are independent.
    rng = np.random.default_rng([config.seed, 1])
    features = jnp.asarray(rng.standard_normal(
        (tree.num_states, config.num_features)).astype(np.float32))  # [S,F]
    w = jnp.zeros((config.num_features, tree.branching), jnp.float32)  # [F,K]
    return w, lambda w: ref_logits + features @ w
  raise ConfigError(f"config.policy={config.policy!r}; use one of {POLICIES}.")


def train_curves(config, name: str, tree: Tree | None = None) -> dict[str, np.ndarray]:
  """Trains objective `name` at every β of `config.betas` and returns the curves.

  Args:
    config: the tree_mdp ConfigDict (depth, branching, betas, steps, lr, optimizer, ...).
    name: an objective of `daa_jax.train.objectives.OBJECTIVES`.
    tree: optional prebuilt `Tree`.

  Returns:
    `step`: [R] the recorded optimizer steps (0 = before training, then every
    `config.log_every`, and the last step); and [num_betas, R] float arrays `p_chosen`,
    `p_rejected`, `p_ood` (summed over all other leaves), `kl` (KL(πθ‖π_ref) over
    trajectories, nats) and `loss`.
  """
  tree = tree or make_tree(config.depth, config.branching)
  chosen, rejected = _pair(config, tree)
  ref_logits = jnp.asarray(reference_logits(config, tree))  # [S,K]
  ref_traj = trajectory_logps(ref_logits, tree)  # [T]
  init_params, to_logits = _policy(config, tree, ref_logits)
  pair = jnp.array([chosen, rejected])
  ood = jnp.ones(tree.num_trajectories, bool).at[pair].set(False)  # [T]
  lengths = jnp.full((1, 2), tree.depth, jnp.int32)  # every path has D actions
  tx = _optimizer(config)

  def loss_fn(params, beta):
    logps = trajectory_logps(to_logits(params), tree)  # [T]
    loss, _ = objectives.compute_loss(
        name, logps[pair][None], ref_traj[pair][None], lengths, beta=beta,
        alpha=config.alpha, epsilon=config.epsilon, sft_weight=config.sft_weight,
        normalize=config.normalize)
    return loss

  def record(params, beta):
    logps = trajectory_logps(to_logits(params), tree)  # [T]
    probs = jnp.exp(logps)
    return dict(p_chosen=probs[chosen], p_rejected=probs[rejected],
                # Summed directly rather than 1 − p_w − p_l, which cancels when both → 0.
                p_ood=jnp.where(ood, probs, 0.0).sum(),
                kl=(probs * (logps - ref_traj)).sum(),
                loss=loss_fn(params, beta))

  def train_one(beta):
    def step(carry, _):
      params, opt_state = carry
      grads = jax.grad(loss_fn)(params, beta)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), record(params, beta)

    init = (init_params, tx.init(init_params))
    _, curves = jax.lax.scan(step, init, None, length=config.steps)
    first = record(init_params, beta)
    return jax.tree.map(lambda a, c: jnp.concatenate([a[None], c]), first, curves)

  betas = jnp.asarray(np.asarray(config.betas, np.float32))  # [num_betas]
  curves = jax.device_get(jax.jit(jax.vmap(train_one))(betas))  # each [num_betas, steps+1]
  # Every step is computed (it costs nothing here); only every log_every-th is kept.
  kept = np.unique(np.r_[np.arange(0, config.steps + 1, max(1, config.log_every)),
                         config.steps])
  out = {k: np.asarray(v, np.float64)[:, kept] for k, v in curves.items()}
  out["step"] = kept
  return out


def plot(results: dict[str, Any], path_stem: str) -> None:
  """Rows = objectives, columns = β; lines p(y_w), p(y_l), p(OOD). Writes .png and .pdf."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # headless: runs on TPU VMs and CI without a display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names, betas = results["objectives"], results["betas"]
  fig, axes = plt.subplots(len(names), len(betas), figsize=(3.2 * len(betas), 2.4 * len(names)),
                           sharex=True, sharey=True, squeeze=False)
  steps = results["step"]
  for i, name in enumerate(names):
    for j, beta in enumerate(betas):
      ax = axes[i, j]
      c = results["curves"][name][str(beta)]
      ax.plot(steps, c["p_chosen"], label=r"$p(y_w)$", color="tab:green")
      ax.plot(steps, c["p_rejected"], label=r"$p(y_l)$", color="tab:red")
      ax.plot(steps, c["p_ood"], label="p(OOD)", color="tab:blue")
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
      if i == 0:
        ax.set_title(rf"$\beta$ = {beta}")
      if j == 0:
        ax.set_ylabel(f"{name.upper()}\nprobability")
      if i == len(names) - 1:
        ax.set_xlabel("step")
  axes[0, 0].legend(loc="best", fontsize=8)
  fig.suptitle(f"Tree MDP (depth {results['depth']}, {results['branching']} actions, "
               f"{results['policy']} policy, {results['reference']} reference, "
               f"{results['optimizer']} lr {results['lr']})")
  fig.tight_layout()
  fig.savefig(path_stem + ".png", dpi=150)
  fig.savefig(path_stem + ".pdf")
  plt.close(fig)


def run(config, workdir: str) -> dict[str, Any]:
  """Trains every objective × β, writes `tree_mdp.json` and `tree_mdp.{png,pdf}` to workdir.

  Args:
    config: ConfigDict from `configs/tree_mdp.py`.
    workdir: output directory (created).

  Returns:
    The JSON-able results: the settings, `step` (the recorded steps),
    `curves[name][str(beta)][key]` lists aligned with `step` (keys of `train_curves`), and
    `summary[name][str(beta)][key]` with the initial, final, min and max of each curve.
  """
  for name in config.objectives:
    objectives.get_objective(name)  # fail on a typo before any training
  tree = make_tree(config.depth, config.branching)
  chosen, rejected = _pair(config, tree)
  betas = [float(b) for b in config.betas]
  results: dict[str, Any] = dict(
      depth=config.depth, branching=config.branching, reference=config.reference,
      policy=config.policy, optimizer=config.optimizer, lr=config.lr, steps=config.steps,
      seed=config.seed,
      objectives=list(config.objectives), betas=betas,
      chosen_actions=tree.actions[chosen].tolist(),
      rejected_actions=tree.actions[rejected].tolist(),
      step=None, curves={}, summary={})
  for name in config.objectives:
    curves = train_curves(config, name, tree)
    results["step"] = curves.pop("step").tolist()
    results["curves"][name] = {
        str(b): {k: v[i].tolist() for k, v in curves.items()} for i, b in enumerate(betas)}
    results["summary"][name] = {
        str(b): {k: dict(initial=float(v[i, 0]), final=float(v[i, -1]),
                         max=float(v[i].max()), min=float(v[i].min()))
                 for k, v in curves.items()}
        for i, b in enumerate(betas)}
    for b in betas:
      logging.info("tree_mdp %s β=%g: %s", name, b, ", ".join(
          f"{k} {v['initial']:.3f}→{v['final']:.3f}"
          for k, v in results["summary"][name][str(b)].items()))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "tree_mdp.json"), "w") as f:
    json.dump(results, f)
  plot(results, os.path.join(workdir, "tree_mdp"))
  results["message"] = (f"tree_mdp: {len(config.objectives)} objectives x {len(betas)} betas, "
                        f"{config.steps} steps each.\n"
                        f"  curves:  {os.path.join(workdir, 'tree_mdp.json')}\n"
                        f"  figure:  {os.path.join(workdir, 'tree_mdp.png')} (and .pdf)")
  return results
