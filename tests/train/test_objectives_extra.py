"""χPO, SimPO and DPO-Positive: the papers' formulas in numpy float64, gradients, config
validation, and a tiny SimPO run that never touches a reference."""

import os
import sys
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.errors import ConfigError
from daa_jax.train import config as config_lib
from daa_jax.train import loop as train
from daa_jax.train import objectives
from daa_jax.train import reference as reference_lib
from daa_jax.train import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import tiny as _tiny_config  # noqa: E402


def _neg_log_sigmoid(u):
  return np.logaddexp(0.0, -u)  # −log σ(u), float64, no overflow


def _sigmoid(u):
  return 0.5 * (1.0 + np.tanh(0.5 * u))


def _scaled(p, r, l, normalize):
  """Per-response (policy, reference) log-probs, per token for 'mean' (float64)."""
  p, r, l = (np.asarray(x, np.float64) for x in (p, r, l))
  return (p / l, r / l) if normalize == "mean" else (p, r)


# The papers' losses, written out independently of daa_jax (per pair, float64).
def np_chipo(p, r, l, beta, rmax, normalize="sum"):
  """Huang et al. 2024, Algorithm 1: −log σ(clip(β·φ(z_w)) − clip(β·φ(z_l))), φ(z) = z + log z."""
  pn, rn = _scaled(p, r, l, normalize)
  z = np.exp(pn - rn)  # π_θ/π_ref per response
  phi = z + np.log(z)
  c = np.clip(beta * phi, -2 * rmax, 2 * rmax)
  return _neg_log_sigmoid(c[:, 0] - c[:, 1])


def np_simpo(p, l, beta, gamma):
  """Meng et al. 2024, eq. 6: −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)."""
  p, l = np.asarray(p, np.float64), np.asarray(l, np.float64)
  return _neg_log_sigmoid(beta * p[:, 0] / l[:, 0] - beta * p[:, 1] / l[:, 1] - gamma)


def np_dpop(p, r, l, beta, lam, normalize="sum"):
  """Pal et al. 2024, eq. 3: −log σ(β·(h − λ·max(0, log π_ref(y_w) − log π_θ(y_w))))."""
  pn, rn = _scaled(p, r, l, normalize)
  h = (pn[:, 0] - rn[:, 0]) - (pn[:, 1] - rn[:, 1])
  return _neg_log_sigmoid(beta * (h - lam * np.maximum(0.0, rn[:, 0] - pn[:, 0])))


def _random_pairs(rng, batch=32):
  policy = rng.normal(-40.0, 8.0, (batch, 2))
  ref = policy + rng.normal(0.0, 2.0, (batch, 2))  # |Δ| of a few nats: χPO's clip both ways
  lengths = rng.integers(1, 30, (batch, 2)).astype(np.int32)
  return policy, ref, lengths


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_losses_match_the_papers_formulas_in_float64(beta, normalize):
  rng = np.random.default_rng(10)
  with jax.enable_x64(True):
    p, r, l = _random_pairs(rng)
    cases = {
        "chipo": (dict(rmax=1.0), np_chipo(p, r, l, beta, 1.0, normalize)),
        "dpop": (dict(dpop_lambda=5.0), np_dpop(p, r, l, beta, 5.0, normalize)),
    }
    if normalize == "mean":
      cases["simpo"] = (dict(gamma=0.7), np_simpo(p, l, beta, 0.7))
    for name, (kw, expected) in cases.items():
      loss, m = objectives.compute_loss(name, p, r, l, beta=beta, normalize=normalize, **kw)
      assert loss.dtype == jnp.float64
      np.testing.assert_allclose(m["per_pair"]["loss"], expected, rtol=1e-6, atol=1e-12,
                                 err_msg=name)
      np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-6, err_msg=name)
    # Both sides of χPO's clip are exercised by these pairs (the chosen term, β·φ(z_w)).
    pn, rn = _scaled(p, r, l, normalize)
    bphi = beta * (np.exp(pn - rn) + (pn - rn))
    if normalize == "sum" and beta == 0.5:
      assert (bphi > 2.0).any() and (bphi < -2.0).any() and (np.abs(bphi) < 2.0).any()


