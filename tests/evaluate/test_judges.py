"""Tests of evaluate/judges.py: win-rate intervals, the gold judge, the LLM judge against a local server.

The LLM judge talks to a real HTTP server on 127.0.0.1 (ephemeral port) that answers like a
chat-completions endpoint. It prefers the summary that starts with "good" and otherwise says
"A" (a position bias the two orders must cancel), and it misbehaves on request: markers in the
post ask for a 429, a 500, a timeout or a malformed answer on a question's first attempt.
"""

import dataclasses
import http.server
import json
import math
import os
import re
import threading
import time
import traceback

import numpy as np
import pytest

from daa_jax.evaluate import judges
from daa_jax.evaluate import llm_judge
from daa_jax.errors import ConfigError, DataError
from daa_jax.evaluate import judge_prompts

KEY = "sk-test-S3CRET-0123456789abcdef"
KEY_ENV = "DAA_TEST_JUDGE_KEY"
Z95 = 1.959963984540054


# --- win_rate -------------------------------------------------------------------------------


def _wilson_counts(successes, n, z=Z95):
  """Wilson bounds in count form, (x + z²/2 ± z·sqrt(x(n−x)/n + z²/4)) / (n + z²)."""
  root = z * math.sqrt(successes * (n - successes) / n + z * z / 4)
  center = successes + z * z / 2
  return (center - root) / (n + z * z), (center + root) / (n + z * z)


def test_win_rate_wilson_matches_reference_values():
  r = judges.win_rate([1] * 50 + [0] * 50)
  assert r["win_rate"] == 0.5 and r["n"] == 100
  # Textbook value of the Wilson interval for 50/100.
  assert r["lo"] == pytest.approx(0.4038, abs=1e-4)
  assert r["hi"] == pytest.approx(0.5962, abs=1e-4)
  r = judges.win_rate([0] * 10)
  assert r["lo"] == 0.0
  assert r["hi"] == pytest.approx(Z95**2 / (10 + Z95**2), abs=1e-12)  # 0.2775


def test_win_rate_ties_count_half():
  outcomes = [1] * 30 + [0.5] * 10 + [0] * 60
  r = judges.win_rate(outcomes)
  assert (r["wins"], r["ties"], r["losses"], r["n"]) == (30, 10, 60, 100)
  assert r["win_rate"] == pytest.approx(0.35)
  lo, hi = _wilson_counts(35.0, 100)  # ties as half-wins: 35 "successes"
  assert r["lo"] == pytest.approx(lo, abs=1e-12) and r["hi"] == pytest.approx(hi, abs=1e-12)


def test_win_rate_bootstrap_seeded_and_close_to_wilson():
  rng = np.random.default_rng(1)
  outcomes = rng.choice([0.0, 0.5, 1.0], size=500, p=[0.6, 0.1, 0.3])
  a = judges.win_rate(outcomes, method="bootstrap", seed=3)
  b = judges.win_rate(outcomes, method="bootstrap", seed=3)
  w = judges.win_rate(outcomes)
  assert a == b
  assert a["lo"] < a["win_rate"] < a["hi"]
  assert a["lo"] == pytest.approx(w["lo"], abs=0.01)
  assert a["hi"] == pytest.approx(w["hi"], abs=0.01)
  assert judges.win_rate(outcomes, method="bootstrap", seed=4) != a


def test_win_rate_rejects_bad_input():
  with pytest.raises(DataError):
    judges.win_rate([])
  with pytest.raises(DataError):
    judges.win_rate([1, 2])
  with pytest.raises(ConfigError):
    judges.win_rate([1, 0], method="normal")


# --- GoldJudge ------------------------------------------------------------------------------


def test_gold_judge_outcomes_and_rewards():
  def reward(prompt, response):
    hits = sum(tok in prompt for tok in response)
    return hits - 0.5 * (len(response) - hits)

  prompts = ["abc", "abc", "abc", "xyz"]
  samples = ["ab", "a", "aq", "xyz"]
  references = ["a", "ab", "a", "xy"]
  outcomes, info = judges.GoldJudge(reward).judge(prompts, samples, references)
  np.testing.assert_array_equal(info["sample_rewards"], [2, 1, 0.5, 3])
  np.testing.assert_array_equal(info["reference_rewards"], [1, 2, 1, 2])
  np.testing.assert_array_equal(outcomes, [1, 0, 0, 1])
  outcomes, _ = judges.GoldJudge(reward).judge(["abc"], ["ab"], ["ba"])
  assert outcomes.tolist() == [0.5]
  r = judges.win_rate(np.array([1, 0, 0.5, 1]))
  assert r["win_rate"] == 0.625 and r["ties"] == 1
  with pytest.raises(DataError):
    judges.GoldJudge(reward).judge(["a"], ["a", "b"], ["a"])


