"""Chat templates for dialogue data: HH turns -> messages -> the tokenizer's `chat_template`.

Instruction-tuned checkpoints (Gemma-2-it, Llama-3-Instruct, Qwen2.5-Instruct) expect their
own turn markup, not HH's "\\n\\nHuman: ... \\n\\nAssistant:". With `config.data.chat_template`
set, every example's prompt becomes the template rendered with `add_generation_prompt=True`
(for Gemma-2: `<bos><start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n`) and its
response the rest of the conversation rendered with the response as the last assistant turn
(`...response<end_of_turn>\\n`; EOS is appended after it as for every response). The prompt
mask is then exact at the template's boundary: the prompt is everything the template writes
before the model's turn starts, the response everything it writes after, and the pipeline
tokenizes the two separately.

Rendering is transformers' `apply_chat_template`: jinja2's sandboxed environment with
`trim_blocks`/`lstrip_blocks`, `raise_exception`, the `bos_token`/`eos_token` strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

from daa_jax.errors import ConfigError, DataError

_TURN = re.compile(r"\n\nHuman:|\n\nAssistant:")


def hh_messages(prompt: str) -> list[dict[str, str]]:
  """An HH prompt ("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:") ->
  [{'role': 'user', 'content': 'a'}, {'role': 'assistant', ...}, {'role': 'user', ...}].

  Raises:
    DataError: the text is not HH dialogue, or turns do not alternate from the user.
  """
  starts = list(_TURN.finditer(prompt))
  if not starts or starts[0].start() != 0 and prompt[:starts[0].start()].strip():
    raise DataError(f"chat template: the prompt {prompt[:60]!r} is not HH dialogue (no "
                    "'\\n\\nHuman:' turns); unset config.data.chat_template for this data.")
  messages = []
  for i, m in enumerate(starts):
    end = starts[i + 1].start() if i + 1 < len(starts) else len(prompt)
    role = "user" if "Human" in m.group() else "assistant"
    content = prompt[m.end():end].strip()
    if messages and messages[-1]["role"] == role:  # HH has a few doubled turns: merge them
      messages[-1]["content"] += "\n\n" + content
    else:
      messages.append({"role": role, "content": content})
  if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()  # the trailing "\n\nAssistant:" is the generation prompt
  if messages[0]["role"] != "user" or messages[-1]["role"] != "user":
    raise DataError(f"chat template: the prompt {prompt[:60]!r} must start with a Human "
                    "turn and end with '\\n\\nAssistant:'.")
  return messages


def _token_text(value: Any) -> str:
  if isinstance(value, Mapping):  # {"content": "<bos>", "__type": "AddedToken", ...}
    return str(value.get("content", ""))
  return "" if value is None else str(value)


def _hub_tokenizer_config(name: str) -> dict:
  """chat_template, bos_token, eos_token of a hub tokenizer (from the local HF cache)."""
  try:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    tok = AutoTokenizer.from_pretrained(name)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.data.chat_template='tokenizer': cannot load tokenizer {name!r} "
                      f"({e}); give a local tokenizer directory or a template file.") from e
  return dict(chat_template=getattr(tok, "chat_template", None), bos_token=tok.bos_token,
              eos_token=tok.eos_token)


class ChatTemplate:
  """A jinja2 chat template as transformers renders it."""

  def __init__(self, template: str, bos_token: str = "", eos_token: str = "",
               source: str = "chat_template"):
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                              indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
      self._template = env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
      raise ConfigError(f"config.data.chat_template: {source} does not compile ({e}).") from e
    self.bos_token, self.eos_token, self.source = bos_token, eos_token, source
    self.fingerprint = hashlib.sha256(
        json.dumps([template, bos_token, eos_token]).encode()).hexdigest()[:16]

  @classmethod
  def load(cls, spec: str, tokenizer_path: str) -> "ChatTemplate":
    """`spec` 'tokenizer': the `chat_template` of the tokenizer directory (its
    chat_template.jinja or tokenizer_config.json); else a .jinja file path.

    Raises:
      ConfigError: no template there.
    """
    config_file = os.path.join(tokenizer_path, "tokenizer_config.json")
    tok_config = {}
    if os.path.isfile(config_file):
      with open(config_file) as f:
        tok_config = json.load(f)
    elif spec == "tokenizer" and not os.path.exists(tokenizer_path):
      tok_config = _hub_tokenizer_config(tokenizer_path)
    bos, eos = _token_text(tok_config.get("bos_token")), _token_text(tok_config.get("eos_token"))
    if spec != "tokenizer":
      if not os.path.isfile(spec):
        raise ConfigError(f"config.data.chat_template={spec!r} is neither 'tokenizer' nor a "
                          "template file; give one of them.")
      with open(spec) as f:
        return cls(f.read(), bos, eos, source=spec)
    jinja_file = os.path.join(tokenizer_path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      with open(jinja_file) as f:
        return cls(f.read(), bos, eos, source=jinja_file)
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
      raise ConfigError(
          f"config.data.chat_template='tokenizer' but config.data.tokenizer="
          f"{tokenizer_path!r} has no chat_template (no chat_template.jinja, none in "
          "tokenizer_config.json); give a template file or use an instruction-tuned "
          "model's tokenizer.")
    return cls(template, bos, eos, source=config_file)

  def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    import jinja2  # pylint: disable=g-import-not-at-top
    try:
      return self._template.render(messages=list(messages),
                                   add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f"chat template {self.source}: {e}") from e

  def split(self, messages: Sequence[Mapping[str, str]], response: str) -> tuple[str, str]:
    """(prompt text up to the model's turn, response text through the end of its turn).

    Raises:
      DataError: the conversation with the response does not start with the prompt
        (a template that rewrites earlier turns cannot give an exact prompt mask).
    """
    prompt = self.render(messages, add_generation_prompt=True)
    full = self.render(list(messages) + [{"role": "assistant", "content": response}],
                       add_generation_prompt=False)
    if not full.startswith(prompt):
      raise DataError(f"chat template {self.source}: the rendered conversation does not "
                      "start with the rendered prompt, so the prompt mask would be "
                      "ambiguous; use a template that only appends turns.")
    return prompt, full[len(prompt):]


def apply(examples: Sequence[Any], template: ChatTemplate) -> list[Any]:
  """HH `PairExample`s / `SFTExample`s -> the same examples in the template's markup."""
  out = []
  for e in examples:
    try:
      messages = hh_messages(e.prompt)
    except DataError as err:
      raise DataError(f"{e.source}:{e.line}: {err}") from None
    fields = {}
    for name in ("chosen", "rejected", "response"):
      if hasattr(e, name):
        prompt, fields[name] = template.split(messages, getattr(e, name).strip())
    out.append(dataclasses.replace(e, prompt=prompt, **fields))
  return out
