"""Closed forms, finite differences and sharding checks of daa_jax.train.objectives."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from daa_jax.train import objectives

NAMES = tuple(objectives.OBJECTIVES)
LOG2 = math.log(2.0)


def _pairs(h, ref=0.0):
  """policy/ref/lengths [B,2] whose summed log-ratio margin is exactly `h` [B]."""
  h = jnp.asarray(h, jnp.float32).reshape(-1)
  policy = jnp.stack([h - 3.0, jnp.full_like(h, -3.0)], axis=1) + ref
  ref_logps = jnp.full_like(policy, ref)
  lengths = jnp.tile(jnp.array([[10, 4]], jnp.int32), (h.shape[0], 1))
  return policy, ref_logps, lengths


def _random_pairs(rng, batch=6, dtype=np.float32):
  policy = rng.normal(-40.0, 8.0, (batch, 2)).astype(dtype)
  ref = (policy + rng.normal(0.0, 3.0, (batch, 2))).astype(dtype)
  lengths = rng.integers(1, 30, (batch, 2)).astype(np.int32)
  return policy, ref, lengths


KWARGS = dict(dpo={}, ipo={}, ipo_azar={}, slic=dict(sft_weight=0.3), rdpo=dict(alpha=0.05),
              cdpo=dict(epsilon=0.1), robust=dict(epsilon=0.1), chipo=dict(rmax=1.0),
              simpo=dict(gamma=0.3), dpop=dict(dpop_lambda=5.0))


def test_registry_and_unknown_name():
  assert set(NAMES) == {"dpo", "ipo", "ipo_azar", "slic", "rdpo", "cdpo", "robust", "chipo",
                        "simpo", "dpop"}
  p, r, l = _pairs([0.0])
  with pytest.raises(ValueError, match=r"config\.objective\.name='dpoo'.*dpo, ipo"):
    objectives.compute_loss("dpoo", p, r, l, beta=0.1)
  with pytest.raises(ValueError, match="normalize"):
    objectives.compute_loss("dpo", p, r, l, beta=0.1, normalize="max")


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5])
def test_values_at_h_zero(beta):
  p, r, l = _pairs([0.0, 0.0])
  loss = lambda name, **kw: float(objectives.compute_loss(name, p, r, l, beta=beta, **kw)[0])
  np.testing.assert_allclose(loss("dpo"), LOG2, rtol=1e-6)
  np.testing.assert_allclose(loss("slic"), 1.0, rtol=1e-6)
  np.testing.assert_allclose(loss("ipo"), 1.0, rtol=1e-6)
  np.testing.assert_allclose(loss("ipo_azar"), 1.0 / (4 * beta**2), rtol=1e-6)
  # cDPO and robust DPO are both log 2 at h = 0 for any ε (symmetric there).
  np.testing.assert_allclose(loss("cdpo", epsilon=0.2), LOG2, rtol=1e-6)
  np.testing.assert_allclose(loss("robust", epsilon=0.2), LOG2, rtol=1e-6)


# Hand-computed with math.log1p/exp: sp(x) = log(1 + e^x), u = βh.
#   dpo sp(−u); ipo (u−1)²; ipo_azar (h − 1/(2β))²; slic max(0, 1−u);
#   rdpo (α=0.05, |y_w|=10, |y_l|=4) sp(−u − 0.3); cdpo (ε=0.1) 0.9 sp(−u) + 0.1 sp(u);
#   robust (ε=0.1) (0.9 sp(−u) − 0.1 sp(u)) / 0.8.
HAND = {
    (0.1, 2.0): dict(dpo=0.5981388693815918, ipo=0.64, ipo_azar=9.0, slic=0.8,
                     rdpo=0.4740769841801067, cdpo=0.6181388693815918,
                     robust=0.5731388693815918),
    (0.5, -1.0): dict(dpo=0.9740769841801067, ipo=2.25, ipo_azar=4.0, slic=1.5,
                      rdpo=0.7981388693815918, cdpo=0.9240769841801066,
                      robust=1.0365769841801067),
    (0.01, 30.0): dict(dpo=0.5543552444685271, ipo=0.49, ipo_azar=400.0, slic=0.7,
                       rdpo=0.4374879504858856, cdpo=0.5843552444685272,
                       robust=0.5168552444685272),
}


@pytest.mark.parametrize("beta,h", list(HAND))
def test_hand_computed_values(beta, h):
  p, r, l = _pairs([h])
  for name, expected in HAND[(beta, h)].items():
    kw = dict(KWARGS[name])
    kw.pop("sft_weight", None)  # the hand values are the pure hinge
    loss, metrics = objectives.compute_loss(name, p, r, l, beta=beta, **kw)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6, err_msg=name)
    np.testing.assert_allclose(float(metrics["per_pair"]["loss"][0]), expected, rtol=2e-6)


def test_ipo_minima():
  """Unified IPO is minimal at h = 1/β, Azar's IPO at h = 1/(2β): zero gradient, lower value."""
  for beta in (0.1, 0.5):
    for name, h_star in (("ipo", 1.0 / beta), ("ipo_azar", 1.0 / (2 * beta))):
      def loss_at(h):
        p = jnp.stack([h - 3.0, -3.0])[None]
        return objectives.compute_loss(name, p, jnp.zeros((1, 2)), jnp.ones((1, 2)),
                                       beta=beta)[0]
      assert abs(float(jax.grad(loss_at)(jnp.float32(h_star)))) < 1e-4, name
      np.testing.assert_allclose(float(loss_at(jnp.float32(h_star))), 0.0, atol=1e-8)
      for dh in (-0.5, 0.5):
        assert float(loss_at(jnp.float32(h_star + dh))) > 1e-3, (name, dh)


