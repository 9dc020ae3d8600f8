"""The launch scripts: the commands they print or run, with stubs for gcloud, srun, scontrol
and python on PATH (no cloud, no cluster), and shellcheck over all of them."""

import importlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_vm.sh", "gpu.sh", "slurm.sbatch"]

STUBS = {
    # A dry run must not call gcloud; if it does, this stub fails the script loudly.
    "gcloud": 'echo "STUB gcloud called: $*" >&2; exit 97',
    "scontrol": ('[[ "$1 $2" == "show hostnames" ]] || exit 1\n'
                 'echo gpu07; echo gpu08'),
    # Prints its own command line, then runs the task command once per task, as srun would.
    "srun": ('printf "SRUN"; printf " %q" "$@"; echo\n'
             'while [[ $1 == -* ]]; do shift; done\n'
             'for ((i = 0; i < SLURM_NTASKS; i++)); do\n'
             '  SLURM_PROCID=$i SLURM_LOCALID=$((i % ${SLURM_NTASKS_PER_NODE:-1})) "$@"\n'
             'done'),
    # Prints where it runs, the environment the launchers set, and its arguments.
    "python": ('printf "TASK %q XLA_PYTHON_CLIENT_MEM_FRACTION=%s CUDA_VISIBLE_DEVICES=%s" '
               '"$PWD" "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" "${CUDA_VISIBLE_DEVICES:-}"\n'
               'printf " %q" python "$@"; echo'),
}


@pytest.fixture
def stub_path(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in STUBS.items():
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
  return f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"


def sh(script, args, path, env=None, cwd=REPO):
  """Runs a launch script with a clean environment; returns (exit code, stdout lines, stderr)."""
  full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "TMPDIR": "/tmp"}
  full_env.update(env or {})
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=30)
  assert "STUB gcloud called" not in proc.stderr, proc.stderr
  return proc.returncode, proc.stdout.splitlines(), proc.stderr


def remote_command(argv):
  """The shell command of a `gcloud ... ssh --command CMD` line."""
  return argv[argv.index("--command") + 1]


TPU_ARGS = ["--dry-run", "--name", "daa-pod", "--zone", "us-central2-b",
            "--accelerator", "v4-32", "--spot",
            "--config", "configs/daa.py:size=1b,objective=ipo,beta=0.05",
            "--workdir", "gs://bucket/runs/ipo",
            "--setup", "gcloud storage cp -r gs://bucket/tldr ~/tldr", "--",
            "--config.mesh=(1,-1,1)", "--config.data.source=my data/pairs.jsonl"]


