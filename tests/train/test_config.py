"""Config validation, help and --print_config: a user's mistakes stop before any work."""

import os
import subprocess
import sys

import pytest

from daa_jax.train import config as config_lib
from daa_jax.train import objectives
from daa_jax.train import optim
from daa_jax.study import tree_mdp
from daa_jax.data import tokenize
from daa_jax.errors import ConfigError
from daa_jax.data import pipeline as data_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "configs", "daa.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _config(name, arg=None):
  return config_lib.load_sibling(CONFIGS, name, arg)


def test_closed_sets_match_the_modules_that_define_them():
  assert config_lib.OBJECTIVE_NAMES == tuple(objectives.OBJECTIVES)
  assert config_lib.DATA_FORMATS == data_pipeline.FORMATS
  c = config_lib.CHOICES
  assert c["data.truncation_side"] == tokenize.TRUNCATION_SIDES
  assert c["data.overlong"] == tokenize.OVERLONG_POLICIES
  assert c["policy"] == tree_mdp.POLICIES and c["optimizer"] == tree_mdp.OPTIMIZERS
  for name in c["optim.name"]:  # every allowed optimizer and schedule builds
    for schedule in c["optim.schedule"]:
      cfg = config_lib.optim_fields()
      cfg.update(name=name, schedule=schedule, warmup_steps=0)
      optim.make(cfg, 10)


@pytest.mark.parametrize("config_name,arg,field,value,close", [
    ("daa", "size=tiny", "objective.name", "dpoo", "dpo"),
    ("daa", "size=tiny", "optim.name", "rmsprob", "rmsprop"),
    ("daa", "size=tiny", "optim.schedule", "cosin", "cosine"),
    ("daa", "size=tiny", "data.format", "jsnol", "jsonl"),
    ("daa", "size=tiny", "model.dtype", "bfloat", "bfloat16"),
    ("daa", "size=tiny", "model.size", "1bb", "1b"),
    ("daa", "size=tiny", "objective.reference", "cache", "cached"),
    ("sft", "size=tiny", "data.truncation_side", "keep_ends", "keep_end"),
    ("eval", None, "judge.name", "reward-model", "reward_model"),
    ("quickstart", None, "daa.optim.name", "adamm", "adam"),
    ("quickstart", None, "judge.name", "gld", "gold"),
    ("sweep_paper", None, "mode", "comands", "commands"),
    ("tree_mdp", None, "reference", "unifrom", "uniform"),
])
def test_every_closed_set_field_is_validated_with_a_close_match(config_name, arg, field, value,
                                                                 close):
  config = _config(config_name, arg)
  node = config
  *parents, leaf = field.split(".")
  for key in parents:
    node = node[key]
  node[leaf] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config)
  message = str(e.value)
  assert f"config.{field}={value!r}" in message and f"Did you mean {close!r}?" in message
  assert "\n" not in message  # one paragraph


def test_tuple_fields_are_checked_element_by_element():
  config = _config("quickstart")
  config.objectives = ("dpo", "slick")
  with pytest.raises(ConfigError, match=r"config.objectives='slick'.*Did you mean 'slic'"):
    config_lib.validate(config)


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "daa_jax.main", *args], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def test_a_typo_stops_before_any_work_with_exit_2(tmp_path):
  proc = _main("--config=configs/daa.py:size=tiny,objective=dpoo", f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("daa_jax: error:")]
  assert len(errors) == 1 and "config.objective.name='dpoo'" in errors[0]
  assert "Did you mean 'dpo'?" in errors[0]
  # Nothing was loaded or written: no data cache, no config.json.
  assert not (tmp_path / "data_cache").exists() and not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"], ["help"], ["--helpfull"]])
def test_help_exits_0_with_jobs_configs_and_print_config(argv):
  proc = _main(*argv)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for word in ("sft", "daa", "eval", "quickstart", "tree_mdp", "configs/quickstart.py",
               "configs/eval.py", "--print_config", "The quickstart: the paper's"):
    assert word in proc.stdout, word
  if "--helpfull" in argv:
    assert "--coordinator_address" in proc.stdout


