"""packing='fixed' (train/fixed_layout.py): [prompt P | chosen R | rejected R] rows give the
log-probs of today's packing and of the two-row layout on every family; its layout and its
config checks."""

import functools
import os
import sys

import jax
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.models import model as model_lib
from daa_jax.train import config as config_lib
from daa_jax.train import fixed_layout, packing
from daa_jax.train import step as step_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from family_configs import family_configs  # noqa: E402
from train.test_packing import two_row_batch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAD_ID = 1
# Chosen/rejected of different lengths, a one-token response, a one-token prompt.
SPEC = [(5, 3, 7), (1, 6, 2), (9, 1, 4), (4, 11, 11)]


def pairs(seed=0, vocab=97):
  rng = np.random.default_rng(seed)
  tok = lambda n: list(rng.integers(2, vocab, n))  # noqa: E731
  return [(tok(p), tok(c), tok(r)) for p, c, r in SPEC]


def test_layout_is_fixed_offsets_with_padding_segments():
  batch = two_row_batch(pairs(), 22, left_pad=True)
  fixed = fixed_layout.pack_fixed(batch, pad_id=PAD_ID, block=8)
  p, r = 16, 16  # longest prompt 9 and response 11, rounded up to 8
  assert fixed["tokens"].shape == (4, p + 2 * r) and fixed["target_index"].shape == (4, 2, r)
  np.testing.assert_array_equal(fixed["prompt_slots"], p)
  seg = fixed["segment_ids"]
  for b, (n, nc, nr) in enumerate(SPEC):
    expect = np.full(p + 2 * r, packing.PAD)
    expect[p - n:p] = packing.PROMPT
    expect[p:p + nc] = packing.CHOSEN
    expect[p + r:p + r + nr] = packing.REJECTED
    np.testing.assert_array_equal(seg[b], expect)
  np.testing.assert_array_equal(fixed["attention_mask"], seg != packing.PAD)
  np.testing.assert_array_equal(fixed["target_mask"].sum(-1), batch["loss_mask"].sum(-1))
  with pytest.raises(ValueError, match="prompt_len=8"):
    fixed_layout.pack_fixed(batch, prompt_len=8, response_len=16)
  with pytest.raises(ValueError, match="response_len=8"):
    fixed_layout.pack_fixed(batch, prompt_len=16, response_len=8)
  assert fixed_layout.bounds([batch], block=8) == (16, 16)


@pytest.mark.parametrize("name", list(family_configs()))
@pytest.mark.parametrize("left_pad", [False, True])
def test_fixed_layout_logps_equal_packing_and_two_rows(name, left_pad):
  config = family_configs()[name]
  params = model_lib.init_params(config, jax.random.key(1))
  model = model_lib.CausalLM(config)
  batch = two_row_batch(pairs(), 22, left_pad)
  two_row = jax.jit(functools.partial(step_lib.pair_logps, model))(params, batch)
  packed = jax.jit(functools.partial(packing.packed_pair_logps, model))
  flexible = packed(params, packing.pack_pairs(batch, pad_id=PAD_ID))
  fixed = packed(params, fixed_layout.pack_fixed(batch, pad_id=PAD_ID, block=8))
  np.testing.assert_allclose(np.asarray(fixed), np.asarray(two_row), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(fixed), np.asarray(flexible), rtol=0, atol=1e-5)


def daa_config(**train):
  config = config_lib.load_sibling(os.path.join(REPO, "configs", "x.py"), "daa", "size=tiny")
  config.train.update(train)
  return config


def test_packing_values_are_checked_with_the_fix():
  config_lib.validate(daa_config(packing="fixed"))
  config_lib.validate(daa_config(packing=False))
  with pytest.raises(ConfigError, match=r"train.packing='fixd'; use True"):
    config_lib.validate(daa_config(packing="fixd"))
  with pytest.raises(ConfigError, match=r"train.packing_block=0 must be a positive int"):
    config_lib.validate(daa_config(packing="fixed", packing_block=0))
  config = daa_config(packing=True)
  config.model.attention_impl = "splash"
  with pytest.raises(ConfigError, match=r"train.packing='fixed'"):
    config_lib.validate(config)
  config.train.packing = "fixed"
  config_lib.validate(config)


def test_packer_for_picks_the_layout_from_the_config():
  class Dataset:
    tokenizer = type("T", (), {"pad_id": PAD_ID})
    def __len__(self):
      return 4
    def batch(self, rows):
      return {k: v[list(rows)] for k, v in two_row_batch(pairs(), 22).items()}
  ds = Dataset()
  fixed = fixed_layout.packer_for(daa_config(packing="fixed", packing_block=8).train, ds)
  assert fixed(ds.batch(range(4)))["tokens"].shape == (4, 48)
  flexible = fixed_layout.packer_for(daa_config(packing=True).train, ds)
  assert "prompt_slots" not in flexible(ds.batch(range(4)))
