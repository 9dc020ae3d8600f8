"""The README's own-data commands, as typed there, from another working directory."""

import json
import os
import random
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small sizes through the documented overrides (each command gets them after its own flags).
SMALL = {"sft": ["--config.model.size=tiny", "--config.train.max_steps=2",
                 "--config.train.batch_size=16", "--config.optim.warmup_steps=0"],
         "daa": ["--config.train.max_steps=2", "--config.train.batch_size=16",
                 "--config.train.grad_accum=1", "--config.optim.warmup_steps=0"],
         "eval": ["--config.eval.num_prompts=4", "--config.eval.num_pairs=16"]}


def _own_data_commands():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  section = text.split("Your own preference pairs", 1)[1]
  block = re.search(r"```\n(.*?)```", section, re.S).group(1)
  return [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _pairs(path, n=200):
  rng = random.Random(0)
  words = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima".split()
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      say = lambda k: " ".join(rng.choice(words) for _ in range(k))
      f.write(json.dumps({"prompt": f"Question {i}: {say(6)}?", "chosen": say(4),
                          "rejected": say(5)}) + "\n")


def test_the_readme_own_data_commands_run_from_another_directory(tmp_path):
  commands = _own_data_commands()
  assert [c[0] for c in commands] == ["python", "python", "daa-jax"], commands
  _pairs(tmp_path / "pairs.jsonl")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=REPO)
  for argv in commands:
    if argv[0] == "daa-jax":  # the console script, without relying on it being installed
      argv = [sys.executable, "-c", "import sys; from daa_jax.main import cli; "
              "sys.argv[0] = 'daa-jax'; cli()", *argv[1:], *SMALL["eval"]]
    else:
      assert argv[:3] == ["python", "-m", "daa_jax.main"], argv
      # The config files are the repository's; every other path stays relative to cwd.
      argv = [sys.executable, *argv[1:]]
      argv = [a.replace("configs/", f"{REPO}/configs/") for a in argv]
      job = "sft" if any("configs/sft.py" in a for a in argv) else "daa"
      argv += SMALL[job]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (argv, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
  runs = tmp_path / "runs"
  assert os.listdir(runs / "sft" / "checkpoints") and os.listdir(runs / "dpo" / "checkpoints")
  summaries = list((runs / "dpo" / "eval").glob("*/summary.json"))
  assert summaries, os.listdir(runs / "dpo" / "eval")
  assert json.loads(summaries[0].read_text())
  config = json.loads((runs / "dpo" / "config.json").read_text())
  assert config["init_from"] == f"{tmp_path}/runs/sft"
  assert config["data"]["source"] == f"{tmp_path}/pairs.jsonl"
