"""Evaluation and the sweep's chain as 2 processes x 4 CPU devices give the 1 x 8 answer.

The jobs run as `python -m daa_jax.main` subprocesses through `test_multihost.launch` (one
process per simulated host, jax.distributed on 127.0.0.1, gloo), sharing one persistent
compilation cache:

  chain:  the quickstart shrunk to one objective and one β (SFT -> policy pairs -> DPO ->
          evaluation -> summary.csv, fits, figures, report), as 1 process, then from its SFT
          reference on as 2: the same pairs files, summary.json files and summary.csv;
          process 0 alone writes them.
  eval:   the 1-process chain's DPO run evaluated again with an LLM judge on a loopback
          HTTP server, as 1 process (mesh (-1,1,1)) and as 2 (mesh (1,2,4): fsdp spans the
          processes, tensor within them): the same summary.json, and process 1 never sends a
          request. Then with a reward-model judge on mesh (1,1,8) (tensor spans the
          processes): the rewards this process computes itself.

Floats agree to float32 reduction order (gloo all-reduces vs one process); samples, counts
and win rates are identical.
"""

import csv
import http.server
import json
import os
import re
import shutil
import threading

import numpy as np
import pytest

from tests.train import test_multihost as mh

ATOL = 1e-5  # as test_multihost: float32 sums in another reduction order
# Fields that come from the samples' tokens and the judge only: identical, not close.
EXACT = ("step", "num_samples", "num_pairs", "mean_sample_length", "sample_length_std",
         "min_sample_length", "max_sample_length", "eos_rate", "win_rate", "win_rate_lo",
         "win_rate_hi", "win_rate_ci", "wins", "ties", "losses", "judge", "judge_stats",
         "sampling", "epoch_fraction", "is_reference", "mean_sample_reward",
         "mean_reference_reward")
# The quickstart, shrunk: SFT long enough that most samples end with EOS (the pairs keep
# only those), one DPO run of 2 steps (no warmup: both move the policy) exported at 1 and 2.
CHAIN = ["--config=configs/quickstart.py:sft_steps=150,epochs=1", "--config.sizes=('tiny',)",
         "--config.objectives=('dpo',)", "--config.betas=(0.1,)",
         "--config.sft.train.progress=False", "--config.daa.train.progress=False",
         "--config.sft.train.batch_size=32", "--config.sft.train.log_every=50",
         "--config.sft.optim.warmup_steps=10", "--config.daa.optim.warmup_steps=0",
         "--config.sft.data.synthetic.num_sft=256", "--config.sft.data.synthetic.num_eval=32",
         "--config.sft.data.synthetic.num_pairs=32",
         "--config.daa.data.synthetic.num_sft=32", "--config.daa.data.synthetic.num_eval=32",
         "--config.policy_pairs.num_pairs=64", "--config.policy_pairs.num_eval_pairs=32",
         "--config.policy_pairs.batch_size=64",
         "--config.eval.num_prompts=32", "--config.eval.num_pairs=32",
         "--config.eval.batch_size=32"]  # asynchronous saves, as the quickstart's
RUN = "dpo_tiny_b0p1"


def _launch(tmp, workdir, n, args):
  # flags=[]: the launcher's default flags are a training run's; ours are whole.
  return mh.launch(workdir, n, args, flags=[], cache_dir=str(tmp / "jax_cache"),
                   log_dir=str(tmp / "logs"), timeout=600)


def _summary_csv(workdir):
  with open(workdir / "summary.csv") as f:
    return list(csv.DictReader(f))


def _close(a, b, what):
  """Summary values: exact for strings, ints, bools and EXACT keys; floats to ATOL."""
  if isinstance(a, dict) and isinstance(b, dict):
    assert sorted(a) == sorted(b), what
    for k in a:
      _close(a[k], b[k], f"{what}.{k}")
  elif isinstance(a, float) and isinstance(b, float):
    np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=what)
  else:
    assert a == b, f"{what}: {a!r} != {b!r}"


def assert_summaries_match(a, b, what):
  assert sorted(a) == sorted(b), f"{what}: keys {sorted(set(a) ^ set(b))}"
  for key in a:
    if key == "eval_seconds":
      continue
    if key in EXACT:
      assert a[key] == b[key], f"{what}: {key} {a[key]!r} != {b[key]!r}"
    else:
      _close(a[key], b[key], f"{what}: {key}")


