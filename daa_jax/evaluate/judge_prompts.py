"""The LLM judge's prompts (TL;DR, dialogue) and the parser of its verdict line."""

from __future__ import annotations

import re


# The DPO paper's GPT-4 prompts (Rafailov et al. 2023, Appendix C.2): the "concise" TL;DR
# prompt that the over-optimization paper most likely reused, and the dialogue ("helpful")
# prompt for Anthropic HH. Only the template is parsed by str.format, so braces in posts are safe.
TLDR_PROMPT = (
    "Which of the following summaries does a better job of summarizing the most important "
    "points in the given forum post, without including unimportant or irrelevant details? A "
    "good summary is both precise and concise.\n\n"
    "Post:\n{prompt}\n\n"
    "Summary A:\n{a}\n\n"
    "Summary B:\n{b}\n\n"
    "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer "
    "and why. SECOND, on a new line, state only \"A\" or \"B\" to indicate your choice. Your "
    "response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "Preferred: <\"A\" or \"B\">")


DIALOGUE_PROMPT = (
    "For the following query to a chatbot, which response is more helpful?\n\n"
    "Query: {prompt}\n\n"
    "Response A:\n{a}\n\n"
    "Response B:\n{b}\n\n"
    "FIRST provide a one-sentence comparison of the two responses and explain which you feel "
    "is more helpful. SECOND, on a new line, state only \"A\" or \"B\" to indicate which "
    "response is more helpful. Your response should use the format:\n"
    "Comparison: <one-sentence comparison and explanation>\n"
    "More helpful: <\"A\" or \"B\">")


PROMPTS = {"tldr": TLDR_PROMPT, "dialogue": DIALOGUE_PROMPT}


# A malformed answer is re-asked as a follow-up turn (question, answer, this), not by resending
# the identical temperature-0 request, which would most likely return the same answer again.
FOLLOW_UP = ("Your answer does not end with the required line. Reply with that line only: "
             "\"{label}: A\" or \"{label}: B\".")


LABELS = {"tldr": "Preferred", "dialogue": "More helpful"}


_VERDICT_RE = re.compile(
    r"^\W*(?:preferred|more\s+helpful)\W*:\W*([AB])\b", re.IGNORECASE | re.MULTILINE)


def parse_verdict(answer: str) -> str | None:
  """'A', 'B', or None when the answer names no choice.

  Takes the last 'Preferred:' / 'More helpful:' line (markdown bold and quotes tolerated); else
  a last line that is only A or B.
  """
  matches = _VERDICT_RE.findall(answer or "")
  if matches:
    return matches[-1].upper()
  lines = [ln for ln in (answer or "").strip().splitlines() if ln.strip()]
  if lines:
    last = lines[-1].strip().strip("\"'*.` ").upper()
    if last in ("A", "B"):
      return last
  return None