# --- reward-model inputs ---------------------------------------------------------------------


def test_reward_sequences_equal_the_rm_tokenizer_with_bos(tmp_path):
  """A reward model with a BOS tokenizer (Llama-3-like) scores `rm_tokenizer(prompt +
  response)` + EOS: BOS once, first, also when a too-long sequence is cut; none for NeoX-like."""
  import transformers
  from daa_jax.data import tokenize
  from tests.data.test_data_tokenize import llama3_like_tokenizer
  path = llama3_like_tokenizer(tmp_path / "bos")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  tok = tokenize.get_tokenizer(path)
  prompts = ["the boyfriend forgot dinner plans TL;DR:", "<|begin_of_text|>the post TL;DR:"]
  responses = [" summary and the post", " plans"]
  got = judges.reward_sequences(tok, prompts, responses, max_length=64)
  for p, r, seq in zip(prompts, responses, got):
    assert seq == hf(p + r, add_special_tokens=not p.startswith("<|begin_of_text|>")
                     ).input_ids + [hf.eos_token_id]
    assert seq[0] == hf.bos_token_id and seq.count(hf.bos_token_id) == 1
  cut = judges.reward_sequences(tok, prompts[:1], responses[:1], max_length=5)[0]
  assert cut == [hf.bos_token_id] + got[0][-4:]
  assert judges.reward_sequences(tok, prompts[:1], responses[:1], 64, append_eos=False)[0] == (
      hf(prompts[0] + responses[0]).input_ids)
  neox = tokenize.get_tokenizer(llama3_like_tokenizer(tmp_path / "nobos", False))
  assert neox.bos_prefix == ()
  assert judges.reward_sequences(neox, prompts[:1], responses[:1], 64)[0] == hf(
      prompts[0] + responses[0], add_special_tokens=False).input_ids + [hf.eos_token_id]


# --- parse_verdict --------------------------------------------------------------------------


@pytest.mark.parametrize("answer,verdict", [
    ("Comparison: A is tighter.\nPreferred: A", "A"),
    ("Comparison: B covers more.\nPreferred: \"B\"", "B"),
    ("Comparison: x\n**Preferred:** B", "B"),
    ("Comparison: x\nMore helpful: A", "A"),
    ("Comparison: mentions Preferred: A in passing\nPreferred: B", "B"),
    ("Comparison: both fine.\nB", "B"),
    ("I cannot decide.", None),
    ("Preferred: neither", None),
    ("", None),
])
def test_parse_verdict(answer, verdict):
  assert judge_prompts.parse_verdict(answer) == verdict


# --- The fake chat-completions server -------------------------------------------------------

_SLOTS = re.compile(r"(?:Summary|Response) A:\n(.*?)\n\n(?:Summary|Response) B:\n(.*?)\n\nFIRST",
                    re.S)