def test_special_cases_equal_dpo():
  rng = np.random.default_rng(0)
  p, r, l = _random_pairs(rng)
  for normalize in objectives.NORMALIZATIONS:
    dpo, dpo_m = objectives.compute_loss("dpo", p, r, l, beta=0.1, normalize=normalize)
    for name, kw in (("rdpo", dict(alpha=0.0)), ("cdpo", dict(epsilon=0.0)),
                     ("robust", dict(epsilon=0.0))):
      loss, m = objectives.compute_loss(name, p, r, l, beta=0.1, normalize=normalize, **kw)
      np.testing.assert_allclose(loss, dpo, rtol=1e-6, err_msg=name)
      np.testing.assert_allclose(m["per_pair"]["loss"], dpo_m["per_pair"]["loss"], rtol=1e-6)


def test_rdpo_length_term_sign():
  """A longer chosen response adds +α(|y_w|−|y_l|) to the logit: lower loss than DPO."""
  p, r, l = _pairs([0.0])  # |y_w| = 10 > |y_l| = 4
  rdpo = float(objectives.compute_loss("rdpo", p, r, l, beta=0.1, alpha=0.1)[0])
  np.testing.assert_allclose(rdpo, math.log1p(math.exp(-0.6)), rtol=1e-6)
  assert rdpo < LOG2


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    p, r, l = _random_pairs(rng, dtype=np.float64)
    for name in NAMES:
      for normalize in objectives.NORMALIZATIONS:
        def f(policy, beta, name=name, normalize=normalize):
          return objectives.compute_loss(name, policy, r, l, beta=beta, normalize=normalize,
                                         **KWARGS[name])[0]
        beta = np.float64(0.07)
        # Keep the SLiC hinge away from its kink so the finite difference is smooth.
        h = objectives.compute_loss(name, p, r, l, beta=beta, normalize=normalize)[1][
            "per_pair"]["h"]
        assert np.all(np.abs(1 - beta * np.asarray(h)) > 1e-3)
        g_policy, g_beta = jax.grad(f, argnums=(0, 1))(jnp.asarray(p), beta)
        assert g_policy.dtype == jnp.float64
        step = 1e-6
        fd = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
          e = np.zeros_like(p)
          e[idx] = step
          fd[idx] = (f(p + e, beta) - f(p - e, beta)) / (2 * step)
        np.testing.assert_allclose(g_policy, fd, rtol=1e-6, atol=1e-9,
                                   err_msg=f"{name}/{normalize}")
        fd_beta = (f(p, beta + step) - f(p, beta - step)) / (2 * step)
        np.testing.assert_allclose(g_beta, fd_beta, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_raises_chosen_lowers_rejected(name):
  # h = 0 and small random h: no objective is saturated or past IPO's minimum there.
  for h in ([0.0, 0.0], [0.3, -0.4]):
    p, r, l = _pairs(h)
    kw = {k: v for k, v in KWARGS[name].items() if k != "sft_weight"}
    g = jax.grad(lambda p: objectives.compute_loss(name, p, r, l, beta=0.1, **kw)[0])(p)
    assert np.all(g[:, 0] < 0), (name, g)  # descent raises log πθ(y_w)
    assert np.all(g[:, 1] > 0), (name, g)  # and lowers log πθ(y_l)


def test_slic_sft_term():
  p, r, l = _pairs([200.0], ref=-300.0)  # βh ≥ 2 summed or mean: hinge 0, only λ·NLL left
  for normalize, nll in (("sum", -float(p[0, 0])), ("mean", -float(p[0, 0]) / 10)):
    loss = objectives.compute_loss("slic", p, r, l, beta=0.1, sft_weight=0.5,
                                   normalize=normalize)[0]
    np.testing.assert_allclose(float(loss), 0.5 * nll, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_mean_normalization_divides_by_length(name):
  rng = np.random.default_rng(2)
  p, r, l = _random_pairs(rng)
  loss_mean, m_mean = objectives.compute_loss(name, p, r, l, beta=0.3, normalize="mean",
                                              **KWARGS[name])
  loss_sum, m_sum = objectives.compute_loss(name, p / l, r / l, l, beta=0.3, normalize="sum",
                                            **KWARGS[name])
  np.testing.assert_allclose(loss_mean, loss_sum, rtol=1e-5)
  ref = r if objectives.needs_reference(name) else 0.0 * r  # simpo: reference-free
  np.testing.assert_allclose(m_mean["per_pair"]["logratio_chosen"],
                             (p[:, 0] - ref[:, 0]) / l[:, 0], rtol=1e-5)
  np.testing.assert_allclose(m_mean["per_pair"]["h"], m_sum["per_pair"]["h"], rtol=1e-5)


def test_metrics():
  beta = 0.2
  p, r, l = _pairs([0.0, 0.0, 0.0])
  loss, m = objectives.compute_loss("dpo", p, r, l, beta=beta)
  assert float(m["reward_acc"]) == 0.5  # πθ == π_ref: all ties, each counts half
  assert float(m["margin"]) == 0.0
  np.testing.assert_allclose(float(m["loss"]), LOG2, rtol=1e-6)

  h = np.array([1.0, -1.0, 0.0, 2.0], np.float32)
  p, r, l = _pairs(h, ref=-5.0)
  loss, m = objectives.compute_loss("ipo", p, r, l, beta=beta)
  np.testing.assert_allclose(float(m["reward_acc"]), (1 + 0 + 0.5 + 1) / 4)
  np.testing.assert_allclose(float(m["margin"]), beta * h.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["margin_std"]), beta * h.std(), rtol=1e-5)
  np.testing.assert_allclose(m["per_pair"]["rewards_chosen"], beta * (h - 3.0), rtol=1e-6)
  np.testing.assert_allclose(m["per_pair"]["rewards_rejected"], np.full(4, -3.0 * beta),
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["rewards_chosen"]), beta * (h - 3.0).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["logps_chosen"]), (h - 8.0).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["ref_logps_rejected"]), -5.0, rtol=1e-6)
  np.testing.assert_allclose(m["per_pair"]["length_chosen"], 10.0)
  np.testing.assert_allclose(m["per_pair"]["length_rejected"], 4.0)
  np.testing.assert_allclose(float(loss), np.mean((beta * h - 1) ** 2), rtol=1e-6)
  scalars = {k: v for k, v in m.items() if k != "per_pair"}
  assert set(scalars) == {"loss", "rewards_chosen", "rewards_rejected", "margin", "margin_std",
                          "reward_acc", "logps_chosen", "logps_rejected", "ref_logps_chosen",
                          "ref_logps_rejected"}
  assert all(v.shape == () and v.dtype == jnp.float32 for v in scalars.values())
  assert set(m["per_pair"]) == {"loss", "h", "accuracy", "rewards_chosen", "rewards_rejected",
                                "logratio_chosen", "logratio_rejected", "length_chosen",
                                "length_rejected"}


