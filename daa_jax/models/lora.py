"""LoRA (Hu et al. 2021) over any family's params: adapters beside a frozen base.

The adapters mirror the module tree of the base's targeted Dense kernels:

  base:     {'layers_0': {'self_attn': {'q_proj': {'kernel': [in, out], 'bias': ...}}}, ...}
  adapters: {'layers_0': {'self_attn': {'q_proj': {'a': [in, r], 'b': [r, out]}}}, ...}

(with `scan_layers` both carry the leading [N] layer axis: `layers/.../kernel` [N, in, out],
`a` [N, in, r], `b` [N, r, out]). `merge(base, adapters, scale)` is the base with each targeted
kernel replaced by `W + scale·A@B` (float32), a pure function over the params tree, so every
family's forward runs unchanged on the merged tree, and the base with no adapters is the base
itself (the reference: no second copy). `a` starts as PEFT's (kaiming-uniform, a=√5:
U(±1/√in)) and `b` at zero, so the merged model starts equal to the base. PEFT's
`lora_dropout` needs the activation-level form `x@W + dropout(x)@A@(scale·B)`, which merged
weights cannot express: `with_adapters` runs it (the layers' side is `layers._Dense`).

Targets: a regex searched (`re.search`) in each kernel's '/'-joined path
(`layers_0/self_attn/q_proj/kernel`, or `layers/...` with scan_layers); only leaves named
`kernel` are targeted. Presets in `PRESETS`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util

from daa_jax.errors import ConfigError

PyTree = Any

# Every family names its kernels as its HF checkpoint: GPT-NeoX attention/query_key_value,
# attention/dense, mlp/dense_h_to_4h, mlp/dense_4h_to_h; Llama/Mistral/Qwen2/Gemma-2
# self_attn/{q,k,v,o}_proj, mlp/{gate,up,down}_proj. The output projection (lm_head,
# embed_out) and embeddings are never targeted by a preset (as PEFT's all-linear).
PRESETS = {
    "attention": r"(self_attn/[qkvo]_proj|attention/(query_key_value|dense))/kernel$",
    "all_linear": r"(self_attn|attention|mlp)/[^/]+/kernel$",
}


def pattern_of(target: str) -> str:
  """The regex of `target` (a preset name or a regex)."""
  return PRESETS.get(target, target)


def _flatten(tree):
  """(path tuple, leaf) pairs of a nested dict (flax's flatten_dict)."""
  return traverse_util.flatten_dict(tree).items()


_unflatten = traverse_util.unflatten_dict


def target_paths(base: PyTree, target: str, prefix: str = "config.model.lora.") -> list[tuple]:
  """Paths (tuples, ending in 'kernel') of the base's kernels that `target` selects.

  Raises:
    ConfigError: a regex that does not compile or selects no kernel (naming some kernels).
  """
  pattern = pattern_of(target)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{prefix}target={target!r} is not a valid regex ({e}); use a preset "
                      f"({', '.join(PRESETS)}) or a regex over paths such as "
                      "'layers_0/self_attn/q_proj/kernel'.") from e
  kernels = [p for p, _ in _flatten(base) if p[-1] == "kernel"]
  chosen = [p for p in kernels if regex.search("/".join(p))]
  if not chosen:
    some = ", ".join("/".join(p) for p in kernels[:6])
    raise ConfigError(
        f"{prefix}target={target!r} selects no kernel of this model; its kernels are named "
        f"like {some}. Use a preset ({', '.join(PRESETS)}) or a regex over those paths.")
  return chosen


def init_adapters(base: PyTree, rank: int, target: str, rng: jax.Array) -> PyTree:
  """Fresh float32 adapters for `base` (arrays or ShapeDtypeStructs): `a` kaiming-uniform as
  PEFT's `lora_A` (U(±1/√in)), `b` zeros."""
  flat = dict(_flatten(base))
  out = {}
  for i, path in enumerate(target_paths(base, target)):
    shape = tuple(flat[path].shape)
    lead, (fan_in, fan_out) = shape[:-2], shape[-2:]
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(rng, i), lead + (fan_in, rank), jnp.float32,
                           -bound, bound)
    out[path[:-1] + ("a",)] = a
    out[path[:-1] + ("b",)] = jnp.zeros(lead + (rank, fan_out), jnp.float32)
  return _unflatten(out)


def abstract_adapters(base: PyTree, rank: int, target: str) -> PyTree:
  """ShapeDtypeStructs of `init_adapters(base, ...)`."""
  return jax.eval_shape(lambda: init_adapters(base, rank, target, jax.random.key(0)))


def delta(adapters_of_one: Mapping[str, jax.Array], scale: float) -> jax.Array:
  """scale·A@B of one kernel ([.., in, out], float32)."""
  a, b = adapters_of_one["a"], adapters_of_one["b"]
  return scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                            b.astype(jnp.float32))


def merge(base: PyTree, adapters: PyTree | None, scale: float) -> PyTree:
  """The base with each adapted kernel `W` replaced by `W + scale·A@B` in float32 (the
  model casts it to the compute dtype as any weight); other leaves are the base's own.
  `adapters=None` returns `base` itself."""
  if adapters is None:
    return base
  flat_base = dict(_flatten(base))
  merged = dict(flat_base)
  flat = dict(_flatten(adapters))
  for path in {p[:-1] for p in flat}:
    kernel = path + ("kernel",)
    if kernel not in flat_base:
      raise KeyError(f"adapters for {'/'.join(path)}, which has no kernel in the base")
    merged[kernel] = flat_base[kernel].astype(jnp.float32) + delta(
        {"a": flat[path + ("a",)], "b": flat[path + ("b",)]}, scale)
  return _unflatten(merged)


class _WithAdapters:
  """`model` whose `apply` runs the activation-level form `x@W + dropout(x)@A@(scale·B)` in
  each adapted layer (`layers._Dense`), the adapters passed as the 'lora' collection."""

  def __init__(self, model, adapters: PyTree, scale: float, dropout: float, rng: jax.Array):
    self.model = type(model)(model.config.replace(lora_dropout=float(dropout)))
    self.lora = _unflatten({p: v * scale if p[-1] == "b" else v for p, v in _flatten(adapters)})
    self.rng = rng

  def apply(self, variables, *args, **kwargs):
    return self.model.apply({**variables, "lora": self.lora}, *args,
                            rngs={"dropout": self.rng}, **kwargs)


def with_adapters(model, adapters: PyTree, scale: float, dropout: float, rng: jax.Array):
  """A stand-in for `model` (same `apply(variables, ...)`) that runs LoRA at the activation
  level with dropout, as PEFT trains: each adapted layer computes
  `x@W + dropout(x)@A@(scale·B)`, one inverted-dropout mask (rate `dropout`) per layer and
  call, drawn from `rng` (split over scanned layers). `variables` then hold the *base*
  params. With `dropout=0` it equals the merged forward `merge(base, adapters, scale)` up to
  rounding; the training step uses it only for `config.model.lora.dropout > 0` (evaluation,
  sampling and exports run the merged weights: dropout off, as PEFT's `model.eval()`)."""
  return _WithAdapters(model, adapters, scale, dropout, rng)


def adapted_modules(adapters: PyTree) -> list[tuple]:
  """The module paths (without 'a'/'b') that carry adapters."""
  return sorted({p[:-1] for p, _ in _flatten(adapters)})


def flatten(tree) -> dict:
  return dict(_flatten(tree))


def unflatten(flat) -> dict:
  return _unflatten(flat)
