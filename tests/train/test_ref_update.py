"""TR-DPO's reference updates (train/reference_update.py): the update in closed form, what
each checkpoint saves, a bitwise resume after SIGKILL, and the refusals."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.train import config as config_lib
from daa_jax.train import reference_update

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import cli as _cli, tiny as _tiny_config  # noqa: E402
FLAGS = ["--config=configs/tiny.py:job=daa", "--config.train.max_steps=8",
         "--config.checkpoint.every_steps=2", "--config.checkpoint.epoch_fractions=(0.75,)",
         "--config.objective.ref_update_every=3", "--config.checkpoint.max_to_keep=10"]


def _tree(workdir, step, item):
  return ckpt_lib.load_arrays(os.path.join(workdir, "checkpoints", str(step), item))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_mix_is_the_weighted_average_in_float32_stored_in_the_references_dtype():
  ref = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16), "b": jnp.asarray([4.0], jnp.float32)}
  params = {"w": jnp.asarray([3.0, 6.0], jnp.float32), "b": jnp.asarray([0.0], jnp.float32)}
  out = reference_update.mix(ref, params, jnp.float32(0.25))
  assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [1.5, 3.0])
  np.testing.assert_array_equal(out["b"], [3.0])


def test_soft_updates_follow_the_recursion_checkpoint_by_checkpoint(tmp_path):
  workdir = str(tmp_path)
  _cli(FLAGS + ["--config.objective.ref_update=soft", "--config.objective.ref_update_alpha=0.5",
                f"--workdir={workdir}"])
  # τ = 3: updates after steps 3 and 6. Step 4's checkpoint holds ref_3, step 6's (an export:
  # 0.75 epoch of 8 steps) holds ref_6 = α·θ_6 + (1 − α)·ref_3.
  ref4, ref6 = _tree(workdir, 4, "reference"), _tree(workdir, 6, "reference")
  theta6 = _tree(workdir, 6, "params")
  for r4, r6, t6 in zip(_leaves(ref4), _leaves(ref6), _leaves(theta6)):
    expected = (np.float32(0.5) * t6.astype(np.float32)
                + np.float32(0.5) * r4.astype(np.float32)).astype(r6.dtype)
    np.testing.assert_array_equal(r6, expected)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(_leaves(ref4), _leaves(ref6)))
  np.testing.assert_array_equal(_leaves(_tree(workdir, 8, "reference"))[0], _leaves(ref6)[0])


def test_hard_update_copies_the_policy_and_changes_the_losses(tmp_path):
  hard, frozen = str(tmp_path / "hard"), str(tmp_path / "frozen")
  _cli(FLAGS + ["--config.objective.ref_update=hard", f"--workdir={hard}"])
  _cli(FLAGS + [f"--workdir={frozen}"])
  for r, t in zip(_leaves(_tree(hard, 6, "reference")), _leaves(_tree(hard, 6, "params"))):
    np.testing.assert_array_equal(r, t)
  assert not os.path.exists(os.path.join(frozen, "checkpoints", "6", "reference"))
  read = lambda d: {m["step"]: m["loss/total"] for m in map(json.loads, open(  # noqa: E731
      os.path.join(d, "metrics.jsonl")))}
  a, b = read(hard), read(frozen)
  assert all(a[s] == b[s] for s in (1, 2, 3))  # the same run until the first update
  assert a[4] != b[4]  # step 4 is the first with the updated reference


def test_resume_after_sigkill_is_bitwise_with_the_updated_reference(tmp_path):
  flags = FLAGS + ["--config.objective.ref_update=soft", "--config.checkpoint.async_save=True"]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  _cli(flags + [f"--workdir={straight}"])
  proc = _cli(flags + [f"--workdir={killed}"], check=False, faults={"sigkill_mid_save": 6})
  assert proc.returncode == -9, proc.stderr[-2000:]
  _cli(flags + [f"--workdir={killed}"])  # resumes from step 4 (ref_3), updates again at 6
  for item in ("params", "reference"):
    for x, y in zip(_leaves(_tree(straight, 8, "state" if item == "params" else item)),
                    _leaves(_tree(killed, 8, "state" if item == "params" else item))):
      np.testing.assert_array_equal(x, y)


def _tiny(**objective):
  return _tiny_config("job=daa", **{f"objective.{k}": v for k, v in objective.items()})


@pytest.mark.parametrize("objective, message", [
    (dict(ref_update="soft", ref_update_every=4, reference="cached"),
     r"reference='cached' precomputes its log-probs once"),
    (dict(ref_update="hard", ref_update_every=4, name="simpo", normalize="mean"),
     r"'simpo' is reference-free"),
    (dict(ref_update="soft"), r"needs config.objective.ref_update_every >= 1"),
    (dict(ref_update="soft", ref_update_every=2, ref_update_alpha=0.0),
     r"ref_update_alpha=0.0 must be in \(0, 1\]"),
    (dict(ref_update="sof", ref_update_every=2), r"Did you mean 'soft'\? Set --config.objective.ref_update=soft"),
])
def test_bad_reference_updates_are_refused_with_the_fix(objective, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(_tiny(**objective))
