"""Prompt-shared pair packing equals the two-row layout (log-probs, loss, gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from daa_jax.models import model as model_lib
from daa_jax.train import packing
from daa_jax.train import step as step_lib
from daa_jax.models import config as model_configs

PAD_ID = 1
# Odd sizes catch layout bugs (a square shape hides a transposed axis); vocab large enough for distinct tokens.
CFG = model_configs.ModelConfig(vocab_size=97, hidden_size=40, num_hidden_layers=2,
                             num_attention_heads=5, intermediate_size=72,
                             max_position_embeddings=128)


def two_row_batch(pairs, length, left_pad=False):
  """The data contract's `[B,2,L]` batch from (prompt, chosen, rejected) token lists."""
  num_pairs = len(pairs)
  out = {k: np.zeros((num_pairs, 2, length), np.int32)
         for k in ("tokens", "loss_mask", "attention_mask", "positions")}
  out["tokens"][:] = PAD_ID
  lengths = np.zeros((num_pairs, 2), np.int32)
  for b, (prompt, *responses) in enumerate(pairs):
    for s, response in enumerate(responses):
      seq = list(prompt) + list(response)
      start = length - len(seq) if left_pad else 0
      span = slice(start, start + len(seq))
      out["tokens"][b, s, span] = seq
      out["attention_mask"][b, s, span] = 1
      out["positions"][b, s, span] = np.arange(len(seq))
      # loss_mask[t] = 1 iff token t + 1 is a response token.
      first = start + len(prompt)
      out["loss_mask"][b, s, first - 1:start + len(seq) - 1] = 1
      lengths[b, s] = len(response)
  out["lengths"] = lengths
  out["prompt_lengths"] = np.array([len(p[0]) for p in pairs], np.int32)
  return out


def random_pairs(rng, spec):
  """spec: (prompt_len, chosen_len, rejected_len) per pair; tokens avoid PAD_ID."""
  tok = lambda n: list(rng.integers(2, CFG.vocab_size, n))  # noqa: E731
  return [(tok(p), tok(c), tok(r)) for p, c, r in spec]


# Different chosen/rejected lengths, a one-token response (EOS only), a one-token prompt,
# and a pair that exactly fills the rows.
SPEC = [(5, 3, 7), (1, 6, 2), (9, 1, 4), (4, 11, 11), (7, 5, 5)]


@pytest.fixture(scope="module")
def params():
  return model_lib.init_params(CFG, jax.random.key(3))


def _two_row_logps(params, batch):
  return jax.jit(functools.partial(step_lib.pair_logps, model_lib.CausalLM(CFG)))(
      params, batch)


def _packed_logps(params, packed, chunk=0):
  return jax.jit(functools.partial(packing.packed_pair_logps, model_lib.CausalLM(CFG),
                                   logps_chunk=chunk))(params, packed)


@pytest.mark.parametrize("left_pad", [False, True])
def test_packed_logps_equal_two_row_layout(params, left_pad):
  batch = two_row_batch(random_pairs(np.random.default_rng(0), SPEC), 16, left_pad)
  packed = packing.pack_pairs(batch, pad_id=PAD_ID)
  expected = np.asarray(_two_row_logps(params, batch))
  got = np.asarray(_packed_logps(params, packed))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  # Chunked log-softmax over target slots (a ragged last chunk) gives the same values.
  np.testing.assert_allclose(np.asarray(_packed_logps(params, packed, chunk=3)), expected,
                             rtol=0, atol=1e-5)


def test_packed_logps_with_scanned_rematerialized_layers(params):
  cfg = CFG.replace(scan_layers=True, remat_policy="full")
  scanned = model_lib.to_scan_layout(params, CFG.num_hidden_layers)
  batch = two_row_batch(random_pairs(np.random.default_rng(6), SPEC), 16, left_pad=True)
  packed = packing.pack_pairs(batch, pad_id=PAD_ID)
  expected = np.asarray(_two_row_logps(params, batch))
  model = model_lib.CausalLM(cfg)
  grad = jax.jit(jax.value_and_grad(
      lambda p: packing.packed_pair_logps(model, p, packed).sum()))
  value, _ = grad(scanned)
  np.testing.assert_allclose(value, expected.sum(), rtol=0, atol=1e-4)


def test_packed_layout(params):
  del params
  batch = two_row_batch(random_pairs(np.random.default_rng(1), [(3, 2, 4)]), 9, left_pad=True)
  packed = packing.pack_pairs(batch, length=12, response_length=5, pad_id=PAD_ID)
  # Left-padded rows of 9: chosen's starts at slot 4, rejected's at slot 2.
  prompt = batch["tokens"][0, 0, 4:7]
  chosen = batch["tokens"][0, 0, 7:9]
  rejected = batch["tokens"][0, 1, 5:9]
  np.testing.assert_array_equal(packed["tokens"][0, :9],
                                np.concatenate([prompt, chosen, rejected]))
  np.testing.assert_array_equal(packed["tokens"][0, 9:], PAD_ID)
  np.testing.assert_array_equal(packed["segment_ids"][0],
                                [0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1])
  # Rejected positions restart after the prompt, like chosen's.
  np.testing.assert_array_equal(packed["positions"][0, :9], [0, 1, 2, 3, 4, 3, 4, 5, 6])
  # The last prompt token (slot 2) predicts the first token of both responses.
  np.testing.assert_array_equal(packed["target_index"][0, 0, :2], [2, 3])
  np.testing.assert_array_equal(packed["target_index"][0, 1, :4], [2, 5, 6, 7])
  np.testing.assert_array_equal(packed["target_mask"].sum(-1), batch["loss_mask"].sum(-1))
  np.testing.assert_array_equal(packed["targets"][0, 1, :4], rejected)
  np.testing.assert_array_equal(packed["lengths"], batch["lengths"])  # passed through
  assert "loss_mask" not in packed


