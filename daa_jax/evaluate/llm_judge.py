"""An LLM judge over an OpenAI-compatible chat-completions API (GPT-4 in the paper).

`LLMJudge` follows `judges.Judge`'s contract. It asks with the DPO paper's TL;DR or dialogue
prompt, in both position orders, with retries (honoring Retry-After), bounded concurrency and
an append-only on-disk cache, so an interrupted evaluation resumes without paying twice. Only
the standard library talks HTTP; the API key is read from an environment variable and never
stored.

  judge = LLMJudge(LLMJudgeConfig(base_url="https://api.openai.com/v1", model="gpt-4",
                                  api_key_env="OPENAI_API_KEY", cache_path="judge.jsonl"))
  outcomes, info = judge.judge(prompts, samples, references)
  judges.win_rate(outcomes)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import time
from typing import Any, Mapping
import urllib.error
import urllib.request

from absl import logging
import numpy as np

from daa_jax.evaluate import judges
from daa_jax.errors import ConfigError
from daa_jax.evaluate import judge_prompts


@dataclasses.dataclass(frozen=True)
class LLMJudgeConfig:
  """Settings of `LLMJudge` (the ConfigDict stops here; build with `from_dict`).

  The API key is never a field: `api_key_env` names the environment variable that holds it.
  """

  base_url: str = "https://api.openai.com/v1"
  model: str = "gpt-4-turbo-2024-04-09"  # the paper's judge
  api_key_env: str | None = "OPENAI_API_KEY"  # None: send no Authorization (local servers)
  task: str = "tldr"  # tldr | dialogue: which of PROMPTS
  both_orders: bool = True  # ask policy-as-A and policy-as-B; position bias cancels
  temperature: float = 0.0
  max_tokens: int = 256
  timeout_s: float = 60.0
  max_concurrency: int = 8
  max_retries: int = 6  # per request, on 429 / 5xx / timeouts / connection errors
  backoff_base_s: float = 1.0  # delay before retry k: base·2^k·U(0.5, 1), capped
  backoff_max_s: float = 60.0
  max_retry_after_s: float = 300.0  # cap on a server's Retry-After
  max_malformed_retries: int = 2  # re-asks when no A/B can be parsed; then a tie
  max_requests: int | None = None  # HTTP requests per judge() call (a spending cap)
  cache_path: str | None = None  # append-only JSONL of answers; None: no cache
  use_env_proxy: bool = True  # honor http(s)_proxy environment variables

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LLMJudgeConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ConfigError(f"config.judge: unknown field(s) {unknown}; known: {sorted(names)}.")
    return cls(**dict(d))

  def __post_init__(self):
    def bad(field, why):
      raise ConfigError(f"config.judge.{field}={getattr(self, field)!r}: {why}")
    if not re.match(r"^https?://", self.base_url or ""):
      bad("base_url", "give an http(s) URL such as https://api.openai.com/v1.")
    if self.task not in judge_prompts.PROMPTS:
      bad("task", f"use one of {sorted(judge_prompts.PROMPTS)}.")
    if self.max_concurrency < 1:
      bad("max_concurrency", "must be at least 1.")
    if self.max_retries < 0 or self.max_malformed_retries < 0:
      bad("max_retries" if self.max_retries < 0 else "max_malformed_retries", "must be >= 0.")
    if not self.timeout_s > 0:
      bad("timeout_s", "must be positive.")
    if self.max_requests is not None and self.max_requests < 0:
      bad("max_requests", "must be >= 0 or None.")


class JudgeRequestError(RuntimeError):
  """The judge could not finish: a request failed for good, or `max_requests` was reached.

  Answers received before the failure are in the cache; rerunning resumes from them.
  """


class _Transient(Exception):
  """A failure worth retrying (429, 5xx, timeout, connection); carries Retry-After."""

  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after


class _BudgetExhausted(Exception):
  pass


def _retry_after_seconds(value: str | None) -> float | None:
  """Retry-After as seconds: either delta-seconds or an HTTP date."""
  if not value:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
    return max(0.0, when.timestamp() - time.time())
  except (TypeError, ValueError):
    return None


class LLMJudge:
  """Pairwise judge over an OpenAI-compatible `/chat/completions` endpoint.

  For comparison i it asks up to two questions: policy sample as A and reference as B, then
  reference as A and policy as B. Each order scores 1 if the judge prefers the policy, 0 if it
  prefers the reference, 0.5 if its answer stays unparsable after `max_malformed_retries`
  re-asks; the outcome is the mean over the orders, so a judge that always says "A" scores 0.5.

  Every final answer (malformed ones included) is appended to `cache_path` as soon as it
  arrives, keyed by sha256 of everything that changes the answer: endpoint (base_url), model,
  temperature, max_tokens, the follow-up used on malformed answers and the full question text
  (template included); a rerun sends only the missing ones. A malformed answer is re-asked as
  a follow-up turn that shows the model its answer and asks for the verdict line alone.
  """

  def __init__(self, config: LLMJudgeConfig | None = None, **overrides):
    config = config or LLMJudgeConfig()
    self.config = dataclasses.replace(config, **overrides) if overrides else config
    self._api_key = None
    if self.config.api_key_env:
      key = os.environ.get(self.config.api_key_env)
      if not key:
        raise ConfigError(
            f"config.judge.api_key_env={self.config.api_key_env!r}: that environment variable "
            "is not set; export it with your API key (the key itself never goes in a config).")
      self._api_key = key
    handler = urllib.request.ProxyHandler(None if self.config.use_env_proxy else {})
    self._opener = urllib.request.build_opener(handler)
    self._endpoint = self.config.base_url.rstrip("/") + "/chat/completions"
    self._lock = threading.Lock()
    self._not_before = 0.0  # shared back-off: a 429 pauses every worker, not just one
    self._rng = random.Random()

  def __repr__(self):
    return f"LLMJudge({self.config!r})"  # the config holds the env var's name, not the key

  # -- public ---------------------------------------------------------------------------------

  def judge(self, prompts, samples, references):
    """Judges policy samples against references.

    Args:
      prompts: [N] post texts (TL;DR) or dialogue histories (HH), as the judge should see them.
      samples: [N] policy responses.
      references: [N] reference responses.

    Returns:
      (outcomes [N] float64 in {0, 0.25, 0.5, 0.75, 1}, stats) with stats keys: comparisons,
      questions (unique prompts asked), requests (HTTP attempts), cache_hits, retries (resends
      after transient errors), malformed (questions counted as ties), malformed_retries,
      policy_preferred_rate, first_position_rate (share of parsed verdicts naming A: position
      bias), order_agreement (share of comparisons whose two orders pick the same response).

    Raises:
      JudgeRequestError: a request failed after `max_retries`, the server refused it (4xx), or
        `max_requests` was reached; answers so far stay cached.
    """
    judges.check_lengths(prompts, samples, references)
    cfg = self.config
    template = judge_prompts.PROMPTS[cfg.task]
    orders = (0, 1) if cfg.both_orders else (0,)
    # questions[i][o] = cache key; order 0 puts the policy in slot A.
    texts: dict[str, str] = {}
    questions = []
    for prompt, sample, ref in zip(prompts, samples, references):
      keys = []
      for o in orders:
        a, b = (sample, ref) if o == 0 else (ref, sample)
        text = template.format(prompt=prompt, a=a, b=b)
        key = self._cache_key(text)
        texts[key] = text
        keys.append(key)
      questions.append(keys)

    stats = dict(comparisons=len(questions), questions=len(texts), requests=0, cache_hits=0,
                 retries=0, malformed=0, malformed_retries=0)
    cache = self._load_cache()
    answers = {k: cache[k] for k in texts if k in cache}
    stats["cache_hits"] = len(answers)
    missing = [k for k in texts if k not in answers]
    if missing:
      self._ask_all(missing, texts, answers, stats)

    outcomes = np.empty(len(questions))
    n_a = n_parsed = n_agree = 0
    for i, keys in enumerate(questions):
      scores = []
      for o, key in zip(orders, keys):
        verdict = answers[key]["verdict"]
        if verdict is None:
          stats["malformed"] += 1
          scores.append(0.5)
          continue
        n_parsed += 1
        n_a += verdict == "A"
        scores.append(float(verdict == ("A" if o == 0 else "B")))
      if len(scores) == 2 and scores[0] == scores[1] and scores[0] != 0.5:
        n_agree += 1
      outcomes[i] = float(np.mean(scores))
    stats["policy_preferred_rate"] = float(outcomes.mean()) if len(outcomes) else float("nan")
    stats["first_position_rate"] = n_a / n_parsed if n_parsed else float("nan")
    stats["order_agreement"] = (n_agree / len(questions) if cfg.both_orders and questions
                                else float("nan"))
    return outcomes, stats

  # -- cache ----------------------------------------------------------------------------------

  def _cache_key(self, text: str) -> str:
    cfg = self.config
    payload = json.dumps({"endpoint": self._endpoint, "model": cfg.model, "prompt": text,
                          "temperature": float(cfg.temperature),
                          "max_tokens": int(cfg.max_tokens),
                          "follow_up": judge_prompts.FOLLOW_UP if cfg.max_malformed_retries else None},
                         sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

  def _load_cache(self) -> dict[str, dict]:
    path = self.config.cache_path
    if not path or not os.path.exists(path):
      return {}
    cache = {}
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          cache[entry["key"]] = entry
        except (ValueError, KeyError, TypeError):
          # A run killed mid-write leaves a partial last line; that answer is simply re-asked.
          logging.warning("judge cache %s:%d is not a JSON entry; ignoring it.", path, lineno)
    return cache

  def _append_cache(self, entry: dict) -> None:
    path = self.config.cache_path
    if not path:
      return
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    with self._lock:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "a+", encoding="utf-8") as f:
        # After a crash mid-line, start on a fresh line so the new entry stays parsable.
        if f.tell() > 0:
          f.seek(f.tell() - 1)
          if f.read(1) != "\n":
            line = "\n" + line
        f.write(line)  # one write per entry: an interruption loses at most this answer
        f.flush()

  # -- requests -------------------------------------------------------------------------------

  def _redact(self, text: str) -> str:
    if self._api_key:
      text = text.replace(self._api_key, "***")
    return text

  def _ask_all(self, keys, texts, answers, stats):
    cfg = self.config
    failures: list[str] = []
    stop = threading.Event()

    def work(key):
      if stop.is_set():
        return
      try:
        entry = self._ask(key, texts[key], stats, stop)
      except (JudgeRequestError, _BudgetExhausted) as e:
        stop.set()  # stop starting new questions; in-flight ones still land in the cache
        with self._lock:
          failures.append(str(e))
        return
      if entry is not None:
        with self._lock:
          answers[key] = entry
        self._append_cache(entry)

    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.max_concurrency) as pool:
      for future in [pool.submit(work, k) for k in keys]:
        future.result()
    if failures:
      done = len(answers)
      where = f"they are cached in {cfg.cache_path}" if cfg.cache_path else "no cache_path is set"
      raise JudgeRequestError(self._redact(
          f"LLM judge stopped after {done} of {len(texts)} answers ({where}; rerun to resume): "
          f"{failures[0]}"))

  def _ask(self, key, text, stats, stop) -> dict | None:
    """Final answer for one question: transient errors and malformed answers retried."""
    cfg = self.config
    question = [{"role": "user", "content": text}]
    messages, answers = question, []
    for malformed_try in range(cfg.max_malformed_retries + 1):
      if malformed_try:
        with self._lock:
          stats["malformed_retries"] += 1
        follow_up = judge_prompts.FOLLOW_UP.format(label=judge_prompts.LABELS[cfg.task])
        messages = question + [{"role": "assistant", "content": answers[0]},
                               {"role": "user", "content": follow_up}]
      answer = self._request_with_retries(messages, stats, stop)
      if answer is None:
        return None
      answers.append(answer)
      verdict = judge_prompts.parse_verdict(answer)
      if verdict is not None:
        break
      logging.warning("LLM judge answer has no A/B verdict (try %d): %r",
                      malformed_try + 1, self._redact(answer)[:200])
    return {"key": key, "model": cfg.model, "verdict": verdict,
            "answer": self._redact("\n---\n".join(answers))}

  def _request_with_retries(self, messages, stats, stop) -> str | None:
    cfg = self.config
    for attempt in range(cfg.max_retries + 1):
      with self._lock:
        if cfg.max_requests is not None and stats["requests"] >= cfg.max_requests:
          raise _BudgetExhausted(
              f"max_requests={cfg.max_requests} reached (config.judge.max_requests)")
        stats["requests"] += 1
        if attempt:
          stats["retries"] += 1
        wait = self._not_before - time.monotonic()
      if wait > 0:
        time.sleep(wait)
      try:
        return self._post(messages)
      except _Transient as e:
        if attempt == cfg.max_retries:
          raise JudgeRequestError(self._redact(
              f"{self._endpoint}: {e} (gave up after {cfg.max_retries} retries)")) from None
        if e.retry_after is not None:
          delay = min(e.retry_after, cfg.max_retry_after_s)
          with self._lock:
            self._not_before = max(self._not_before, time.monotonic() + delay)
        else:
          cap = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** attempt)
          delay = cap * (0.5 + 0.5 * self._rng.random())  # jitter de-synchronizes workers
        logging.warning("LLM judge request failed (%s); retry %d/%d in %.2fs.",
                        self._redact(str(e)), attempt + 1, cfg.max_retries, delay)
        if stop.wait(delay):
          return None  # another question failed for good; the run stops, this one resumes later
    return None

  def _post(self, messages: list[dict]) -> str:
    """One HTTP attempt; returns the message content or raises _Transient/JudgeRequestError."""
    cfg = self.config
    body = json.dumps({
        "model": cfg.model,
        "messages": messages,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
    }).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if self._api_key:
      headers["Authorization"] = "Bearer " + self._api_key
    request = urllib.request.Request(self._endpoint, data=body, headers=headers, method="POST")
    try:
      with self._opener.open(request, timeout=cfg.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as e:
      detail = ""
      try:
        detail = e.read(300).decode("utf-8", "replace")
      except Exception:  # pylint: disable=broad-except  # the status alone is enough
        pass
      if e.code == 429 or e.code >= 500:
        raise _Transient(f"HTTP {e.code}", _retry_after_seconds(e.headers.get("Retry-After")))
      hint = (f" Check the key in ${cfg.api_key_env}." if e.code in (401, 403) else "")
      raise JudgeRequestError(self._redact(
          f"{self._endpoint}: HTTP {e.code}: {detail.strip()}.{hint}")) from None
    except (TimeoutError, socket.timeout):
      raise _Transient(f"timeout after {cfg.timeout_s}s") from None
    except urllib.error.URLError as e:
      raise _Transient(f"connection error: {e.reason}") from None
    except (ConnectionError, http.client.HTTPException, OSError) as e:
      raise _Transient(f"connection error: {type(e).__name__}") from None
    try:
      return json.loads(raw)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
      # Not a chat completion (e.g. a proxy's HTML page): treated as an unparsable answer.
      return ""
