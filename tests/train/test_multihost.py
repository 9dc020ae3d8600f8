"""Two processes x 4 CPU devices behave like one process x 8 devices: a pod on one machine.

Each job is `python -m daa_jax.main` in subprocesses, the way `launch/slurm.sbatch` starts
one per node: `--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i`, with
gloo cross-process collectives on CPU. Faults are real signals, injected by tests/faults.py.

  * the paper's DAA recipe (shrunk: `runlocal=True`) with its schedule checkpoints, params
    exports and held-out metrics; process 1 alone gets SIGTERM mid-run; both processes save
    the same step and exit 0; the resumed 2-process job equals one uninterrupted process;
  * a mesh (1,2,4) whose fsdp and tensor axes span the processes, with checkpoints crossing
    topologies 1 -> 2 -> 1 processes;
  * a mesh (1,1,8) whose tensor axis spans the processes: both load the same rows;
  * a SIGTERM during the cached reference log-prob pass: both processes leave at the same
    batch, nothing half-written, and the restart completes.

Tolerances: float32 sums in another reduction order (gloo all-reduce vs one process). The
module's jobs share one persistent compilation cache; it does not change numerics. (In a
2-process job only process 0 writes that cache and process 1's lookups miss, so 2-process
runs stay the expensive part.)
"""

