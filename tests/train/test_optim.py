"""The paper recipe's optimizer against torch: RMSprop, the DPO code's warmup, clipping."""

import numpy as np
import optax
import pytest
import torch

from daa_jax.train import config as config_lib
from daa_jax.train import optim


def test_warmup_matches_the_dpo_reference_lambda():
  c = config_lib.optim_fields("paper")
  lr_fn = optim.schedule(c, total_steps=1000)
  w = c.warmup_steps
  for s in (0, 1, 74, w - 1, w, w + 1, 999):
    assert float(lr_fn(s)) == pytest.approx(c.lr * min(1.0, (s + 1) / (w + 1)), rel=1e-6), s
  assert float(lr_fn(0)) > 0  # the first update moves the weights


def test_first_updates_match_torch_rmsprop_with_lambda_lr():
  c = config_lib.optim_fields("paper")
  c.update(lr=1e-2, warmup_steps=3, grad_clip=1.0)
  tx, _ = optim.make(c, total_steps=10)
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) * s for s in (3.0, 0.1, 0.5, 2.0, 1.0)]

  w = torch.tensor(w0, requires_grad=True)
  opt = torch.optim.RMSprop([w], lr=c.lr, alpha=c.rms_decay, eps=c.eps)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: min(1.0, (s + 1) / (c.warmup_steps + 1)))
  params, state = {"w": w0}, tx.init({"w": w0})
  for g in grads:
    w.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_([w], c.grad_clip)
    opt.step()
    sched.step()
    updates, state = tx.update({"w": g}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=1e-5, atol=1e-7)
  assert not np.allclose(params["w"], w0)