def test_roundoff_between_two_programs_is_a_tie_a_real_margin_is_not():
  # πθ = π_ref, but the two log-probs come from different compiled programs: each differs by
  # up to one float32 ulp (~6e-5 nats at 500 nats). Those margins are ties: accuracy 0.5.
  rng = np.random.default_rng(0)
  ref = -rng.uniform(100.0, 600.0, (256, 2)).astype(np.float32)
  ulps = rng.integers(-1, 2, ref.shape).astype(np.float32)
  policy = np.nextafter(ref, np.where(ulps > 0, np.inf, -np.inf).astype(np.float32))
  policy = np.where(ulps == 0, ref, policy)
  assert np.any(policy != ref)
  lengths = np.full((256, 2), 300, np.int32)
  for normalize in ("sum", "mean"):
    _, m = objectives.compute_loss("dpo", policy, ref, lengths, beta=0.1, normalize=normalize)
    assert float(m["reward_acc"]) == 0.5, normalize
    np.testing.assert_array_equal(m["per_pair"]["accuracy"], 0.5)
  # A margin of 0.01 nats on 500-nat responses is a real preference.
  _, m = objectives.compute_loss("dpo", ref + np.array([0.01, 0.0], np.float32), ref, lengths,
                                 beta=0.1)
  assert float(m["reward_acc"]) == 1.0
  # The same rule on numpy arrays (held-out metrics on the host).
  np.testing.assert_array_equal(
      objectives.tie_half_accuracy(np.array([1e-5, -1e-5, 0.01, -0.01]), np.full(4, 2000.0)),
      [0.5, 0.5, 1.0, 0.0])


