"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; the `slow` marker."""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest



def _collective_timeout_flag() -> str:
  """XLA:CPU aborts a program whose 8 fake devices do not all reach a collective within 40 s,
  which a loaded 2-core machine running two test workers and their subprocesses can exceed
  (a 1-process job died so in a full-suite run). The flag raising that limit, where this
  jaxlib knows it (an unknown XLA flag is fatal): probed once, kept in the environment for
  xdist workers and the tests' subprocesses (`DAA_TEST_XLA_EXTRA`)."""
  if "DAA_TEST_XLA_EXTRA" not in os.environ:
    flag = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
        env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"), timeout=300)
    os.environ["DAA_TEST_XLA_EXTRA"] = flag if probe.returncode == 0 else ""
  return os.environ["DAA_TEST_XLA_EXTRA"]


os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    _collective_timeout_flag()]).strip()
# One persistent XLA compilation cache for the session's processes (pytest workers and the
# CLI jobs tests launch): the tiny configs recompile the same programs in dozens of fresh
# processes (a 4-step tiny DAA run: 7.7 s cold, 3.7 s warm). Programs and results are the
# same with or without it. A cache dir set by the caller wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="daa_jax_tests_xla_")
  os.environ["DAA_TEST_OWN_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
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


def pytest_unconfigure(config):
  # The controller (not an xdist worker) removes the cache dir it made, after every worker.
  own = os.environ.get("DAA_TEST_OWN_XLA_CACHE")
  if own and not hasattr(config, "workerinput"):
    shutil.rmtree(own, ignore_errors=True)