def test_chain_and_evaluation_two_processes_match_one(tmp_path, chat, monkeypatch):
  """One test, not two sharing a fixture: under `pytest -n 2` two tests of this file could
  land on different workers and each run the 1-process chain."""
  chain_1p = tmp_path / "chain_1p"
  _launch(tmp_path, chain_1p, 1, CHAIN)
  check_chain(tmp_path, chain_1p)
  llm_1p = check_llm_judged_eval(tmp_path, chain_1p / RUN, chat, monkeypatch)
  check_reward_model_eval(tmp_path, chain_1p / RUN, llm_1p)


def check_chain(tmp, chain_1p):
  """From the SFT reference on (policy pairs, DPO, evaluation, report) as 2 processes.

  The 2-process chain resumes a copy of the 1-process chain's finished SFT run (the sweep
  skips a run marked TRAINED): multi-process training itself is test_multihost's, and 150
  SFT steps through gloo would double this file's time.
  """
  workdir = tmp / "chain_2p"
  shutil.copytree(chain_1p / "sft_tiny", workdir / "sft_tiny")
  logs = _launch(tmp, workdir, 2, CHAIN)
  for i, log in enumerate(logs):
    assert f"topology: process {i} of 2, 4 local / 8 global devices (cpu)" in log
  # Process 0 alone labels and writes the pairs; process 1 samples with it, then waits.
  assert "policy pairs for tiny" in logs[0] and "policy pairs for tiny" not in logs[1]
  assert all("report:" in log for log in logs)  # process 0's summary, on every process
  for name in ("pairs.jsonl", "eval_pairs.jsonl", "stats.json", "DONE"):
    one = (chain_1p / "pairs_tiny" / name).read_bytes()
    assert (workdir / "pairs_tiny" / name).read_bytes() == one, name
  for name in ("sweep_config.json", "fits.json", "checks.json", "report.md",
               "figures/frontier.png"):
    assert (workdir / name).stat().st_size > 0, name
  assert (workdir / RUN / "TRAINED").exists()
  expected, actual = _summary_csv(chain_1p), _summary_csv(workdir)
  assert [(r["run"], r["step"]) for r in actual] == [
      ("sft_tiny", "0"), (RUN, "1"), (RUN, "2")]
  assert [(r["run"], r["step"]) for r in expected] == [(r["run"], r["step"]) for r in actual]
  for want, got in zip(expected, actual):
    for col, value in want.items():
      what = f"summary.csv {got['run']} step {got['step']} {col}"
      if col in EXACT or not re.fullmatch(r"-?[\d.e+-]+", value):
        assert got[col] == value, what
      else:
        np.testing.assert_allclose(float(got[col]), float(value), rtol=0, atol=ATOL,
                                   err_msg=what)
  for step in (0, 1, 2):
    name = f"{RUN}/eval/{step}/summary.json"
    assert_summaries_match(json.loads((workdir / name).read_text()),
                           json.loads((chain_1p / name).read_text()), name)


# --- The LLM judge: asked by process 0 only --------------------------------------------------