def test_defaults_are_the_documented_ones_and_the_configs():
  assert objectives.HPARAM_DEFAULTS["gamma"] == 0.5  # TRL's CPOConfig.simpo_gamma
  assert objectives.HPARAM_DEFAULTS["rmax"] == 5.0
  assert objectives.HPARAM_DEFAULTS["dpop_lambda"] == 50.0  # Smaug's λ
  o = config_lib.objective_fields()
  for k in ("gamma", "rmax", "dpop_lambda"):
    assert o[k] == objectives.HPARAM_DEFAULTS[k], k
  assert set(step_lib.hparams_from_config(o)) == set(objectives.HPARAM_DEFAULTS)
  assert config_lib.objective_fields("simpo").normalize == "mean"
  p, r, l = _random_pairs(np.random.default_rng(11), batch=4)
  np.testing.assert_allclose(  # compute_loss's defaults are HPARAM_DEFAULTS
      objectives.compute_loss("dpop", p, r, l, beta=0.1)[0],
      np_dpop(p, r, l, 0.1, 50.0).mean(), rtol=1e-5)
  np.testing.assert_allclose(objectives.compute_loss("chipo", p, r, l, beta=0.1)[0],
                             np_chipo(p, r, l, 0.1, 5.0).mean(), rtol=1e-5)


def test_special_cases():
  p, r, l = _random_pairs(np.random.default_rng(12))
  dpo = objectives.compute_loss("dpo", p, r, l, beta=0.3)[0]
  # DPO-Positive with λ = 0, or with every chosen response above the reference, is DPO.
  np.testing.assert_allclose(objectives.compute_loss("dpop", p, r, l, beta=0.3,
                                                     dpop_lambda=0.0)[0], dpo, rtol=1e-6)
  up = r.copy()
  up[:, 0] = p[:, 0] - 0.5
  np.testing.assert_allclose(objectives.compute_loss("dpop", p, up, l, beta=0.3)[0],
                             objectives.compute_loss("dpo", p, up, l, beta=0.3)[0], rtol=1e-6)
  # χPO at π_θ = π_ref: both terms are β, the loss is log 2.
  np.testing.assert_allclose(objectives.compute_loss("chipo", p, p, l, beta=0.3)[0],
                             np.log(2.0), rtol=1e-6)
  # SimPO at γ = 0 is DPO on length-normalized log-probs against a zero reference.
  np.testing.assert_allclose(
      objectives.compute_loss("simpo", p, r, l, beta=2.0, gamma=0.0, normalize="mean")[0],
      objectives.compute_loss("dpo", p, 0 * p, l, beta=2.0, normalize="mean")[0], rtol=1e-6)


def test_simpo_never_reads_the_reference():
  p, r, l = _random_pairs(np.random.default_rng(13))
  base, m = objectives.compute_loss("simpo", p, r, l, beta=2.0, normalize="mean")
  nan_ref = np.full_like(r, np.nan)
  loss, m_nan = objectives.compute_loss("simpo", p, nan_ref, l, beta=2.0, normalize="mean")
  assert float(loss) == float(base)
  assert float(m_nan["ref_logps_chosen"]) == 0.0 and float(m_nan["ref_logps_rejected"]) == 0.0
  g = jax.grad(lambda ref: objectives.compute_loss("simpo", p, ref, l, beta=2.0,
                                                    normalize="mean")[0])(jnp.asarray(r))
  assert not np.any(np.asarray(g))
  assert not objectives.needs_reference("simpo")
  assert all(objectives.needs_reference(n) for n in objectives.OBJECTIVES if n != "simpo")
  with pytest.raises(ValueError, match="not a known objective"):
    objectives.needs_reference("simpoo")