class FakeChat:
  """Scripted chat-completions server state (shared by the handler threads)."""

  def __init__(self):
    self.lock = threading.Lock()
    self.requests = []  # (authorization header, prompt text) per HTTP request
    self.bodies = []  # the JSON body of every request
    self.attempts = {}  # prompt text -> attempts so far
    self.times = {}  # prompt text -> arrival times
    self.active = 0
    self.max_active = 0
    self.delay_s = 0.0
    self.ok_budget = None  # after this many good answers, every request is a 500
    self.answered = 0
    self.status_for_all = None  # e.g. 401 with the Authorization echoed in the body

  def respond(self, handler):
    length = int(handler.headers.get("Content-Length", 0))
    body = json.loads(handler.rfile.read(length))
    text = body["messages"][0]["content"]
    auth = handler.headers.get("Authorization")
    with self.lock:
      self.requests.append((auth, text))
      self.bodies.append(body)
      self.times.setdefault(text, []).append(time.monotonic())
      attempt = self.attempts.get(text, 0)
      self.attempts[text] = attempt + 1
      self.active += 1
      self.max_active = max(self.max_active, self.active)
    try:
      if self.delay_s:
        time.sleep(self.delay_s)
      if self.status_for_all:
        return self._reply(handler, self.status_for_all, {"error": f"bad key: {auth}"})
      first = attempt == 0
      if "[429]" in text and first:
        return self._reply(handler, 429, {"error": "slow down"}, {"Retry-After": "0"})
      if "[wait]" in text and first:
        return self._reply(handler, 429, {"error": "slow down"}, {"Retry-After": "0.4"})
      if "[500]" in text and first:
        return self._reply(handler, 500, {"error": "oops"})
      if "[slow]" in text and first:
        time.sleep(1.6)  # longer than the client's timeout
        return self._reply(handler, 200, self._completion("Preferred: A"))
      if "[garbage]" in text or ("[malformed]" in text and first):
        return self._reply(handler, 200, self._completion("I like both of them."))
      with self.lock:
        if self.ok_budget is not None and self.answered >= self.ok_budget:
          hard_fail = True
        else:
          hard_fail = False
          self.answered += 1
      if hard_fail:
        return self._reply(handler, 500, {"error": "down"})
      a, b = _SLOTS.search(text).groups()
      choice = "B" if b.startswith("good") and not a.startswith("good") else "A"
      return self._reply(handler, 200, self._completion(
          f"Comparison: one of them is better.\nPreferred: {choice}"))
    finally:
      self._leave(handler)

  def _leave(self, handler):
    with self.lock:
      if not getattr(handler, "_left", False):
        handler._left = True
        self.active -= 1

  def _reply(self, handler, *args):
    # Leave the active count before the client can see the answer: the client may start its
    # next request the moment the response arrives, before this thread runs again.
    self._leave(handler)
    return self._send(handler, *args)


  @staticmethod
  def _completion(content):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}

  @staticmethod
  def _send(handler, status, obj, headers=None):
    data = json.dumps(obj).encode()
    try:
      handler.send_response(status)
      handler.send_header("Content-Type", "application/json")
      handler.send_header("Content-Length", str(len(data)))
      for k, v in (headers or {}).items():
        handler.send_header(k, v)
      handler.end_headers()
      handler.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client timed out and hung up


@pytest.fixture
def server():
  state = FakeChat()

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self):  # pylint: disable=invalid-name
      assert self.path == "/v1/chat/completions"
      state.respond(self)

    def log_message(self, *args):  # keep test output quiet
      pass

  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
  yield state
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
  monkeypatch.setenv(KEY_ENV, KEY)


def _judge(server, tmp_path, **kw):
  kw.setdefault("cache_path", str(tmp_path / "judge_cache.jsonl"))
  kw.setdefault("max_concurrency", 2)
  return llm_judge.LLMJudge(llm_judge.LLMJudgeConfig(
      base_url=server.base_url, api_key_env=KEY_ENV, timeout_s=1.0, backoff_base_s=0.01,
      backoff_max_s=0.05, use_env_proxy=False, **kw))


def _posts(n, marker=""):
  return [f"post {i} {marker}".strip() for i in range(n)]


# --- LLMJudge -------------------------------------------------------------------------------


def test_position_flipping_and_outcome_mapping(server, tmp_path):
  prompts = _posts(4)
  samples = ["good sample", "bad sample", "bad sample", "good sample"]
  references = ["bad ref", "good ref", "bad ref", "good ref"]
  outcomes, stats = _judge(server, tmp_path).judge(prompts, samples, references)
  # Policy better: wins in both orders. Reference better: loses in both. Neither: the server
  # says "A" both times, so each response wins once and the position bias cancels to a tie.
  np.testing.assert_array_equal(outcomes, [1.0, 0.0, 0.5, 0.5])
  assert stats["requests"] == 8 and stats["questions"] == 8 and stats["cache_hits"] == 0
  assert stats["order_agreement"] == 0.5
  assert stats["first_position_rate"] == pytest.approx(6 / 8)
  slots = [_SLOTS.search(t).groups() for _, t in server.requests if "post 0" in t]
  assert sorted(slots) == sorted([("good sample", "bad ref"), ("bad ref", "good sample")])
  single, _ = _judge(server, tmp_path, both_orders=False, cache_path=None).judge(
      prompts, samples, references)
  np.testing.assert_array_equal(single, [1.0, 0.0, 1.0, 1.0])  # position bias stays


def test_retries_on_429_500_timeout_and_malformed(server, tmp_path):
  prompts = ["post [429]", "post [500]", "post [slow]", "post [malformed]", "post [garbage]"]
  samples = ["good s"] * 5
  references = ["bad r"] * 5
  outcomes, stats = _judge(server, tmp_path, max_malformed_retries=1).judge(
      prompts, samples, references)
  np.testing.assert_array_equal(outcomes, [1, 1, 1, 1, 0.5])
  # One transient retry for each order of the first three posts.
  assert stats["retries"] == 6
  # [malformed]: one re-ask per order; [garbage]: one re-ask per order, then a tie.
  assert stats["malformed_retries"] == 4 and stats["malformed"] == 2
  assert stats["requests"] == 10 + 6 + 4 == len(server.requests)
  # A malformed final answer is cached too: the rerun pays nothing.
  outcomes2, stats2 = _judge(server, tmp_path).judge(prompts, samples, references)
  np.testing.assert_array_equal(outcomes2, outcomes)
  assert stats2["requests"] == 0 and stats2["cache_hits"] == 10 and stats2["malformed"] == 2


