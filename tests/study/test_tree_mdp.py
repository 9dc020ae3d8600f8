"""The Tree-MDP toy: tree bookkeeping, the measured dynamics, and the run's outputs."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.study import tree_mdp
from daa_jax.errors import ConfigError

_CONFIG_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "tree_mdp.py")


def get_config(arg=None, **overrides):
  spec = importlib.util.spec_from_file_location("tree_mdp_config", _CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  with config.unlocked():
    config.update(overrides)
  return config


def test_config():
  config = get_config()
  assert config.job == "tree_mdp"
  assert (config.depth, config.branching, config.reference) == (3, 3, "uniform")
  assert (config.policy, config.seed) == ("linear", 1)  # the default shows the paper's effect
  assert tuple(config.betas) == (0.01, 0.1, 0.5)
  assert tuple(config.objectives) == ("dpo", "ipo", "slic")
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked
  config = get_config("depth=4,policy=tabular,lr=0.1")
  assert (config.depth, config.policy, config.lr) == (4, "tabular", 0.1)


def test_tree_tables():
  tree = tree_mdp.make_tree(depth=2, branching=3)
  assert tree.num_states == 4 and tree.num_trajectories == 9
  # Leaf 5 = actions (1, 2): root, then state 1 + 1 = 2 (the root's child via action 1).
  np.testing.assert_array_equal(tree.actions[5], [1, 2])
  np.testing.assert_array_equal(tree.states[5], [0, 2])
  np.testing.assert_array_equal(tree.states[:, 1], 1 + np.arange(9) // 3)

  tree = tree_mdp.make_tree(depth=3, branching=4)
  logits = jax.random.normal(jax.random.key(0), (tree.num_states, 4)) * 2
  logps = tree_mdp.trajectory_logps(logits, tree)
  np.testing.assert_allclose(jnp.exp(logps).sum(), 1.0, rtol=1e-5)
  # Path (2, 1, 3): root -> state 1+2 = 3 -> state 5 + 4*2 + 1 = 14.
  probs = jax.nn.softmax(logits, -1)
  leaf = 2 * 16 + 1 * 4 + 3
  np.testing.assert_allclose(jnp.exp(logps[leaf]), probs[0, 2] * probs[3, 1] * probs[14, 3],
                             rtol=1e-5)
  with pytest.raises(ConfigError):
    tree_mdp.make_tree(depth=0, branching=3)


def test_bad_config_values():
  for overrides in (dict(rejected=0), dict(chosen=27), dict(policy="mlp"),
                    dict(optimizer="lion"), dict(reference="peaked")):
    with pytest.raises(ConfigError):
      tree_mdp.train_curves(get_config(steps=2, **overrides), "dpo")


def test_vmap_over_beta_matches_single_beta():
  swept = tree_mdp.train_curves(get_config(steps=60), "dpo")
  alone = tree_mdp.train_curves(get_config(steps=60, betas=(0.1,)), "dpo")
  for key in ("p_chosen", "p_rejected", "p_ood", "kl", "loss"):
    np.testing.assert_allclose(swept[key][1], alone[key][0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic"])
def test_tabular_policy_moves_mass_to_chosen(name):
  """Measured with the tabular policy: p(y_l) → 0, p(y_w) rises, p(OOD) falls.

  This is NOT the paper's picture: with one logit per state the update at the split state
  shifts the root's mass from y_l's subtree to y_w's, and OOD subtrees only lose share.
  Smaller β goes further from the reference (larger KL), as the paper finds.
  """
  c = tree_mdp.train_curves(get_config(policy="tabular", seed=0, steps=400), name)
  p_init = 1 / 27
  np.testing.assert_allclose(c["p_ood"][:, 0], 25 / 27, rtol=1e-5)
  np.testing.assert_allclose(c["kl"][:, 0], 0.0, atol=1e-6)
  small = 0  # β = 0.01
  assert c["p_rejected"][small, -1] < 1e-3 * p_init
  assert c["p_chosen"][small, -1] > 0.9
  assert c["p_ood"][small, -1] < 0.1
  assert np.all(np.diff(c["p_rejected"][small]) <= 1e-7)  # monotone fall
  # Larger β stops earlier: less KL and more mass left on OOD paths.
  assert c["kl"][0, -1] > c["kl"][1, -1] > c["kl"][2, -1]
  assert c["p_ood"][0, -1] < c["p_ood"][2, -1]


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic"])
def test_shared_parameters_move_mass_out_of_distribution(name):
  """Measured with `policy='linear'` (2 random features per state, seed 1), β = 0.01: the
  paper's picture. p(OOD) rises from 25/27 to ~1; p(y_l) falls at once; p(y_w) first rises,
  then falls far below its initial 1/27. (Feature draws differ: for seed 0 the mass goes to
  y_w instead, as in the tabular case; 9 of seeds 0–11 look like seed 1.)
  """
  c = tree_mdp.train_curves(get_config(policy="linear", seed=1, steps=400, betas=(0.01,)),
                            name)
  p_init = 1 / 27
  assert c["p_ood"][0, -1] > 0.99
  assert c["p_rejected"][0, -1] < 1e-3 * p_init
  assert c["p_chosen"][0].max() > 1.5 * p_init  # the transient rise
  assert c["p_chosen"][0, -1] < 0.1 * p_init  # then likelihood displacement


def test_run_writes_outputs(tmp_path):
  config = get_config(steps=30, log_every=7, objectives=("dpo", "ipo"))
  results = tree_mdp.run(config, str(tmp_path))
  for name in ("tree_mdp.json", "tree_mdp.png", "tree_mdp.pdf"):
    assert (tmp_path / name).stat().st_size > 0
  with open(tmp_path / "tree_mdp.json") as f:
    saved = json.load(f)
  assert saved["step"] == [0, 7, 14, 21, 28, 30]
  assert set(saved["curves"]) == {"dpo", "ipo"}
  assert set(saved["curves"]["dpo"]) == {"0.01", "0.1", "0.5"}
  curve = saved["curves"]["ipo"]["0.01"]
  assert set(curve) == {"p_chosen", "p_rejected", "p_ood", "kl", "loss"}
  assert all(len(v) == 6 for v in curve.values())
  summary = saved["summary"]["dpo"]["0.5"]["p_ood"]
  np.testing.assert_allclose(summary["initial"], 25 / 27, rtol=1e-5)
  assert saved["chosen_actions"] == [0, 0, 0] and saved["rejected_actions"] == [2, 2, 2]
  assert results["summary"] == saved["summary"]
