"""Two processes x 4 CPU devices behave like one process x 8 devices.

Each job is `python -m daa_jax.main` in subprocesses, the way `launch/slurm.sbatch` starts
one per node: `--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`, with
gloo cross-process collectives on CPU. One chain of runs (tiny DPO, checkpoints every 2
steps, held-out metrics every 2 steps) crosses topologies at both checkpoints:

  reference:  1 process   steps 0 -> 2, then (resumed; resume is exact, test_train) 2 -> 6
  crossing:   copy of the reference's step-2 workdir
              -> 2 processes  steps 2 -> 4   (a 1-process checkpoint resumed by 2 processes)
              -> 1 process    steps 4 -> 6   (a 2-process checkpoint resumed by 1 process)

Both must log the same losses and held-out metrics (to float32 reduction order) and export
the same params. A persistent compilation cache shared by the runs makes the later
1-process compiles cache hits; it does not change numerics. (In a 2-process job only process 0
writes that cache and process 1's lookups miss, so 2-process runs stay the expensive part: the
chain has one.)
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from daa_jax import checkpoint as ckpt_lib
from daa_jax import config_lib
from daa_jax import model as model_lib
from daa_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/tiny.py:job=daa", "--config.checkpoint.every_steps=2",
         "--config.mesh=(-1,1,1)", "--config.train.eval_every=2",
         "--config.train.eval_batches=1",
         "--alsologtostderr"]  # the INFO lines asserted below (else only in daa_jax.log)
# Every logged metric, absolute. Measured: losses ~1e-7 apart, summed log-probs (|logp| ~ 30)
# ~4e-6 apart: float32 sums in another reduction order (gloo all-reduce vs one process).
ATOL = 1e-5
# Launcher environment a test machine might carry; each would switch on auto-detection.
_CLUSTER_ENV_PREFIXES = ("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "PMI_", "CLOUD_TPU")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache_dir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_ENV_PREFIXES)}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def launch(workdir, num_processes: int, extra=(), *, cache_dir: str, log_dir: str,
           timeout: float = 240.0) -> list[str]:
  """Runs one job as `num_processes` local processes (8 CPU devices in all); returns logs.

  Every process writes to its own log file (no pipes to fill up). As soon as one process
  fails, or the deadline passes, all of them are killed (a peer of a dead process would
  otherwise wait for its collectives until jax's heartbeat timeout) and the assertion
  message carries the tail of every log.
  """
  os.makedirs(log_dir, exist_ok=True)
  port = _free_port()
  env = _env(8 // num_processes, cache_dir)
  procs, paths = [], []
  tag = f"{os.path.basename(str(workdir))}-{num_processes}p-{len(os.listdir(log_dir))}"
  for i in range(num_processes):
    cmd = [sys.executable, "-m", "daa_jax.main", *FLAGS, *extra, f"--workdir={workdir}"]
    if num_processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
              f"--process_id={i}"]
    paths.append(os.path.join(log_dir, f"{tag}.p{i}.log"))
    with open(paths[-1], "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True))
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes):
        if any(codes):
          failed = f"exit codes {codes}"
        break
      if any(c not in (None, 0) for c in codes):
        failed = f"exit codes {codes} (killed the others)"
        break
      if time.monotonic() > deadline:
        failed = f"timed out after {timeout:.0f}s (exit codes {codes})"
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # its own session: the process and its children
        p.wait()
  logs = []
  for path in paths:
    with open(path) as f:
      logs.append(f.read())
  if failed:
    tails = "\n".join(f"--- process {i} ({paths[i]}) ---\n{log[-4000:]}"
                      for i, log in enumerate(logs))
    raise AssertionError(f"{num_processes}-process job in {workdir}: {failed}\n{tails}")
  return logs


def metrics(workdir) -> dict[tuple[int, str], float]:
  """{(step, name): value} of metrics.jsonl, perf/ timings dropped; each step logged once."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      for name, value in row.items():
        if not name.startswith("perf/"):
          assert (step, name) not in out, f"{workdir}: step {step} {name} logged twice"
          out[step, name] = value
  return out


def assert_metrics_close(actual, expected, steps, what):
  keys = sorted(k for k in expected if k[0] in steps)
  assert sorted(k for k in actual if k[0] in steps) == keys, what
  assert {s for s, _ in keys} == set(steps), what
  assert any(name == "eval/loss" for _, name in keys), what
  for key in keys:
    np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=ATOL,
                               err_msg=f"{what}: {key}")


def exported_params(workdir, step):
  """Params export `workdir/params/<step>`, restored in this (single, 8-device) process.

  The target shardings are required: without them orbax would try the writer's topology
  (two processes) and refuse.
  """
  cfg = config_lib.pythia("tiny")
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  mesh = sharding.make_mesh((-1, 1, 1))
  abstract = ckpt_lib.abstract_with_shardings(abstract, sharding.param_shardings(cfg, mesh))
  params, _ = ckpt_lib.load_params(f"{workdir}@{step}", abstract)
  return params


def assert_params_close(a, b, what):
  # Measured: weights at most ~1.3e-6 apart after 6 Adam steps (reduction order).
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), what
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape and x.dtype == y.dtype, what
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=what)


def test_two_processes_match_one_and_checkpoints_cross_over(tmp_path):
  run = lambda workdir, n, steps: launch(
      workdir, n, [f"--config.train.max_steps={steps}"], cache_dir=str(tmp_path / "jax_cache"),
      log_dir=str(tmp_path / "logs"))
  reference, crossing = tmp_path / "reference", tmp_path / "crossing"

  run(reference, 1, 2)
  shutil.copytree(reference, crossing)
  run(reference, 1, 6)
  expected = metrics(reference)

  logs = run(crossing, 2, 4)
  for i, log in enumerate(logs):  # main.py's topology line, then the restore on each process
    assert f"topology: process {i} of 2, 4 local / 8 global devices (cpu)" in log, log[-3000:]
    assert "resume: step 2" in log, log[-3000:]
  assert sorted(os.listdir(crossing / "checkpoints")) == ["2", "4"]
  # Steps 3-4 come from the 2 processes and are logged once each: process 0 alone writes.
  assert_metrics_close(metrics(crossing), expected, range(1, 5), "2 processes vs 1, steps 1-4")

  logs = run(crossing, 1, 6)
  assert "resume: step 4" in logs[0], logs[0][-3000:]
  assert_metrics_close(metrics(crossing), expected, range(1, 7),
                       "1 -> 2 -> 1 processes vs 1 process, steps 1-6")
  assert_params_close(exported_params(crossing, 6), exported_params(reference, 6),
                      "params export at step 6")