def test_gradients_are_the_analytic_ones_in_float64():
  """d loss / d log πθ(y_w), d/d log πθ(y_l) against the derivative written out by hand."""
  rng = np.random.default_rng(14)
  beta = 0.5
  with jax.enable_x64(True):
    p, r, l = _random_pairs(rng)
    b = len(p)
    grad = lambda name, **kw: np.asarray(jax.grad(  # noqa: E731
        lambda x: objectives.compute_loss(name, x, r, l, beta=beta, **kw)[0])(jnp.asarray(p)))
    # χPO: u = c_w − c_l; dc/dΔ = β(e^Δ + 1) inside the clip, 0 outside.
    d = p - r
    bphi = beta * (np.exp(d) + d)
    dc = np.where(np.abs(bphi) < 2.0, beta * (np.exp(d) + 1.0), 0.0)
    c = np.clip(bphi, -2.0, 2.0)
    s = _sigmoid(-(c[:, 0] - c[:, 1]))
    expected = np.stack([-s * dc[:, 0], s * dc[:, 1]], 1) / b
    np.testing.assert_allclose(grad("chipo", rmax=1.0), expected, rtol=1e-6, atol=1e-12)
    # DPO-Positive: u = β(h − λ·max(0, −Δ_w)); du/dΔ_w = β(1 + λ·[Δ_w < 0]).
    lam = 5.0
    u = beta * ((d[:, 0] - d[:, 1]) - lam * np.maximum(0.0, -d[:, 0]))
    s = _sigmoid(-u)
    expected = np.stack([-s * beta * (1 + lam * (d[:, 0] < 0)), s * beta], 1) / b
    np.testing.assert_allclose(grad("dpop", dpop_lambda=lam), expected, rtol=1e-6, atol=1e-12)
    # SimPO: u = β·p_w/|y_w| − β·p_l/|y_l| − γ.
    u = beta * (p[:, 0] / l[:, 0] - p[:, 1] / l[:, 1]) - 0.5
    s = _sigmoid(-u)
    expected = np.stack([-s * beta / l[:, 0], s * beta / l[:, 1]], 1) / b
    np.testing.assert_allclose(grad("simpo", gamma=0.5, normalize="mean"), expected,
                               rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["chipo", "simpo", "dpop"])
def test_gradients_finite_and_signed_for_extreme_log_ratios(name):
  """Float32, log-ratios of ±2000 nats: finite loss and gradient; descent never lowers the
  chosen response or raises the rejected one."""
  p = jnp.array([[-10.0, -3000.0], [-3000.0, -10.0], [-50.0, -50.0], [-1.0, -2.0]])
  r = jnp.array([[-2010.0, -1000.0], [-1000.0, -2010.0], [-50.0, -50.0], [-1.5, -1.0]])
  l = jnp.array([[10, 20], [20, 10], [5, 5], [3, 4]], jnp.int32)
  kw = dict(normalize="mean") if name == "simpo" else {}
  loss, g = jax.value_and_grad(
      lambda x: objectives.compute_loss(name, x, r, l, beta=0.1, **kw)[0])(p)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(g)), (name, loss, g)
  assert np.all(g[:, 0] <= 0) and np.all(g[:, 1] >= 0), (name, g)
  assert np.all(g[2:, 0] < 0) and np.all(g[2:, 1] > 0), (name, g)  # unsaturated pairs move
  if name == "chipo":  # the chosen term of pair 0 sits past the clip: no gradient there
    assert float(g[0, 0]) == 0.0


# --- config validation -------------------------------------------------------------------


def tiny(arg="job=daa", **updates):
  return _tiny_config(arg, **updates)