@pytest.mark.parametrize("name", NAMES)
def test_jit_grad_vmap_over_beta(name):
  rng = np.random.default_rng(3)
  p, r, l = _random_pairs(rng)
  betas = jnp.array([0.01, 0.1, 0.5], jnp.float32)

  def f(policy, beta):
    return objectives.compute_loss(name, policy, r, l, beta=beta, **KWARGS[name])[0]

  swept = jax.jit(jax.vmap(f, in_axes=(None, 0)))(p, betas)
  grads = jax.jit(jax.vmap(jax.grad(f), in_axes=(None, 0)))(p, betas)
  for i, b in enumerate(np.asarray(betas)):
    np.testing.assert_allclose(swept[i], f(p, b), rtol=1e-6)
    np.testing.assert_allclose(grads[i], jax.grad(f)(p, b), rtol=1e-5, atol=1e-8)


def test_beta_change_does_not_recompile():
  rng = np.random.default_rng(4)
  p, r, l = _random_pairs(rng)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(policy, beta, alpha):
    return objectives.compute_loss("rdpo", policy, r, l, beta=beta, alpha=alpha)

  try:
    for beta, alpha in ((0.1, 0.0), (0.5, 0.01), (0.0175, 0.2)):
      step(p, jnp.float32(beta), jnp.float32(alpha))
  finally:
    chex.clear_trace_counter()