def test_honors_retry_after(server, tmp_path):
  outcomes, stats = _judge(server, tmp_path, max_concurrency=1, both_orders=False).judge(
      ["post [wait]"], ["good"], ["bad"])
  assert outcomes.tolist() == [1.0] and stats["retries"] == 1
  (first, second), = server.times.values()
  assert second - first >= 0.4  # backoff alone (at most 0.05 s here) would come sooner
  assert llm_judge._retry_after_seconds("2") == 2.0
  http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
  assert 25 < llm_judge._retry_after_seconds(http_date) <= 30
  assert llm_judge._retry_after_seconds("soon") is None


def test_gives_up_after_max_retries(server, tmp_path):
  server.ok_budget = 0
  judge = _judge(server, tmp_path, max_retries=2, max_concurrency=1)
  with pytest.raises(llm_judge.JudgeRequestError, match="HTTP 500"):
    judge.judge(["p"], ["good"], ["bad"])
  assert len(server.requests) == 3


def test_cache_second_run_makes_no_requests(server, tmp_path):
  prompts, samples, refs = _posts(5), ["good s"] * 5, ["bad r"] * 5
  out1, s1 = _judge(server, tmp_path).judge(prompts, samples, refs)
  n = len(server.requests)
  out2, s2 = _judge(server, tmp_path).judge(prompts, samples, refs)
  assert n == 10 and len(server.requests) == n
  assert s1["requests"] == 10 and s2["requests"] == 0 and s2["cache_hits"] == 10
  np.testing.assert_array_equal(out1, out2)
  # Everything that changes the answer is in the cache key: model, temperature, max_tokens,
  # the endpoint, the template (task).
  host = server.base_url.replace("127.0.0.1", "localhost")
  for change in (dict(model="other-judge"), dict(temperature=0.7), dict(max_tokens=64),
                 dict(base_url=host), dict(task="dialogue")):
    n = len(server.requests)
    kw = dict(max_concurrency=2, cache_path=str(tmp_path / "judge_cache.jsonl"))
    judge = llm_judge.LLMJudge(dataclasses.replace(_judge(server, tmp_path).config, **kw,
                                                   **change))
    _, s3 = judge.judge(prompts, samples, refs)
    assert s3["requests"] == 10 and s3["cache_hits"] == 0, change
    assert len(server.requests) == n + 10
  assert _judge(server, tmp_path).judge(prompts, samples, refs)[1]["requests"] == 0


def test_a_malformed_answer_is_re_asked_differently(server, tmp_path):
  outcomes, stats = _judge(server, tmp_path, both_orders=False, max_malformed_retries=1).judge(
      ["post [malformed]"], ["good s"], ["bad r"])
  assert outcomes.tolist() == [1.0] and stats["malformed_retries"] == 1
  first, second = server.bodies
  assert first["messages"] != second["messages"]  # not the identical temperature-0 request
  assert second["messages"][:2] == first["messages"] + [
      {"role": "assistant", "content": "I like both of them."}]
  assert "Preferred: A" in second["messages"][2]["content"]


def test_resume_after_max_requests(server, tmp_path):
  prompts, samples, refs = _posts(6), ["good s"] * 6, ["bad r"] * 6
  cache = tmp_path / "judge_cache.jsonl"
  with pytest.raises(llm_judge.JudgeRequestError, match="rerun to resume"):
    _judge(server, tmp_path, max_requests=5, max_concurrency=1).judge(prompts, samples, refs)
  first = {t for _, t in server.requests}
  assert len(first) == 5 and len(cache.read_text().splitlines()) == 5
  server.requests.clear()
  outcomes, stats = _judge(server, tmp_path).judge(prompts, samples, refs)
  assert stats["requests"] == 7 and stats["cache_hits"] == 5
  assert not first & {t for _, t in server.requests}  # only the missing ones were asked
  np.testing.assert_array_equal(outcomes, np.ones(6))