def test_console_script_help_exits_0():
  proc = subprocess.run(
      [sys.executable, "-c", "import sys; from daa_jax.main import cli; "
       "sys.argv = ['daa-jax', '--help']; cli()"],
      cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "usage: daa-jax --config" in proc.stdout


def test_print_config_prints_every_resolved_field_and_exits_0():
  proc = _main("--config=configs/daa.py:size=tiny,objective=ipo", "--config.objective.beta=0.25",
               "--print_config")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "name: ipo" in out and "beta: 0.25" in out and "warmup_steps: 150" in out
  assert "max_length: 0" in out  # 'auto', fitted when the data is loaded
  bad = _main("--config=configs/daa.py:size=tiny", "--config.optim.name=adamx", "--print_config")
  assert bad.returncode == 2 and "Did you mean 'adam'?" in bad.stderr


def test_resolve_paths_makes_local_paths_absolute_and_leaves_hub_ids(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "pairs.jsonl").write_text("{}\n")
  (tmp_path / "tok").mkdir()
  (tmp_path / "rm").mkdir()
  (tmp_path / "shards").mkdir()
  (tmp_path / "shards" / "a.jsonl").write_text("{}\n")
  config = _config("daa")
  config.init_from = "runs/sft@40"           # always local, even before it exists
  config.hf_model = "EleutherAI/pythia-1b"   # a hub id: no such local path
  config.data.source = "pairs.jsonl,shards/*.jsonl,gs://bucket/x.jsonl"
  config.data.tokenizer = "tok"
  config.data.cache_dir = "~/daa_cache"
  config_lib.resolve_paths(config)
  assert config.init_from == f"{tmp_path}/runs/sft@40"
  assert config.hf_model == "EleutherAI/pythia-1b"
  assert config.data.source == (f"{tmp_path}/pairs.jsonl,{tmp_path}/shards/*.jsonl,"
                                "gs://bucket/x.jsonl")
  assert config.data.tokenizer == f"{tmp_path}/tok"
  assert config.data.cache_dir == os.path.expanduser("~/daa_cache")
  evaluation = _config("eval", "run=runs/dpo")
  evaluation.judge.reward_model = "rm"
  evaluation.judge.tokenizer = "EleutherAI/pythia-1b"
  config_lib.resolve_paths(evaluation)
  assert evaluation.run == f"{tmp_path}/runs/dpo"
  assert evaluation.judge.reward_model == f"{tmp_path}/rm"
  assert evaluation.judge.tokenizer == "EleutherAI/pythia-1b"
  study = _config("quickstart")  # a study's sub-configs too; keywords stay keywords
  study.sft.init_from = "runs/base"
  config_lib.resolve_paths(study)
  assert study.sft.init_from == f"{tmp_path}/runs/base"
  assert study.daa.data.source == "synthetic" and study.daa.data.tokenizer == "bytes"


def test_a_failed_start_leaves_no_directory_it_created(tmp_path):
  missing = ["--config=configs/daa.py:size=tiny", f"--config.data.source={tmp_path}/nope.jsonl"]
  fresh = tmp_path / "runs" / "new"
  proc = _main(*missing, f"--workdir={fresh}")
  assert proc.returncode == 2 and "nope.jsonl does not exist" in proc.stderr, proc.stderr
  assert not fresh.exists()
  # A workdir that was there keeps what an earlier run saved; a stale uncommitted orbax
  # directory goes.
  old = tmp_path / "old"
  (old / "checkpoints" / "4").mkdir(parents=True)
  (old / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
  (old / "notes.txt").write_text("mine")
  proc = _main(*missing, f"--workdir={old}")
  assert proc.returncode == 2, proc.stderr
  assert sorted(os.listdir(old / "checkpoints")) == ["4"] and (old / "notes.txt").exists()


_RO = "/sys/daa_jax_test_run"  # read-only for root too (chmod is bypassed by root)


@pytest.mark.parametrize("args,names", [
    (["--config=configs/daa.py:objctive=ipo"], ["'objctive'", "Did you mean 'objective'?"]),
    (["--config=configs/daa.py:beta=abc"], ["beta='abc'", "is not a float", "beta=0.1"]),
    (["--config=configs/daa.py", "--config.train.max_steps=ten"],
     ["--config.train.max_steps=ten", "'ten' is not a valid int", "config.train.max_steps"]),
    (["--config=configs/daa.py", "--config.optim.learning_rate=1e-6"],
     ["--config.optim.learning_rate=1e-6", "Did you mean --config.optim.lr?"]),
    (["--config=configs/nope.py"], ["configs/nope.py does not exist", "configs/daa.py"]),
    (["--config=configs/daa.py:size=tiny", f"--workdir={_RO}"],
     [f"--workdir={_RO}", "cannot create it", "Give a directory you can write"]),
    (["--config=configs/daa.py:size=tiny", "--workdir={tmp}/file/run"],
     ["--workdir={tmp}/file/run", "Not a directory", "not files"]),
    (["--config=configs/daa.py:size=tiny", "--config.data.source={tmp}/missing.jsonl"],
     ["config.data.source", "missing.jsonl does not exist"]),
    (["--config=configs/daa.py:size=tiny", "--config.data.source={tmp}/pairs.jsonl",
      "--config.data.tokenizer=./no_such_tokenizer"],
     ["config.data.tokenizer='./no_such_tokenizer'", "no such file or directory", "'bytes'"]),
    (["--config=configs/daa.py:size=tiny", "--config.train.logps_chunk=-1"],
     ["config.train.logps_chunk=-1", "must be an int >= 0", "0: off"]),
])
def test_every_user_error_is_one_paragraph_with_exit_2(tmp_path, args, names):
  if _RO in " ".join(args) and not os.path.isdir("/sys"):
    pytest.skip("no /sys to stand for a read-only place")
  (tmp_path / "file").write_text("not a directory")
  (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
  args = [a.replace("{tmp}", str(tmp_path)) for a in args]
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={tmp_path}/run")
  proc = _main(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("daa_jax: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for name in names:
    assert name.replace("{tmp}", str(tmp_path)) in errors[0], errors[0]
