"""attention_impl='gpu_flash' lowers for CUDA in the planner (the Triton kernel's custom call,
not a dense [B,H,L,L] softmax), on one device and under a mesh (shard_map); 'auto' resolves
to the platform's kernel in the planner's JSON."""

import importlib.util
import os
import sys

import pytest

from daa_jax.accel import devices, plan, programs
from daa_jax.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_plan import SYNTHETIC, daa_config

TRITON = "__gpu$xla.gpu.triton"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (the TPU compiler)")


def _cuda_text(config, mesh, name, micro):
  s = programs.make_setup(config, devices.make_mesh(mesh, "cuda", None), platform="cuda", **SYNTHETIC)
  fn, args = programs.build(s, name, micro)
  with devices._activate(s.mesh):  # pylint: disable=protected-access
    return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _dense_logits(text, rows, heads, length):  # the [B,H,L,L] float32 logits of the dense path
  return f"tensor<{rows}x{heads}x{length}x{length}xf32>" in text


@pytest.mark.parametrize("packing", ["fixed", True])
def test_daa_and_sft_steps_lower_the_triton_kernel_for_cuda(packing):
  config = daa_config(batch_size=4, packing=packing, packing_block=16)
  config.model.attention_impl = "gpu_flash"
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="80GB",
                     programs=["daa_live_packed", "sft"], fit=False, **SYNTHETIC)
  assert result["lowered"], {k: v.get("error") for k, v in result["programs"].items()}
  assert result["config"]["attention_kernel"] == "gpu_flash"
  # fixed: P 32 + 2R 32 = 96 slots; True: 21 + 2*17 = 55 -> 56. Tiny: 4 heads.
  length = 96 if packing == "fixed" else 56
  text = _cuda_text(config, (1, 1, 1), "daa_live_packed", 4)
  assert text.count(TRITON) >= 2 and not _dense_logits(text, 4, 4, length)
  sft = _cuda_text(config, (1, 1, 1), "sft", 4)  # 38-token rows, padded to 64 for the kernel
  assert TRITON in sft and not _dense_logits(sft, 4, 4, 38)
  config.model.attention_impl = "xla"  # the check would see the dense path
  assert _dense_logits(_cuda_text(config, (1, 1, 1), "sft", 4), 4, 4, 38)


def test_gpu_flash_lowers_per_shard_on_a_pod_mesh():
  config = daa_config(batch_size=8, packing="fixed", packing_block=16)
  config.model.attention_impl = "gpu_flash"
  result = plan.plan(config, (2, 2, 2), "cuda", device_memory="80GB",
                     programs=["daa_live_packed"], fit=True, **SYNTHETIC)
  assert result["lowered"], result["programs"]["daa_live_packed"].get("error")
  assert result["max_micro_batch"] > 0
  assert TRITON in _cuda_text(config, (2, 2, 2), "daa_live_packed", 8)
  with pytest.raises(ConfigError, match="plan it with --platform cuda"):
    plan.plan(config, (1, 4, 1), "tpu", topology="v5e:2x2", fit=False, **SYNTHETIC)


def test_auto_resolves_to_the_cuda_kernel_in_the_planner():
  config = daa_config(batch_size=4, packing=True)
  config.model.attention_impl = "auto"
  result = plan.plan(config, (1, 1, 1), "cuda", device_memory="80GB",
                     programs=["daa_live_packed"], fit=False, **SYNTHETIC)
  assert result["config"]["attention_impl"] == "auto"
  assert result["config"]["attention_kernel"] == "gpu_flash"
  assert "attention gpu_flash" in plan.table(result)


@needs_libtpu
def test_auto_resolves_to_splash_in_the_tpu_planner_and_says_when_it_cannot():
  for packing, kernel in (("fixed", "splash"), (True, "blockwise")):
    config = daa_config(batch_size=4, packing=packing, packing_block=16)
    config.model.attention_impl = "auto"
    result = plan.plan(config, (1, 4, 1), "tpu", topology="v5e:2x2",
                       programs=["daa_live_packed"], fit=False, **SYNTHETIC)
    assert result["config"]["attention_kernel"] == kernel, packing
    assert result["compiled"], result["programs"]["daa_live_packed"].get("error")
