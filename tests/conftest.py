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
  parser.addoption("--runstudy", action="store_true", default=False,
                   help="also run the tests marked study (the :full quickstart, ~30 min on 2 "
                   "cores: too long for CI)")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: an end-to-end study of minutes (the shrunk quickstart); skipped "
      "unless --runslow. CI (.ci/run) runs them.")
  config.addinivalue_line(
      "markers", "study: the README's larger study end to end (~30 min on 2 cores); skipped "
      "unless --runstudy. Too long for CI's 30 minutes; run it before a release.")


def pytest_collection_modifyitems(config, items):
  skip_slow = pytest.mark.skip(reason="slow end-to-end study (minutes): run with --runslow; "
                               ".ci/run does")
  skip_study = pytest.mark.skip(reason="the :full study (~30 min on 2 cores): run with "
                                "--runstudy; too long for CI")
  for item in items:
    # Markers, not keywords: a test's keywords include its directory's name (tests/study/).
    if item.get_closest_marker("study") and not config.getoption("--runstudy"):
      item.add_marker(skip_study)
    elif item.get_closest_marker("slow") and not config.getoption("--runslow"):
      item.add_marker(skip_slow)
