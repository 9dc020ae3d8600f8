"""The benchmark CLI: a tiny shape for 2 steps emits one valid JSON line with the keys."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from daa_jax.accel import bench
from daa_jax.train import metrics
from daa_jax.models import config as model_configs
from daa_jax.accel import compare as compare_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = ("pairs_per_s", "tokens_per_s", "mfu", "peak_mem_bytes", "compile_s",
            "step_s_median", "model_flops", "device_kind", "model", "what", "pairs",
            "prompt_len", "response_len", "packing", "dtype", "steps", "optimizer")
TINY = dict(model="tiny", pairs=2, prompt_len=6, response_len=4, new_tokens=3, steps=2,
            warmup=1)


def test_cli_emits_one_json_line_and_appends_to_out(tmp_path):
  out = tmp_path / "bench.jsonl"
  argv = [sys.executable, "-m", "daa_jax.accel.bench", "--model", "tiny", "--what", "train",
          "--pairs", "2", "--prompt_len", "6", "--response_len", "4", "--steps", "2",
          "--warmup", "1", "--packing", "--peak_tflops", "1", "--out", str(out)]
  proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert len(lines) == 1, proc.stdout  # stdout is the bare JSON line, nothing else
  result = json.loads(lines[0])
  assert result["peak_tflops"] == 1.0 and result["peak_source"] == "--peak_tflops"
  assert "peak_flops" not in result
  assert set(REQUIRED) <= set(result)
  assert result["packing"] is True and result["packed_shape"] == [2, 16]
  assert len(result["step_s_all"]) == 2
  assert result["mfu"] == pytest.approx(result["model_flops"] / result["step_s_median"] / 1e12)
  # tokens/s counts both sequences of every pair, like the PyTorch baseline.
  assert result["tokens_per_s"] == pytest.approx(2 * 2 * (6 + 4) / result["step_s_median"])
  assert json.loads(out.read_text()) == result


@pytest.mark.parametrize("what,packing", [("train_cached_ref", True), ("sft", False),
                                          ("sample", False)])
def test_every_workload_runs(what, packing):
  result = bench.run(bench.Workload(what=what, packing=packing, **TINY))
  json.dumps(result)  # JSON-able
  assert set(REQUIRED) <= set(result)
  assert result["step_s_median"] > 0 and result["peak_mem_bytes"] > 0
  assert result["mfu"] is None  # CPU: no known peak unless --peak_tflops
  assert result["peak_tflops"] is None and "--peak_tflops" in result["peak_source"]
  if what == "sample":
    assert result["tokens_per_s"] == pytest.approx(2 * 3 / result["step_s_median"])
  if what == "train_cached_ref":
    # No reference forward: policy forward + backward of the two-row workload (2·2 rows).
    expected = metrics.step_flops(model_configs.pythia("tiny"), 2 * 2 * 10, 10, "daa", True)
    assert result["model_flops"] == pytest.approx(expected)
    assert result["executed_flops"] < result["model_flops"]  # packed: prompt computed once


def test_baseline_results_are_parsed(tmp_path):
  stub = tmp_path / "fake_baseline.py"
  stub.write_text("print('[plain] step 0 1.0s')\n"
                  "print('RESULT_JSON ' + __import__('json').dumps({'bench': 'torch_dpo_step', "
                  "'runs': [{'impl': 'plain', 'median_s': 2.0, 'tokens_per_s': 5.0}]}))\n")
  res = compare_lib._run_child("torch_plain", [sys.executable, str(stub)], 60)  # pylint: disable=protected-access
  assert res["step_s"] == 2.0 and res["tokens_per_s"] == 5.0
  broken = tmp_path / "broken.py"
  broken.write_text("raise SystemExit(3)\n")
  assert "rc=3" in compare_lib._run_child("x", [sys.executable, str(broken)], 60)["error"]  # pylint: disable=protected-access


def test_gpu_grid_script_passes_shellcheck_and_runs_in_smoke_mode(tmp_path):
  script = os.path.join(REPO, "launch", "bench_gpu.sh")
  if shutil.which("shellcheck") is not None:
    lint = subprocess.run(["shellcheck", "--shell=bash", script], capture_output=True,
                          text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout
  # SMOKE: the same grid on tiny models; a short budget runs the first items, skips the rest.
  env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), BUDGET_S="35")
  proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=120,
                        env=env, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / "bench_gpu.jsonl").read_text().splitlines()]
  assert rows[0]["model"] == "tiny" and rows[0]["packing"] and "pairs_per_s" in rows[0]
  assert rows[-1]["error"].startswith("skipped")  # past the budget, recorded, not run
  assert len(rows) == 8  # every item of the grid has a line


def test_lora_vs_full_compare_reports_step_time_and_memory_of_each(tmp_path):
  """`compare --variants train,train+lora4`: both alternate as their own processes and the
  JSON's summary carries each one's step time, peak memory and optimizer-state bytes."""
  out = tmp_path / "cmp.jsonl"
  argv = [sys.executable, "-m", "daa_jax.bench", "compare", "--model", "tiny", "--pairs", "2",
          "--prompt_len", "6", "--response_len", "4", "--steps", "1", "--warmup", "1",
          "--rounds", "1", "--optimizer", "adamw", "--variants", "train,train+lora4",
          "--no_baselines", "--out", str(out)]
  proc = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(out.read_text())["summary"]
  full, lora = summary["train"], summary["train+lora4"]
  cfg = model_configs.pythia("tiny")
  h, n = cfg.hidden_size, cfg.num_hidden_layers
  # attention preset on GPT-NeoX: query_key_value [h, 3h] and dense [h, h], A [in,4] B [4,out]
  adapters = n * 4 * ((h + 3 * h) + (h + h))
  assert lora["n_trained_params_median"] == adapters
  from daa_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  assert full["n_trained_params_median"] == model_lib.param_count(
      model_lib.abstract_params(cfg))
  # AdamW's two float32 moments per trained entry (+ a step count).
  for r, count in ((full, full["n_trained_params_median"]), (lora, adapters)):
    assert abs(r["opt_state_bytes_median"] - 8 * count) < 64
    assert r["peak_mem_bytes_median"] > 0 and r["step_s_median"] > 0
  assert compare_lib.variant_flags("train+lora16+scan") == [
      "--what", "train", "--lora_rank", "16", "--scan_layers"]
  with pytest.raises(ValueError, match="loraR"):
    compare_lib.variant_flags("train+lora")
