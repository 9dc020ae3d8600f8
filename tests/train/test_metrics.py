"""Metrics: JSONL + TensorBoard event files, and the DPO-aware FLOP accounting."""

import os

import pytest

from daa_jax.train import metrics
from daa_jax.models import config as model_configs


def test_jsonl_and_tensorboard_events(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), is_main=True)
  writer.write(1, {"loss/total": 0.69, "daa/reward_acc": 0.5})
  writer.write(2, {"loss/total": 0.5})
  writer.close()
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert rows == [{"step": 1, "loss/total": 0.69, "daa/reward_acc": 0.5},
                  {"step": 2, "loss/total": 0.5}]
  ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = ea.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss/total")] == [(1, 0.69), (2, 0.5)]


def test_non_main_process_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path / "w"), is_main=False)
  writer.write(1, {"loss/total": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_dpo_aware_flops():
  cfg = model_configs.pythia("70m")
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  # Non-embedding matmuls (QKV 3D², out D², MLP 2DF per layer) plus the output projection DV.
  assert metrics.matmul_params(cfg) == n * (4 * d * d + 2 * d * f) + d * cfg.vocab_size
  per_token = metrics.forward_flops_per_token(cfg, 256)
  assert per_token == 2 * metrics.matmul_params(cfg) + 4 * n * d * 256
  live = metrics.step_flops(cfg, 1000, 256, "daa", cached_ref=False)
  cached = metrics.step_flops(cfg, 1000, 256, "daa", cached_ref=True)
  sft = metrics.step_flops(cfg, 1000, 256, "sft", cached_ref=False)
  assert live == pytest.approx(4 * per_token * 1000)   # policy fwd+bwd (3) + reference fwd (1)
  assert cached == pytest.approx(3 * per_token * 1000)
  assert sft == cached
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("cpu") is None