@pytest.mark.parametrize("updates,message", [
    ({"objective.gamma": -0.1},
     "config.objective.gamma=-0.1 must be >= 0 (SimPO's target reward margin)."),
    ({"objective.dpop_lambda": -1.0},
     "config.objective.dpop_lambda=-1.0 must be >= 0 (DPO-Positive's penalty weight)."),
    ({"objective.rmax": 0.0}, "config.objective.rmax=0.0 must be > 0 (chipo's reward bound"),
    ({"objective.rmax": float("nan")}, "config.objective.rmax=nan must be > 0"),
    ({"objective.name": "simpo", "objective.normalize": "sum"},
     "config.objective.normalize='sum' with objective.name='simpo'"),
    ({"objective.name": "chipo", "objective.beta": 0.0}, "config.objective.beta=0.0 must be > 0"),
])
def test_config_errors_name_the_field_value_and_range(updates, message):
  with pytest.raises(ConfigError, match=re.escape(message)) as e:
    config_lib.validate(tiny(**updates), jax.device_count())
  assert "\n" not in str(e.value)  # one paragraph
  config_lib.validate(tiny("job=daa,objective=simpo"), jax.device_count())  # normalize=mean


# --- SimPO trains with no reference at all -------------------------------------------------


def _count_reference_work(monkeypatch):
  """Counts `pair_logps` calls per traced step (policy: 1, live reference: +1), the ref_params
  each step sees, and every reference log-prob pass (`reference.compute_pair_logps`)."""
  seen = {"pair_logps": 0, "traces": 0, "ref_params": [], "ref_passes": 0}
  pair_logps, train_step, eval_step = (step_lib.pair_logps, step_lib.train_step,
                                       step_lib.eval_step)
  compute = reference_lib.compute_pair_logps

  def counting_pair_logps(*a, **k):
    seen["pair_logps"] += 1
    return pair_logps(*a, **k)

  def counting_step(fn):
    def wrapped(state_or_params, ref_params, *a, **k):
      seen["traces"] += 1
      seen["ref_params"].append(ref_params)
      return fn(state_or_params, ref_params, *a, **k)
    return wrapped

  def counting_compute(*a, **k):
    seen["ref_passes"] += 1
    return compute(*a, **k)

  monkeypatch.setattr(step_lib, "pair_logps", counting_pair_logps)
  monkeypatch.setattr(step_lib, "train_step", counting_step(train_step))
  monkeypatch.setattr(step_lib, "eval_step", counting_step(eval_step))
  monkeypatch.setattr(reference_lib, "compute_pair_logps", counting_compute)
  monkeypatch.setattr(train, "_STEP_CACHE", {})  # trace again, through the counters
  return seen


@pytest.mark.parametrize("reference", ["live", "cached"])
def test_simpo_run_makes_no_reference_pass(tmp_path, monkeypatch, reference):
  seen = _count_reference_work(monkeypatch)
  summary = train.run(tiny("job=daa,objective=simpo,beta=2.0", **{
      "train.max_steps": 2, "train.eval_every": 2, "train.eval_batches": 1,
      "objective.reference": reference}), str(tmp_path))
  assert summary["status"] == "finished" and summary["step"] == 2
  assert seen["traces"] == 2  # the train step and the eval step, each traced once
  assert seen["ref_params"] == [None, None]  # no reference params kept
  assert seen["pair_logps"] == 2  # one policy pass per traced step, no reference pass
  assert seen["ref_passes"] == 0  # and no cached reference pass
  assert summary["logps/ref_chosen"] == 0.0 and summary["logps/ref_rejected"] == 0.0
  cache = os.path.join(str(tmp_path), "cache")
  assert not any(f.startswith("ref_logps") for f in (os.listdir(cache) if os.path.isdir(cache)
                                                     else ()))


def test_the_counter_sees_the_reference_of_a_dpop_run(tmp_path, monkeypatch):
  """The same counters on DPO-Positive: a reference forward per traced step (the counters
  work, and dpop trains end to end)."""
  seen = _count_reference_work(monkeypatch)
  train.run(tiny("job=daa,objective=dpop", **{"train.max_steps": 1}), str(tmp_path))
  assert seen["traces"] == 1 and seen["ref_params"][0] is not None
  assert seen["pair_logps"] == 2 and seen["ref_passes"] == 0