def test_sharded_batch_matches_single_device():
  assert jax.device_count() == 8
  rng = np.random.default_rng(5)
  p, r, l = _random_pairs(rng, batch=16)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  args = [jax.device_put(x, sharding) for x in (p, r, l)]
  assert len(args[0].sharding.device_set) == 8
  for name in NAMES:
    fn = jax.jit(lambda p, r, l, name=name: objectives.compute_loss(name, p, r, l, beta=0.1,
                                                                    **KWARGS[name]))
    loss_sharded, m_sharded = fn(*args)
    loss_single, m_single = fn(*(jax.device_put(x, jax.devices()[0]) for x in (p, r, l)))
    np.testing.assert_allclose(loss_sharded, loss_single, rtol=1e-6, err_msg=name)
    chex.assert_trees_all_close(m_sharded, m_single, rtol=1e-6, atol=1e-6)


# --- sequence_logps ------------------------------------------------------------------


def _naive_logps(logits, targets, mask):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  logsm = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  per = np.zeros(targets.shape)
  for i, j in np.ndindex(targets.shape):
    if mask[i, j]:
      per[i, j] = logsm[i, j, targets[i, j]]
  return per.sum(-1), per


def _token_batch(rng, n=3, length=7, vocab=11):
  logits = rng.normal(0, 3, (n, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (n, length)).astype(np.int32)
  lengths = np.array([length, 4, 1])[:n]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  mask[0, :2] = 0  # prompt positions are masked too
  targets[mask == 0] = -100  # padding ids outside the vocabulary must not matter
  logits[1, 5] = np.nan  # nor may garbage logits at a padded position
  return logits, targets, mask


def test_sequence_logps_matches_naive():
  rng = np.random.default_rng(6)
  logits, targets, mask = _token_batch(rng)
  summed, per_token = objectives.sequence_logps(logits, targets, mask)
  want_sum, want_per = _naive_logps(logits, targets, mask)
  assert summed.dtype == jnp.float32 and per_token.dtype == jnp.float32
  np.testing.assert_allclose(per_token, want_per, atol=1e-5)
  np.testing.assert_allclose(summed, want_sum, atol=1e-5)
  assert np.all(np.asarray(per_token)[mask == 0] == 0.0)
  # bf16 logits still give float32 log-probs of the bf16 values.
  bf = jnp.asarray(logits, jnp.bfloat16)
  s_bf, _ = objectives.sequence_logps(bf, targets, mask)
  want_bf, _ = _naive_logps(np.asarray(bf.astype(jnp.float32)), targets, mask)
  assert s_bf.dtype == jnp.float32
  np.testing.assert_allclose(s_bf, want_bf, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_sequence_logps_chunked_matches_direct(chunk_size):
  rng = np.random.default_rng(7)
  logits, targets, mask = _token_batch(rng)
  logits[1, 5] = 0.0  # finite everywhere so gradients can be compared
  direct = objectives.sequence_logps(logits, targets, mask)
  chunked = jax.jit(objectives.sequence_logps, static_argnums=3)(logits, targets, mask,
                                                                 chunk_size)
  np.testing.assert_allclose(chunked[0], direct[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(chunked[1], direct[1], rtol=1e-6, atol=1e-6)

  grad = lambda cs: jax.grad(
      lambda x: objectives.sequence_logps(x, targets, mask, cs)[0].sum())(jnp.asarray(logits))
  np.testing.assert_allclose(grad(chunk_size), grad(None), rtol=1e-6, atol=1e-7)


def test_sequence_logps_chunked_never_holds_full_float32_logits():
  n, length, vocab = 2, 12, 33
  logits = jnp.zeros((n, length, vocab), jnp.bfloat16)
  targets = jnp.zeros((n, length), jnp.int32)
  mask = jnp.ones((n, length), jnp.int32)
  full_f32 = f"f32[{n},{length},{vocab}]"

  def loss(x, cs):
    return objectives.sequence_logps(x, targets, mask, cs)[0].sum()

  assert full_f32 in str(jax.make_jaxpr(loss, static_argnums=1)(logits, None))
  assert full_f32 not in str(jax.make_jaxpr(loss, static_argnums=1)(logits, 5))
  assert full_f32 not in str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(logits, 5))
