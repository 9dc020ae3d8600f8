"""Shared by the tests that run the command line or build the tiny config (import after
`sys.path.insert(0, <tests dir>)`, as tests/family_configs.py is)."""

import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(args, faults=None, check=True):
  """`python -m daa_jax.main ARGS` on 8 CPU devices in the repo root, or through
  tests/faults.py with `faults` injected; raises with the stderr tail unless `check=False`."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             + os.environ.get("DAA_TEST_XLA_EXTRA", ""),
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "daa_jax.main"]
  if faults:
    cmd = [sys.executable, os.path.join(REPO, "tests", "faults.py")]
    env["DAA_TEST_FAULTS"] = json.dumps(faults)
  proc = subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def tiny(arg="job=daa", **updates):
  """configs/tiny.py's config with dotted `updates` ({'objective.gamma': 0.1, ...})."""
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  with c.unlocked():
    for key, value in updates.items():
      node = c
      *path, last = key.split(".")
      for part in path:
        node = node[part]
      node[last] = value
  return c