def test_resume_after_server_fails_hard(server, tmp_path):
  prompts, samples, refs = _posts(6), ["good s"] * 6, ["bad r"] * 6
  server.ok_budget = 4
  with pytest.raises(llm_judge.JudgeRequestError, match="4 of 12"):
    _judge(server, tmp_path, max_retries=1).judge(prompts, samples, refs)
  # A partial last line, as left by a kill mid-write, is skipped and re-asked.
  with open(tmp_path / "judge_cache.jsonl", "a") as f:
    f.write('{"key": "trunc')
  server.ok_budget = None
  server.requests.clear()
  outcomes, stats = _judge(server, tmp_path).judge(prompts, samples, refs)
  assert stats["requests"] == 8 and stats["cache_hits"] == 4 and stats["retries"] == 0
  np.testing.assert_array_equal(outcomes, np.ones(6))
  _, stats = _judge(server, tmp_path).judge(prompts, samples, refs)
  assert stats["requests"] == 0


def test_bounded_concurrency(server, tmp_path):
  server.delay_s = 0.05
  prompts = _posts(12)
  _judge(server, tmp_path, max_concurrency=3, cache_path=None).judge(
      prompts, ["good"] * 12, ["bad"] * 12)
  assert len(server.requests) == 24
  assert 2 <= server.max_active <= 3


def test_key_sent_but_never_stored_logged_or_raised(server, tmp_path, caplog):
  caplog.set_level("DEBUG")
  prompts = ["post [429]", "post [garbage]", "post"]
  judge = _judge(server, tmp_path, max_malformed_retries=1)
  judge.judge(prompts, ["good"] * 3, ["bad"] * 3)
  assert {auth for auth, _ in server.requests} == {"Bearer " + KEY}
  assert KEY not in repr(judge) and KEY not in str(judge.config)
  # The server rejects the key and echoes it back in its error body.
  server.status_for_all = 401
  with pytest.raises(llm_judge.JudgeRequestError) as info:
    _judge(server, tmp_path, cache_path=str(tmp_path / "c2.jsonl")).judge(
        ["new post"], ["a"], ["b"])
  assert "401" in str(info.value) and KEY_ENV in str(info.value)
  text = "".join(traceback.format_exception(info.value))
  assert KEY not in text
  assert "retry 1/" in caplog.text  # the 429 was logged, without the key
  assert KEY not in caplog.text
  for root, _, files in os.walk(tmp_path):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        assert KEY.encode() not in f.read(), name


def test_config_errors(monkeypatch):
  monkeypatch.delenv(KEY_ENV)
  with pytest.raises(ConfigError, match=KEY_ENV):
    llm_judge.LLMJudge(llm_judge.LLMJudgeConfig(api_key_env=KEY_ENV))
  with pytest.raises(ConfigError, match="max_concurrency"):
    llm_judge.LLMJudgeConfig(max_concurrency=0)
  with pytest.raises(ConfigError, match="base_url"):
    llm_judge.LLMJudgeConfig(base_url="api.openai.com")
  with pytest.raises(ConfigError, match="unknown"):
    llm_judge.LLMJudgeConfig.from_dict({"modle": "x"})
  cfg = llm_judge.LLMJudgeConfig.from_dict({"task": "dialogue", "api_key_env": None})
  assert llm_judge.LLMJudge(cfg).config.task == "dialogue"
  assert "More helpful" in judge_prompts.DIALOGUE_PROMPT and "Preferred" in judge_prompts.TLDR_PROMPT


def test_win_rate_with_groups_counts_prompts_not_samples():
  # 4 identical samples per prompt carry one prompt's worth of evidence: the interval is the
  # Wilson interval of the 50 prompt outcomes, not of the 200 samples.
  per_prompt = np.array([1.0] * 15 + [0.0] * 35)
  x = np.repeat(per_prompt, 4)
  groups = np.repeat(np.arange(50), 4)
  clustered = judges.win_rate(x, groups=groups)
  prompts = judges.win_rate(per_prompt)
  assert clustered["win_rate"] == prompts["win_rate"] == 0.3
  assert math.isclose(clustered["lo"], prompts["lo"]) and math.isclose(clustered["hi"], prompts["hi"])
  assert clustered["n_eff"] == 50 and clustered["num_prompts"] == 50 and clustered["n"] == 200
  assert clustered["hi"] - clustered["lo"] > judges.win_rate(x)["hi"] - judges.win_rate(x)["lo"]
  boot = judges.win_rate(x, method="bootstrap", groups=groups)
  assert 0.0 <= boot["lo"] < 0.3 < boot["hi"] <= 1.0
  # Independent-looking samples (prompt means vary less than p(1-p)/k) never narrow it below iid.
  mixed = np.tile([1.0, 0.0, 0.0, 1.0], 50)
  assert judges.win_rate(mixed, groups=groups)["n_eff"] == 200
  with pytest.raises(DataError, match="groups"):
    judges.win_rate(x, groups=groups[:-1])
