"""attention_impl='auto': the dense path on CPU (named in the run's summary, config.json and
console line, with the same losses as 'xla'); splash on TPU, gpu_flash on CUDA, and blockwise
where the platform's kernel cannot run the config (packing=True on TPU, soft-capping on CUDA,
sliding windows)."""

import json
import os
import sys

import pytest

from daa_jax import console
from daa_jax.errors import ConfigError
from daa_jax.train import attention_config
from daa_jax.train import init as init_lib
from daa_jax.train import loop as train

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli_helpers import tiny
from family_configs import family_configs

CONFIGS = family_configs(window=4)


def test_auto_runs_the_dense_path_on_cpu_and_the_run_says_so(tmp_path):
  auto = train.run(tiny(**{"train.max_steps": 2, "model.attention_impl": "auto"}),
                   str(tmp_path / "auto"))
  xla = train.run(tiny(**{"train.max_steps": 2, "model.attention_impl": "xla"}),
                  str(tmp_path / "xla"))
  assert auto["attention_kernel"] == "xla" == xla["attention_kernel"]
  assert auto["loss/total"] == xla["loss/total"]
  with open(tmp_path / "auto" / "config.json") as f:
    model = json.load(f)["model"]
  assert model["attention_impl"] == "auto" and model["attention_kernel"] == "xla"
  assert "attention xla" in console.summary_text(tiny(), str(tmp_path / "auto"), auto)


@pytest.mark.parametrize("platform,job,packing,kernel", [
    ("cpu", "daa", True, "xla"),
    ("tpu", "daa", "fixed", "splash"),
    ("tpu", "daa", False, "splash"),
    ("tpu", "sft", True, "splash"),  # SFT rows are plain segments: splash takes them
    ("tpu", "daa", True, "blockwise"),  # splash needs one static mask per row
    ("gpu", "daa", True, "gpu_flash"),  # jax's name for CUDA
    ("cuda", "daa", "fixed", "gpu_flash"),
])
def test_auto_picks_the_platforms_kernel(platform, job, packing, kernel):
  got, reason = attention_config.resolve_auto(CONFIGS["llama_gqa3"], platform, job, packing)
  assert got == kernel, reason
  assert ("packing='fixed'" in reason) == (kernel == "blockwise")


def test_auto_avoids_kernels_that_cannot_run_the_model():
  gemma = CONFIGS["gemma2_softcap"]  # soft-capping and 4-token sliding windows
  assert attention_config.resolve_auto(gemma, "cuda", "daa", "fixed")[0] == "blockwise"
  # Splash runs windows and the cap (tests/models/test_splash.py): auto keeps it on TPU.
  assert attention_config.resolve_auto(gemma, "tpu", "daa", "fixed")[0] == "splash"
  no_window = gemma.replace(sliding_window=gemma.max_position_embeddings)
  assert attention_config.resolve_auto(no_window, "tpu", "daa", "fixed")[0] == "splash"
  got, reason = attention_config.resolve_auto(no_window, "cuda", "daa", "fixed")
  assert got == "blockwise" and "soft-capping" in reason
  assert attention_config.resolve_auto(CONFIGS["mistral_window"], "tpu", "sft", True)[0] == (
      "splash")
  got, reason = attention_config.resolve_auto(CONFIGS["mistral_window"], "cuda", "sft", True)
  assert got == "blockwise" and "sliding_window=4" in reason


def test_the_run_model_config_resolves_auto_for_the_given_platform():
  config = tiny(**{"model.attention_impl": "auto", "train.packing": "fixed"})
  kernels = {p: init_lib.model_config(config, platform=p).attention_impl
             for p in ("cpu", "tpu", "cuda")}
  assert kernels == {"cpu": "xla", "tpu": "splash", "cuda": "gpu_flash"}
  config.model.attention_impl = "blockwise"  # anything but 'auto' is kept
  assert init_lib.model_config(config, platform="tpu").attention_impl == "blockwise"


def test_gpu_flash_with_soft_capping_is_refused_when_the_run_config_is_built(tmp_path):
  gemma = {"model_type": "gemma2", "vocab_size": 97, "hidden_size": 40,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 12, "intermediate_size": 72, "max_position_embeddings": 512,
           "sliding_window": 512, "query_pre_attn_scalar": 20,
           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
           "rms_norm_eps": 1e-6}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(gemma, f)
  config = tiny(**{"hf_model": str(tmp_path), "model.attention_impl": "gpu_flash"})
  with pytest.raises(ConfigError, match=r"attention_impl='gpu_flash'.*soft-capping"):
    init_lib.model_config(config)
  config.model.attention_impl = "auto"  # on CUDA auto avoids it; the cap stays exact
  assert init_lib.model_config(config, platform="cuda").attention_impl == "blockwise"
