"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; the `slow` marker."""
import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run the tests marked slow (end-to-end studies of minutes)")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: an end-to-end study of minutes (the shrunk quickstart); skipped "
      "unless --runslow. CI (.ci/run) runs them.")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow end-to-end study (minutes): run with --runslow; "
                          ".ci/run does")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