import functools
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from daa_jax.train import checkpoint as ckpt_lib
from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.models import config as model_configs
from daa_jax.train import lora_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ["--config=configs/tiny.py:job=daa", "--config.checkpoint.every_steps=2",
         "--config.mesh=(-1,1,1)", "--config.train.eval_every=2",
         "--config.train.eval_batches=1"]
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
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + os.environ.get("DAA_TEST_XLA_EXTRA", ""),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def launch(workdir, num_processes: int, extra=(), *, cache_dir: str, log_dir: str,
           timeout: float = 300.0, flags=FLAGS, faults=None) -> list[str]:
  """Runs one job as `num_processes` local processes (8 CPU devices in all); returns logs.

  `flags` replace the tiny DPO config's; `faults` (a dict, see tests/faults.py) run the job
  through tests/faults.py, which injects real signals at chosen points.

  Every process writes to its own log file (no pipes to fill up). As soon as one process
  fails, or the deadline passes, all of them are killed (a peer of a dead process would
  otherwise wait for its collectives until jax's heartbeat timeout) and the assertion
  message carries the tail of every log.
  """
  os.makedirs(log_dir, exist_ok=True)
  port = _free_port()
  env = _env(8 // num_processes, cache_dir)
  main = ["-m", "daa_jax.main"]
  if faults:
    main = [os.path.join(REPO, "tests", "faults.py")]
    env["DAA_TEST_FAULTS"] = json.dumps(faults)
  procs, paths = [], []
  tag = f"{os.path.basename(str(workdir))}-{num_processes}p-{len(os.listdir(log_dir))}"
  for i in range(num_processes):
    # --alsologtostderr: the INFO lines the tests read (otherwise only in daa_jax.log).
    cmd = [sys.executable, *main, *flags, *extra, f"--workdir={workdir}", "--alsologtostderr"]
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


def assert_metrics_close(actual, expected, steps, what, extra_steps=(), heldout=True):
  """Every metric of `expected` at `steps` in `actual`, and no other (except at
  `extra_steps`: a preempted run also logs the step it stopped at)."""
  keys = sorted(k for k in expected if k[0] in steps)
  assert sorted(k for k in actual if k[0] in steps and (
      k in expected or k[0] not in extra_steps)) == keys, what
  assert {s for s, _ in keys} == set(steps), what
  assert not heldout or any(name == "eval/loss" for _, name in keys), what
  for key in keys:
    np.testing.assert_allclose(actual[key], expected[key], rtol=0, atol=ATOL,
                               err_msg=f"{what}: {key}")


def exported_params(workdir, step):
  """Params export of `step`, restored in this (single, 8-device) process.

  The target shardings are required: without them orbax would try the writer's topology
  (two processes) and refuse.
  """
  cfg = model_configs.pythia("tiny")
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


# The paper's DAA recipe shrunk for a CPU, as a user runs it: default schedule checkpoints
# (0.215/0.43/0.645/0.86/1 epoch of 16 steps, then the end of epoch 3), their params exports,
# held-out metrics every 8 steps, asynchronous saves.
RECIPE = ["--config=configs/daa.py:size=tiny,objective=dpo,beta=0.1,runlocal=True",
          "--config.train.eval_every=8", "--config.train.eval_batches=2",
          "--config.train.progress=False"]
RECIPE_SCHEDULE = [3, 7, 10, 14, 16, 48]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """One persistent compilation cache for the module's jobs (numerics unchanged)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_recipe_two_processes_sigterm_to_one_then_resume_equals_one_process(tmp_path,
                                                                            jax_cache):
  """(a) + (c): the recipe as 2 processes, only process 1 signalled mid-run; both save the
  same step and exit 0; resumed, the run equals one uninterrupted 1-process run: every
  metric, and every schedule step's export."""
  run = functools.partial(launch, flags=RECIPE, cache_dir=jax_cache,
                          log_dir=str(tmp_path / "logs"))
  reference, pod = tmp_path / "reference", tmp_path / "pod"
  run(reference, 1)
  assert _checkpoint_steps(reference) == RECIPE_SCHEDULE  # max_to_keep 2: all are schedule
  assert ckpt_lib.exported_steps(str(reference)) == RECIPE_SCHEDULE

  logs = run(pod, 2, faults={"sigterm_at_batch": 20, "process": 1})
  saved = [re.search(r"every process saved step (\d+)", log) for log in logs]
  assert all(saved), [log[-2000:] for log in logs]
  stopped = {int(m.group(1)) for m in saved}
  assert len(stopped) == 1, stopped  # the same step on both processes
  stop = stopped.pop()
  assert 20 <= stop < 48
  assert "SIGTERM during training" in logs[1] and "SIGTERM during" not in logs[0]
  assert _checkpoint_steps(pod)[-1] == stop
  assert ckpt_lib.exported_steps(str(pod)) == [s for s in RECIPE_SCHEDULE if s <= stop]

  logs = run(pod, 2)
  assert all(f"resume: step {stop}" in log for log in logs)
  assert ckpt_lib.exported_steps(str(pod)) == RECIPE_SCHEDULE
  expected = metrics(reference)
  logged = sorted({s for s, _ in expected})  # log_every 5, checkpoints, held-out every 8
  assert set(RECIPE_SCHEDULE) | {8, 16, 24, 32, 40, 45} <= set(logged), logged
  assert_metrics_close(metrics(pod), expected, logged, "2 processes (SIGTERM, resume)",
                       extra_steps=(stop,))
  for step in RECIPE_SCHEDULE:
    assert_params_close(exported_params(pod, step), exported_params(reference, step),
                        f"export {step}")


def test_ctrl_c_to_one_of_two_processes_is_a_preemption_both_save_then_resume(tmp_path,
                                                                             jax_cache):
  """Ctrl-C (SIGINT) on process 1 only: agreed like SIGTERM, both processes save the same step
  and exit 0; the resumed run finishes with every schedule export and each step logged once."""
  run = functools.partial(launch, flags=RECIPE, cache_dir=jax_cache,
                          log_dir=str(tmp_path / "logs"))
  pod = tmp_path / "pod"
  logs = run(pod, 2, faults={"sigint_at_batch": [20], "process": 1})
  saved = [re.search(r"every process saved step (\d+)", log) for log in logs]
  assert all(saved), [log[-2000:] for log in logs]
  stopped = {int(m.group(1)) for m in saved}
  assert len(stopped) == 1, stopped
  stop = stopped.pop()
  assert 20 <= stop < 48
  assert "SIGINT (Ctrl-C) during training" in logs[1], logs[1][-2000:]
  assert "SIGINT" not in logs[0]
  assert ckpt_lib.exported_steps(str(pod)) == [s for s in RECIPE_SCHEDULE if s <= stop]
  logs = run(pod, 2)
  assert all(f"resume: step {stop}" in log for log in logs)
  assert ckpt_lib.exported_steps(str(pod)) == RECIPE_SCHEDULE
  metrics(pod)  # asserts each (step, metric) once after the resume


def test_mesh_spanning_processes_and_checkpoints_cross_over(tmp_path, jax_cache):
  """(b): mesh (1,2,4) — fsdp and tensor axes span the two processes — against one process
  with the same mesh, while checkpoints cross topologies: 1 -> 2 -> 1 processes."""
  flags = [f for f in FLAGS if not f.startswith("--config.mesh=")] + ["--config.mesh=(1,2,4)"]
  run = lambda workdir, n, steps: launch(
      workdir, n, [f"--config.train.max_steps={steps}"], flags=flags, cache_dir=jax_cache,
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
    assert "mesh={'data': 1, 'fsdp': 2, 'tensor': 4}" in log, log[-3000:]
  assert _checkpoint_steps(crossing) == [2, 4]
  # Steps 3-4 come from the 2 processes and are logged once each: process 0 alone writes.
  assert_metrics_close(metrics(crossing), expected, range(1, 5), "2 processes vs 1, steps 1-4")

  logs = run(crossing, 1, 6)
  assert "resume: step 4" in logs[0], logs[0][-3000:]
  assert_metrics_close(metrics(crossing), expected, range(1, 7),
                       "1 -> 2 -> 1 processes vs 1 process, steps 1-6")
  assert_params_close(exported_params(crossing, 6), exported_params(reference, 6),
                      "params export at step 6")


def _ref_cache(workdir) -> np.ndarray:
  files = sorted(glob.glob(os.path.join(workdir, "cache", "ref_logps_train_*.npy")))
  assert len(files) == 1, files
  return np.load(files[0])


def test_sigterm_in_reference_pass_then_restart_completes_with_the_cache(tmp_path, jax_cache):
  """(e): a SIGTERM to one process during the cached reference pass stops both at the same
  batch (exit 0, no cache, no checkpoint); the restart computes the cache and trains, equal
  to one process."""
  cached = ["--config.objective.reference=cached", "--config.train.max_steps=4",
            "--config.train.eval_every=4", "--config.train.eval_batches=1"]
  run = functools.partial(launch, extra=cached, cache_dir=jax_cache,
                          log_dir=str(tmp_path / "logs"))
  reference, pod = tmp_path / "reference", tmp_path / "pod"
  run(reference, 1)

  logs = run(pod, 2, faults={"sigterm_in_reference_pass": 2, "process": 0})
  for log in logs:
    assert "daa_jax: SIGTERM during the reference log-prob pass: nothing was saved yet" in log, (
        log[-2000:])
    assert "the reference log-prob cache is written only when complete" in log
  assert not glob.glob(os.path.join(pod, "cache", "*"))  # no half-written cache
  assert not os.path.exists(os.path.join(pod, "checkpoints")) or not _checkpoint_steps(pod)

  run(pod, 2)
  np.testing.assert_allclose(_ref_cache(pod), _ref_cache(reference), rtol=0, atol=ATOL)
  assert_metrics_close(metrics(pod), metrics(reference), range(1, 5),
                       "cached reference, 2 processes after a SIGTERM vs 1 process")


def test_sft_two_processes_match_one(tmp_path, jax_cache):
  """SFT, the other training job, as 2 processes vs 1: metrics and the exported params."""
  flags = ["--config=configs/tiny.py:job=sft", "--config.checkpoint.every_steps=2",
           "--config.checkpoint.epoch_fractions=(0.25,)", "--config.train.max_steps=4"]
  run = functools.partial(launch, flags=flags, cache_dir=jax_cache,
                          log_dir=str(tmp_path / "logs"))
  reference, pod = tmp_path / "reference", tmp_path / "pod"
  run(reference, 1)
  run(pod, 2)
  expected = metrics(reference)
  assert any(name == "sft/nll" for _, name in expected)
  assert_metrics_close(metrics(pod), expected, range(1, 5), "SFT, 2 processes vs 1",
                       heldout=False)
  assert ckpt_lib.exported_steps(str(pod)) == ckpt_lib.exported_steps(str(reference)) == [4]
  assert_params_close(exported_params(pod, 4), exported_params(reference, 4), "SFT export")


def test_tensor_axis_across_processes_feeds_every_replica_the_same_rows(tmp_path, jax_cache):
  """Mesh (1,1,8): the tensor axis spans both processes and the batch is not split, so both
  processes hold replicas of every row and must load the same ones (not half each): the
  2-process job equals one process, the global batch included."""
  flags = ["--config=configs/tiny.py:job=daa", "--config.mesh=(1,1,8)",
           "--config.train.max_steps=2", "--config.train.eval_every=0",
           "--config.checkpoint.epoch_fractions=()"]
  run = functools.partial(launch, flags=flags, cache_dir=jax_cache,
                          log_dir=str(tmp_path / "logs"))
  reference, pod = tmp_path / "reference", tmp_path / "pod"
  run(reference, 1)
  run(pod, 2)
  assert_metrics_close(metrics(pod), metrics(reference), range(1, 3),
                       "mesh (1,1,8), 2 processes vs 1", heldout=False)


def test_lora_two_processes_on_a_spanning_mesh_resume_and_match_one(tmp_path, jax_cache):
  """LoRA (all linear layers, rank 4, dropout 0.1) on mesh (1,2,4): the adapters shard with
  their base kernels' fsdp/tensor axes across the two processes, and the dropout masks of the
  sharded activations are those of one process. 2 processes to step 2, then resumed
  by 2 processes to step 4 (schedule checkpoints, adapter exports, held-out metrics), equal
  one process: metrics at every step and the adapters exported at step 4."""
  flags = [f for f in FLAGS if not f.startswith("--config.mesh=")] + [
      "--config.mesh=(1,2,4)", "--config.model.lora.rank=4",
      "--config.model.lora.target=all_linear", "--config.model.lora.dropout=0.1",
      "--config.checkpoint.epoch_fractions=(0.25,)"]
  run = lambda workdir, n, steps: launch(
      workdir, n, [f"--config.train.max_steps={steps}"], flags=flags, cache_dir=jax_cache,
      log_dir=str(tmp_path / "logs"))
  reference, pod = tmp_path / "reference", tmp_path / "pod"
  run(reference, 1, 4)
  run(pod, 2, 2)
  logs = run(pod, 2, 4)
  assert all("resume: step 2" in log for log in logs), logs[0][-3000:]
  assert_metrics_close(metrics(pod), metrics(reference), range(1, 5),
                       "LoRA on mesh (1,2,4), 2 processes (resumed) vs 1")
  assert ckpt_lib.exported_steps(str(pod)) == ckpt_lib.exported_steps(str(reference))
  cfg = model_configs.pythia("tiny")
  mesh = sharding.make_mesh((-1, 1, 1))
  lo = lora_state.lora_fields()
  lo.update(rank=4, target="all_linear")
  c = ml_collections.ConfigDict({"model": {"lora": lo}})  # what adapter_layout reads
  abstract, shardings = lora_state.adapter_layout(
      c, model_lib.abstract_params(cfg), mesh, sharding.param_shardings(cfg, mesh))
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  (a, _), (b, _) = (ckpt_lib.load_params(f"{d}@4", target) for d in (pod, reference))
  assert_params_close(a, b, "LoRA adapters at step 4, 2 processes vs 1")