@pytest.fixture
def chat():
  """An OpenAI-style chat endpoint on 127.0.0.1 that prefers the shorter summary (B on a tie)
  and counts requests: the outcomes depend on the samples, not on the asking order."""
  state = {"requests": 0, "lock": threading.Lock()}
  slots = re.compile(r"Summary A:\n(.*?)\n\nSummary B:\n(.*?)\n\nFIRST", re.S)

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self):  # pylint: disable=invalid-name
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      a, b = slots.search(body["messages"][0]["content"]).groups()
      with state["lock"]:
        state["requests"] += 1
      content = f"Comparison: shorter is better.\nPreferred: {'A' if len(a) < len(b) else 'B'}"
      data = json.dumps({"choices": [{"index": 0, "message": {
          "role": "assistant", "content": content}}]}).encode()
      self.send_response(200)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
  state["base_url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  yield state
  httpd.shutdown()
  httpd.server_close()


def check_llm_judged_eval(tmp, run, chat, monkeypatch):
  """The DPO run evaluated with an LLM judge: 2 processes on mesh (1,2,4) vs 1 process."""
  monkeypatch.setenv("DAA_TEST_JUDGE_KEY", "sk-test")  # inherited by the launched processes
  for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  flags = [f"--config=configs/eval.py:run={run}", "--config.eval.steps=(2,)",
           "--config.eval.num_prompts=32", "--config.eval.num_pairs=32",
           "--config.eval.batch_size=32", "--config.judge.name=llm",
           f"--config.judge.base_url={chat['base_url']}",
           "--config.judge.api_key_env=DAA_TEST_JUDGE_KEY", "--config.judge.max_concurrency=4"]
  _launch(tmp, tmp / "llm_1p", 1, flags)
  one = json.loads((tmp / "llm_1p/eval/2/summary.json").read_text())
  questions = one["judge_stats"]["questions"]
  assert one["num_samples"] == 32 and questions == 64  # both orders of each comparison
  assert chat["requests"] == one["judge_stats"]["requests"] == questions
  assert one["wins"] and one["losses"]  # the outcomes depend on the samples

  logs = _launch(tmp, tmp / "llm_2p", 2, flags + ["--config.mesh=(1,2,4)"])
  # Process 0 asked every question once; process 1 asked none (it would double the count:
  # its own cache is not shared) and logged process 0's verdicts.
  assert chat["requests"] == 2 * questions
  two = json.loads((tmp / "llm_2p/eval/2/summary.json").read_text())
  assert_summaries_match(two, one, "2 processes, mesh (1,2,4) vs 1 process")
  lines = [re.findall(r"eval step 2: .* held-out acc [\d.]+", log) for log in logs]
  assert len(lines[0]) == 1 and lines[0] == lines[1], lines
  cache = (tmp / "llm_2p/eval/llm_judge_cache.jsonl").read_text().splitlines()
  assert len(cache) == questions
  # Process 0's files next to the orbax arrays (saved collectively).
  assert sorted(os.listdir(tmp / "llm_2p/eval/2")) == ["arrays", "samples.jsonl",
                                                        "summary.json"]
  return one


def check_reward_model_eval(tmp, run, llm_1p):
  """A reward-model judge, collective, on mesh (1,1,8): tensor spans the processes and both
  hold every row of the batch. Its rewards equal this process's own (1 x 8 devices, no mesh);
  the samples and KL equal the 1-process LLM-judged evaluation's (same seed and batch)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from daa_jax.evaluate import judges  # pylint: disable=g-import-not-at-top
  from daa_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from daa_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  # Odd sizes; the vocabulary covers the run's bytes tokenizer (pad 257).
  cfg = ModelConfig(vocab_size=263, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                    intermediate_size=53, max_position_embeddings=128)
  torch.manual_seed(0)
  hf = transformers.GPTNeoXForSequenceClassification(transformers.GPTNeoXConfig(
      **cfg.to_hf(), num_labels=1, pad_token_id=257, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
  hf.save_pretrained(tmp / "rm")
  _launch(tmp, tmp / "rm_2p", 2, [
      f"--config=configs/eval.py:run={run}", "--config.eval.steps=(2,)",
      "--config.eval.num_prompts=32", "--config.eval.num_pairs=32",
      "--config.eval.batch_size=32", "--config.eval.forward_kl=False",
      "--config.judge.name=reward_model", f"--config.judge.reward_model={tmp / 'rm'}",
      "--config.mesh=(1,1,8)"])
  two = json.loads((tmp / "rm_2p/eval/2/summary.json").read_text())
  for key in ("kl", "kl_k3", "kl_rb", "kl_stderr", "heldout_loss", "reward_acc",
              "chosen_logp_drift", "mean_sample_length", "eos_rate"):
    _close(two[key], llm_1p[key], f"reward-model eval on mesh (1,1,8) vs 1 process: {key}")
  with open(tmp / "rm_2p/eval/2/samples.jsonl") as f:
    rows = [json.loads(line) for line in f]
  rm = judges.RewardModelJudge(str(tmp / "rm"), tokenizer=tokenize.ByteTokenizer())
  prompts = [r["prompt"] for r in rows]
  outcomes, info = rm.judge(prompts, [r["sample"] for r in rows], [r["reference"] for r in rows])
  np.testing.assert_allclose([r["sample_reward"] for r in rows], info["sample_rewards"],
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose([r["reference_reward"] for r in rows], info["reference_rewards"],
                             rtol=0, atol=ATOL)
  assert [r["outcome"] for r in rows] == outcomes.tolist()
  assert two["win_rate"] == float(outcomes.mean()) and two["wins"] + two["losses"] > 0


def test_shared_results_travel_exactly():
  """What `sharding.share_from_process_0` broadcasts: JSON text, read back without rounding."""
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  outcomes = np.array([1.0, 0.75, 0.5, 1 / 3, np.nextafter(0.25, 1.0)])
  value = [outcomes, {"requests": 64, "rate": float("nan"), "ids": np.arange(3),
                      "steps": [(0, True), (4, False)]}]
  # pylint: disable-next=protected-access
  back = sharding._from_json(json.loads(json.dumps(sharding._to_json(value))))
  assert back[0].dtype == np.float64 and np.array_equal(back[0], outcomes)
  assert back[1]["requests"] == 64 and np.isnan(back[1]["rate"])
  assert back[1]["ids"].tolist() == [0, 1, 2] and back[1]["steps"] == [[0, True], [4, False]]