def test_mask_hides_the_other_response():
  seg = jnp.asarray([[0, 0, 1, 1, 2, 2, -1]])
  valid = seg >= 0
  mask, positions = model_lib._self_mask(valid, None, seg, shared_segment=packing.PROMPT)  # pylint: disable=protected-access
  mask = np.asarray(mask)[0, 0]
  assert mask[4, :2].all() and not mask[4, 2:4].any() and mask[4, 4]  # rejected: prompt, self
  assert mask[3, :4].all() and not mask[3, 4:].any()  # chosen: prompt + earlier chosen
  assert not mask[5, 6] and mask[6, 6]  # padding: never a key, but sees itself
  # Default positions: both responses continue after the prompt.
  np.testing.assert_array_equal(np.asarray(positions)[0, :6], [0, 1, 2, 3, 2, 3])


def test_pack_pairs_rejects_bad_batches():
  batch = two_row_batch(random_pairs(np.random.default_rng(2), [(4, 3, 3)]), 8)
  other = dict(batch, tokens=batch["tokens"].copy())
  other["tokens"][0, 1, 0] += 1  # the rows' prompts differ
  with pytest.raises(ValueError, match="different prompts"):
    packing.pack_pairs(other)
  with pytest.raises(ValueError, match="length=8"):
    packing.pack_pairs(batch, length=8)  # needs 4 + 3 + 3 = 10
  assert packing.bounds([batch]) == (16, 8)  # 10 and 3, rounded up to multiples of 8


def test_packed_train_step_equals_two_row_step(params):
  batch = two_row_batch(random_pairs(np.random.default_rng(4), SPEC), 16)
  packed = packing.pack_pairs(batch, pad_id=PAD_ID)
  model = model_lib.CausalLM(CFG)
  # The reference differs from the policy so the loss is not at its log 2 tie.
  ref_params = jax.tree.map(lambda p: p * 0.9, params)
  tx = optax.sgd(1.0)  # params - new params = grads
  hparams = {k: jnp.float32(v) for k, v in
             dict(beta=0.5, alpha=0.0, epsilon=0.0, sft_weight=0.0).items()}
  outs = []
  for cfg, b in ((step_lib.StepConfig(), batch),
                 (step_lib.StepConfig(packing=True, grad_accum=1), packed)):
    fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, cfg=cfg))
    new_state, metrics = fn(step_lib.init_state(params, tx), ref_params, b, hparams)
    grads = jax.tree.map(lambda a, n: a - n, params, new_state.params)
    outs.append((jax.device_get(metrics), jax.device_get(grads)))
  (m0, g0), (m1, g1) = outs
  for key in ("loss/total", "opt/grad_norm", "logps/chosen", "logps/rejected",
              "logps/ref_chosen"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=0, atol=1e-5, err_msg=key)
  assert m0["loss/total"] != pytest.approx(np.log(2), abs=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), g1, g0)


def test_packed_step_with_grad_accum_and_cached_reference(params):
  batch = two_row_batch(random_pairs(np.random.default_rng(5), SPEC[:4]), 16)
  batch["ref_logps"] = np.asarray(_two_row_logps(jax.tree.map(lambda p: p * 0.9, params),
                                                  batch))
  packed = packing.pack_pairs(batch, pad_id=PAD_ID)
  model = model_lib.CausalLM(CFG)
  tx = optax.sgd(1.0)
  hparams = {k: jnp.float32(v) for k, v in
             dict(beta=0.5, alpha=0.0, epsilon=0.0, sft_weight=0.0).items()}
  losses = []
  for cfg, b in ((step_lib.StepConfig(cached_ref=True), batch),
                 (step_lib.StepConfig(cached_ref=True, packing=True, grad_accum=2), packed)):
    fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, cfg=cfg))
    _, metrics = fn(step_lib.init_state(params, tx), None, b, hparams)
    losses.append(jax.device_get(metrics))
  for key in ("loss/total", "opt/grad_norm"):
    np.testing.assert_allclose(losses[1][key], losses[0][key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("reference", ["live", "cached"])
def test_trainer_with_packing_matches_two_row_run(tmp_path, reference):
  """config.train.packing: same losses and held-out metrics as the two-row run (with a cached
  reference, the reference log-prob pass runs packed too)."""
  from test_train import metrics, tiny  # pylint: disable=g-import-not-at-top
  from daa_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  runs = {}
  for packed in (False, True):
    workdir = str(tmp_path / f"packed{int(packed)}")
    train.run(tiny(**{"train.max_steps": 3, "train.log_every": 1, "train.eval_every": 3,
                      "train.eval_batches": 1, "train.packing": packed,
                      "objective.reference": reference}), workdir)
    runs[packed] = metrics(workdir)
  assert len(runs[True]) == len(runs[False])
  assert any("eval/loss" in r for r in runs[True])
  assert [r["loss/total"] for r in runs[True] if "loss/total" in r][-1] != np.log(2)
  for a, b in zip(runs[False], runs[True]):
    for key in ("loss/total", "daa/margin", "logps/chosen", "eval/loss"):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-5, err_msg=key)