def test_tpu_vm_dry_run_prints_create_copy_install_run_fetch_delete(stub_path):
  code, lines, err = sh("tpu_vm.sh", TPU_ARGS, stub_path)
  assert code == 0, err
  cmds = [shlex.split(line) for line in lines]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert cmds[0] == tpu + ["create", "daa-pod", "--zone=us-central2-b",
                           "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
  ssh = [c for c in cmds if c[:5] == tpu + ["ssh"]]
  assert ssh and all(c[5] == "daa-pod" and "--worker=all" in c and "--zone=us-central2-b" in c
                     for c in ssh)
  remote = [remote_command(c) for c in ssh]

  # The code: this checkout as a tarball, copied to every worker and unpacked there.
  scp = [c for c in cmds if c[:5] == tpu + ["scp"]]
  assert scp[0][6] == "daa-pod:daa_jax_src.tar.gz" and "--worker=all" in scp[0]
  assert "tar -xzf daa_jax_src.tar.gz -C daa_jax" in remote[0]

  # The README's install line, then the TPU extra (and gcsfs for the gs:// workdir).
  install = remote[1]
  assert "pip install -e . &&" in install
  assert 'pip install -e ".[tpu]"' in install and "gcsfs" in install

  assert remote[2] == "gcloud storage cp -r gs://bucket/tldr ~/tldr"  # --setup, after install

  # The run: the same daa_jax.main command on every worker, user flags passed through intact.
  run = remote[3]
  assert run.startswith("cd daa_jax && set -o pipefail && ")
  main = shlex.split(run.split(" && ")[2].split(" 2>&1 | tee ")[0])
  assert main == ["python3", "-m", "daa_jax.main",
                  "--config=configs/daa.py:size=1b,objective=ipo,beta=0.05",
                  "--workdir=gs://bucket/runs/ipo", "--distributed=on",
                  "--config.mesh=(1,-1,1)", "--config.data.source=my data/pairs.jsonl"]
  assert run.endswith("2>&1 | tee ~/daa_jax_run.log")

  # Results, then the VM is deleted (always last).
  assert ["gcloud", "storage", "cp", "gs://bucket/runs/ipo/config.json",
          "gs://bucket/runs/ipo/metrics.jsonl", "results/daa-pod/"] in cmds
  assert scp[-1][5:] == ["daa-pod:daa_jax_run.log", "results/daa-pod/", "--zone=us-central2-b",
                         "--worker=0"]
  assert cmds[-1] == tpu + ["delete", "daa-pod", "--zone=us-central2-b", "--quiet"]
  order = [next(i for i, c in enumerate(cmds) if pred(c)) for pred in (
      lambda c: "create" in c, lambda c: "scp" in c, lambda c: "pip" in " ".join(c),
      lambda c: "daa_jax.main" in " ".join(c), lambda c: c[:3] == ["gcloud", "storage", "cp"],
      lambda c: "delete" in c)]
  assert order == sorted(order)


def test_tpu_vm_clone_reuse_keep_and_project(stub_path):
  args = ["--dry-run", "--name", "v5e", "--zone", "us-west4-a", "--accelerator",
          "v5litepod-8", "--version", "v2-alpha-tpuv5-lite", "--project", "my-proj",
          "--config", "configs/daa.py:size=410m", "--workdir", "gs://b/r",
          "--repo", "https://github.com/example/daa_jax.git", "--ref", "v0.1", "--reuse",
          "--keep"]
  code, lines, err = sh("tpu_vm.sh", args, stub_path)
  assert code == 0, err
  cmds = [shlex.split(line) for line in lines]
  assert not any("create" in c or "delete" in c for c in cmds)  # --reuse, --keep
  assert "keeping v5e" in err
  ssh = [c for c in cmds if "ssh" in c]
  assert all("--project=my-proj" in c for c in ssh)
  assert remote_command(ssh[0]) == ("rm -rf daa_jax && git clone "
                                    "https://github.com/example/daa_jax.git daa_jax && "
                                    "git -C daa_jax checkout v0.1")
  assert not any("tar" in c for c in cmds)


@pytest.mark.parametrize("args,message", [
    (["--workdir", "/tmp/run"], "use gs://BUCKET/PATH"),
    (["--workdir", "gs://b/r", "--bogus"], "unknown argument '--bogus'"),
    ([], "are required"),
])
def test_tpu_vm_rejects_bad_arguments(stub_path, args, message):
  base = ["--dry-run", "--name", "n", "--zone", "z", "--accelerator", "v4-8",
          "--config", "configs/tiny.py"]
  code, _, err = sh("tpu_vm.sh", (base + args) if args else ["--dry-run"], stub_path)
  assert code == 2 and message in err, err


def test_gpu_one_process_drives_all_gpus(stub_path):
  args = ["--config", "configs/daa.py:size=1b", "--workdir", "runs/dpo 1b", "--gpus",
          "0,1,2,3", "--fsdp", "--", "--config.train.batch_size=64"]
  code, lines, err = sh("gpu.sh", ["--dry-run"] + args, stub_path)
  assert code == 0, err
  assert shlex.split(lines[0]) == [
      "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "CUDA_VISIBLE_DEVICES=0,1,2,3",
      "python", "-m", "daa_jax.main", "--config=configs/daa.py:size=1b",
      "--workdir=runs/dpo 1b", "--distributed=off", "--config.mesh=(1,-1,1)",
      "--config.train.batch_size=64"]
  # For real (python is the stub): the environment reaches the process, in the repository.
  code, lines, err = sh("gpu.sh", args + ["--mem-fraction", "0.5"], stub_path, cwd="/")
  assert code == 0, err
  task = shlex.split(lines[0])
  assert task[1:4] == [REPO, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
                       "CUDA_VISIBLE_DEVICES=0,1,2,3"]
  assert task[-2:] == ["--mem-fraction", "0.5"]  # after --: daa_jax.main's, untouched
  code, lines, err = sh("gpu.sh", args[:6] + ["--mem-fraction", "0.5"], stub_path)
  assert code == 0, err
  assert shlex.split(lines[0])[2] == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5"


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": REPO}


def test_slurm_one_task_per_node(stub_path, tmp_path):
  env = dict(SLURM_ENV, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1")
  flags = ["--config=configs/daa.py:size=1b", "--workdir=/shared/runs/dpo",
           "--config.mesh=(-1,1,1)"]
  code, lines, err = sh("slurm.sbatch", flags, stub_path, env=env, cwd=str(tmp_path))
  assert code == 0, err
  assert "coordinator gpu07:24242" in err
  srun = shlex.split(lines[0])
  assert srun[:3] == ["SRUN", "--kill-on-bad-exit=1", "bash"]
  tasks = [shlex.split(line) for line in lines[1:]]
  assert len(tasks) == 2
  for i, task in enumerate(tasks):
    # The tasks run in the submit directory (the repository), whatever sbatch's cwd.
    assert task[:3] == ["TASK", REPO, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"]
    assert task[4:] == ["python", "-m", "daa_jax.main", *flags,
                        "--coordinator_address=gpu07:24242", "--num_processes=2",
                        f"--process_id={i}"]


def test_slurm_one_task_per_gpu_and_dry_run(stub_path):
  env = dict(SLURM_ENV, SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2", DAA_PORT="31337")
  flags = ["--config=configs/tiny.py", "--workdir=/shared/t"]
  code, lines, err = sh("slurm.sbatch", flags, stub_path, env=env)
  assert code == 0, err
  tasks = [shlex.split(line)[4:] for line in lines[1:]]
  assert [t[-2:] for t in tasks] == [[f"--process_id={i}", f"--local_device_ids={i % 2}"]
                                     for i in range(4)]
  assert all("--coordinator_address=gpu07:31337" in t and "--num_processes=4" in t
             for t in tasks)
  code, lines, err = sh("slurm.sbatch", flags, stub_path, env=dict(env, DAA_DRY_RUN="1"))
  assert code == 0 and len(lines) == 1 and lines[0].startswith("srun --kill-on-bad-exit=1 ")
  assert "--num_processes=4" in lines[0]


def test_slurm_outside_a_job_fails_with_a_message(stub_path):
  code, _, err = sh("slurm.sbatch", ["--config=configs/tiny.py"], stub_path)
  assert code == 2 and "run me with sbatch" in err


def test_distributed_off_keeps_one_process_inside_a_slurm_allocation(tmp_path):
  # gpu.sh passes --distributed=off: several SLURM tasks in the environment (an salloc) must
  # not make main.py call jax.distributed.initialize(). A bad beta ends the job right after
  # the topology line, before any compilation.
  env = dict(os.environ, JAX_PLATFORMS="cpu", SLURM_NTASKS="2", SLURM_JOB_ID="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 "
             + os.environ.get("DAA_TEST_XLA_EXTRA", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "daa_jax.main", "--config=configs/tiny.py:job=daa",
       "--config.objective.beta=-1", f"--workdir={tmp_path}", "--distributed=off"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "topology: process 0 of 1, 2 local / 2 global devices (cpu)" in proc.stderr
  assert "config.objective.beta=-1" in proc.stderr


def test_shellcheck_passes():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install -y shellcheck; .ci/run "
                "installs it)")
  # -x: follow `source common.sh` (the shared helpers), which is linted too.
  proc = subprocess.run(["shellcheck", "--shell=bash", "-x", *SCRIPTS, "common.sh"], cwd=LAUNCH,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def fake_gcs(monkeypatch):
  """gs:// through etils.epath -> fsspec, backed by memory, without append (like gcsfs)."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("epath would use tf.io.gfile for gs://, not fsspec")
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close  # epath passes it for gcsfs
      super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
      return super()._open(path, mode.replace("a", "w"), **kwargs)  # GCS: no append

  # Private hooks (fsspec's registry, epath's filesystem cache), restored after the test.
  registry = importlib.import_module("fsspec.registry")._registry
  for name in FakeGCS.protocol:
    monkeypatch.setitem(registry, name, FakeGCS)
  clear = type(backend.fsspec_backend)._get_filesystem.cache_clear
  clear()
  yield FakeGCS.store
  clear()


def test_gcs_workdir_config_and_metrics_go_through_epath(fake_gcs, tmp_path):
  from daa_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from daa_jax.train import loop as train  # pylint: disable=g-import-not-at-top
  from daa_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from daa_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  def tiny(arg="job=daa"):
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs",
                                                                       "tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)

  workdir = "gs://bucket/runs/dpo"
  train._write_config(tiny(), workdir)  # pylint: disable=protected-access
  assert json.loads(fake_gcs[f"{workdir}/config.json"].getvalue())["job"] == "daa"
  with pytest.raises(ConfigError, match="different config.objective"):
    train._write_config(tiny("job=daa,objective=ipo"), workdir)  # pylint: disable=protected-access

  # metrics.jsonl survives a resume (a second writer) although GCS cannot append.
  for steps in ([1, 2], [3]):
    writer = metrics_lib.MetricsWriter(workdir, is_main=True, tensorboard=False)
    for step in steps:
      writer.write(step, {"loss/total": 0.5})
    writer.close()
  rows = metrics_lib.read_jsonl(f"{workdir}/metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3]

  # The tokenized-data cache uses local file APIs: with a gs:// workdir it stays local.
  root = pipeline._cache_root(tiny().data, workdir)  # pylint: disable=protected-access
  assert "://" not in root and os.path.isabs(root)
