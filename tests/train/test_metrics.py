"""Metrics: JSONL + TensorBoard event files, and the DPO-aware FLOP accounting."""

import os

import pytest

from daa_jax.train import metrics
from daa_jax.models import config as model_configs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_wandb_offline_logs_every_scalar_to_one_run_per_workdir(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = metrics.MetricsWriter(str(tmp_path), is_main=True, wandb_project="daa_jax_test",
                                 config={"job": "daa", "objective": {"beta": 0.1}})
  writer.write(1, {"loss/total": 0.6931, "daa/reward_acc": 0.5, "note": "text"})
  writer.write(2, {"loss/total": 0.4321})
  writer.close()
  (run,) = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
  (records,) = [f for f in os.listdir(tmp_path / "wandb" / run) if f.endswith(".wandb")]
  data = (tmp_path / "wandb" / run / records).read_bytes()
  # The run's record file holds the scalars and the config (protobuf: keys and JSON values
  # are stored as plain bytes).
  for needle in (b"loss/total", b"daa/reward_acc", b"0.6931", b"0.4321", b"objective"):
    assert needle in data, needle
  assert b"text" not in data  # only scalars are logged
  # The same workdir maps to the same run id: a resumed run continues it.
  again = metrics.MetricsWriter(str(tmp_path), is_main=True, wandb_project="daa_jax_test")
  again.close()
  ids = {f for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")
         for f in os.listdir(tmp_path / "wandb" / d) if f.endswith(".wandb")}
  assert ids == {records}  # run-<id>.wandb: one id for both


def test_wandb_off_never_imports_it_and_set_without_it_is_a_config_error(tmp_path, monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  writer = metrics.MetricsWriter(str(tmp_path), is_main=True)  # log.wandb="" (the default)
  writer.write(1, {"loss/total": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "wandb")
  config = config_lib.load_sibling(os.path.join(REPO, "configs", "x.py"), "tiny", "job=daa")
  assert config.log.wandb == ""
  config_lib.validate(config, 1)
  config.log.wandb = "my-project"
  with pytest.raises(ConfigError, match=r"config\.log\.wandb='my-project'.*not installed.*"
                                        r"pip install -e \"\.\[wandb\]\".*"
                                        r"--config\.log\.wandb=''"):
    config_lib.validate(config, 1)


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
