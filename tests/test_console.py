"""The console of a job: a short summary on stdout, warnings on stderr, details in the log."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def test_a_training_run_is_quiet_and_logs_to_its_workdir(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="")  # a user's shell: no platform set
  proc = subprocess.run(
      [sys.executable, "-m", "daa_jax.main", "--config=configs/tiny.py:job=daa",
       "--config.train.max_steps=3", "--config.optim.warmup_steps=5",
       "--config.train.progress=True", f"--workdir={tmp_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout.splitlines()
  assert out[0].startswith("daa: finished at step 3, loss 0.") and len(out) <= 5, out
  assert f"metrics: {tmp_path}/metrics.jsonl" in proc.stdout
  err = [l for l in proc.stderr.split("\n") if l]  # not splitlines: tqdm's \r stays inside
  assert not [l for l in err if ABSL_LINE.match(l.split("\r")[-1])], err  # no absl INFO/WARNING prefixes
  # Backend start-up noise (jax's INFO line, libtpu's C++ warnings where libtpu is installed
  # without TPUs) goes to the log, not the terminal.
  assert not [l for l in err if "Unable to initialize backend" in l or "TPU" in l], err
  assert err[0].startswith("topology: process 0 of 1") and f"{tmp_path}/daa_jax.log" in err[0]
  warnings = [l for l in err if l.startswith("daa_jax: warning:")]
  assert len(warnings) == 1 and "config.optim.warmup_steps=5" in warnings[0]
  # Besides the topology line and the warning: only the progress bar's updates.
  others = [l for l in err[1:] if not l.startswith("daa_jax: warning:")]
  assert all(l.split("\r")[-1].startswith(f"daa {tmp_path.name}: ") for l in others), others
  log = (tmp_path / "daa_jax.log").read_text()
  assert "run: job=daa" in log and "checkpoint: saving step 3" in log
  assert "config.optim.warmup_steps=5" in log
