"""The trainer's and the sampler's jitted programs with abstract, sharded arguments.

`build(setup, name, micro)` returns `(jitted_fn, args)` for one of `PROGRAMS`, made as
`train/loop.py` (the DAA and SFT steps), `reference_lib.compute_pair_logps` (the reference log-prob pass)
and `evaluate/sampling.py` (prefill, one decode step) make them, with `jax.ShapeDtypeStruct`
arguments carrying the trainer's shardings: `fn.trace(*args).lower(...)` needs no memory
and no devices (an AbstractMesh works). `accel/plan.py` lowers and compiles them.

Batches are full-length pairs: a `prompt_len` prompt and two `response_len` responses,
packed by `packing.pack_pairs` (or `fixed_layout.pack_fixed` with `packing='fixed'`) itself,
so packed shapes are the trainer's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from daa_jax.models import model as model_lib
from daa_jax.train import optim
from daa_jax.train import fixed_layout
from daa_jax.train import packing as packing_lib
from daa_jax.evaluate import sampling
from daa_jax.models import sharding
from daa_jax.train import step as step_lib
from daa_jax.errors import ConfigError, DataError
from daa_jax.models import config as model_configs
from daa_jax.train import init as init_lib
from daa_jax.train import lora_state

PROGRAMS = ("daa_live_packed", "daa_live_tworow", "daa_cached_packed", "daa_cached_tworow",
            "sft", "ref_logps", "sample_prefill", "sample_decode")
PAD_ID = 1


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def shard_bytes(tree) -> int:
  """Bytes of one device's shard of every array in a tree of sharded ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# --- Batches (host-side, as the data pipeline and packing.pack_pairs make them) ------------


def pair_batch(pairs: int, prompt_len: int, response_len: int, cached_ref: bool) -> dict:
  """A two-row preference batch (data contract) of full-length pairs, numpy."""
  length = prompt_len + response_len
  t = np.arange(length)
  tokens = np.full((pairs, 2, length), 5, np.int32)
  mask = np.ones((pairs, 2, length), np.int32)
  loss = ((t >= prompt_len - 1) & (t < length - 1)).astype(np.int32)
  batch = dict(tokens=tokens, loss_mask=np.broadcast_to(loss, tokens.shape).copy(),
               attention_mask=mask, positions=np.broadcast_to(t, tokens.shape).astype(np.int32),
               lengths=np.full((pairs, 2), response_len, np.int32),
               prompt_lengths=np.full((pairs,), prompt_len, np.int32))
  if cached_ref:
    batch["ref_logps"] = np.zeros((pairs, 2), np.float32)
  return batch


def pack(config, host: dict) -> dict:
  """`host` packed as the trainer packs it: `config.train.packing` 'fixed' or True."""
  t = config.train
  if t.get("packing") == "fixed":
    return fixed_layout.pack_fixed(host, pad_id=PAD_ID,
                                   block=int(t.get("packing_block", fixed_layout.BLOCK)))
  return packing_lib.pack_pairs(host, pad_id=PAD_ID)


def _global_batch(host: dict, mesh) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
          for k, v in host.items()}


# --- The programs --------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What every program of one plan shares."""
  config: Any
  mesh: Any
  model_cfg: model_configs.ModelConfig
  model: model_lib.CausalLM
  tx: Any
  lr_fn: Any
  params: Any            # sharded ShapeDtypeStructs of the model's (merged) params
  state: Any             # TrainState of those
  state_shardings: Any
  ref_params: Any        # reference dtype, sharded like params
  prompt_len: int
  response_len: int
  sample_batch: int
  new_tokens: int


def make_setup(config, mesh, prompt_len=None, response_len=None, sample_batch=None,
               new_tokens=None, platform: str | None = None) -> Setup:
  """Model, optimizer, abstract params/state/reference with the trainer's shardings.

  `platform`: the target ('tpu', 'cuda'; default this host's backend), for which
  `attention_impl='auto'` is resolved (`init.model_config`).

  The planned lengths are `prompt_len`/`response_len` when both are given; otherwise the
  config's data lengths, 'auto' ones fitted from `config.data` by `init.resolve_auto` exactly
  as training fits them (raises ConfigError, naming the flags, where no data can be read).
  """
  config = _with_planned_lengths(config, prompt_len, response_len)
  model_cfg = init_lib.model_config(config, platform=platform)
  tx, lr_fn = optim.make(config.optim, 1000)
  param_shardings = sharding.param_shardings(model_cfg, mesh)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                                   jax.random.key(0))
  replicated = NamedSharding(mesh, P())
  # LoRA: the state trains the adapters only; the base is the (always live) reference.
  trained, trained_shardings = (
      lora_state.adapter_layout(config, abstract_params, mesh, param_shardings)
      if lora_state.enabled(config) else (abstract_params, param_shardings))
  state_shardings = step_lib.TrainState(
      step=replicated, params=trained_shardings,
      opt_state=init_lib.opt_state_shardings(tx, trained, trained_shardings, mesh))
  state = _abstract(jax.eval_shape(functools.partial(step_lib.init_state, tx=tx),
                                   trained), state_shardings)
  ref_dtype = jnp.dtype(config.objective.get("ref_dtype", "float32"))
  ref = _abstract(jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, ref_dtype),
                               abstract_params), param_shardings)
  d = config.data
  prompt_len = int(prompt_len or d.get("max_prompt_length") or d.max_length // 2)
  response_len = int(response_len or d.max_length - prompt_len)
  if prompt_len < 1 or response_len < 1:
    raise ConfigError(f"prompt_len={prompt_len}, response_len={response_len}: both must be "
                      ">= 1 (config.data.max_length, config.data.max_prompt_length or "
                      "--prompt_len/--response_len).")
  micro = config.train.batch_size // config.train.grad_accum
  return Setup(config, mesh, model_cfg, model_lib.CausalLM(model_cfg), tx, lr_fn,
               _abstract(abstract_params, param_shardings), state, state_shardings, ref, prompt_len, response_len,
               int(sample_batch or micro), int(new_tokens or response_len))


def _with_planned_lengths(config, prompt_len, response_len):
  """`config` with its 'auto' fields resolved as the run would, lengths from flags or data."""
  config = config.copy_and_resolve_references()
  d = config.data
  auto = int(d.max_length) == 0 or (d.max_prompt_length is not None
                                    and int(d.max_prompt_length) == 0)
  flags = "--prompt_len=N --response_len=M (prompt tokens; response tokens with EOS)"
  if prompt_len and response_len:
    # The flags are the shapes: nothing to fit, so no data is read.
    d.max_length, d.max_prompt_length = int(prompt_len) + int(response_len), int(prompt_len)
  elif auto and d.source == "synthetic":
    # The configs' default data is the synthetic task (21 + 17 tokens): planning a real run
    # at those shapes would promise micro-batches that never fit.
    raise ConfigError(
        "config.data.source='synthetic' (the configs' default) with 'auto' lengths: plan "
        "would size the run for the synthetic task's 21-token prompts and 17-token responses. "
        "Give the data you will train on (--config.data.source=PATH --config.data.format=..., "
        "and --config.data.tokenizer as for training) so its lengths are fitted as training "
        f"fits them, or the lengths as flags: {flags}, e.g. --prompt_len=384 "
        "--response_len=48 for TL;DR posts and summaries with Pythia's tokenizer; to plan the synthetic task itself, "
        "--prompt_len=21 --response_len=17.")
  try:
    return init_lib.resolve_auto(config, None)
  except DataError as e:
    if not auto or (prompt_len and response_len):
      raise
    raise ConfigError(
        f"plan fits the 'auto' lengths of config.data (max_length=0) from the data, as "
        f"training does, and could not read it: {e} Run plan where the data is, or give the "
        f"lengths as flags: {flags}.") from e


def _hparams(config, mesh):
  h = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
       for k in step_lib.hparams_from_config(config.objective)}
  return h


def train_program(s: Setup, kind: str, cached_ref: bool, packing: bool, micro: int):
  """The trainer's jitted step (as `train.run` builds it) and its abstract arguments."""
  c, t = s.config, s.config.train
  grad_accum = int(t.grad_accum)
  global_batch = micro * grad_accum
  if kind == "daa":
    host = pair_batch(global_batch, s.prompt_len, s.response_len, cached_ref)
    if packing:
      host = pack(c, host)
  else:
    host = {k: v[:, 0] for k, v in pair_batch(global_batch, s.prompt_len, s.response_len,
                                              False).items() if v.ndim >= 2}
    host["prompt_lengths"] = np.full((global_batch,), s.prompt_len, np.int32)
  scfg = step_lib.StepConfig(
      kind=kind, objective=c.objective.name if kind == "daa" else "dpo",
      normalize=c.objective.normalize if kind == "daa" else "sum", grad_accum=grad_accum,
      cached_ref=cached_ref, logps_chunk=int(t.logps_chunk), packing=packing,
      **lora_state.step_fields(c))
  replicated = NamedSharding(s.mesh, P())
  live = scfg.lora or (kind == "daa" and not cached_ref)  # LoRA: the base is an argument
  fn = jax.jit(functools.partial(step_lib.train_step, model=s.model, tx=s.tx, cfg=scfg,
                                 lr_fn=s.lr_fn),
               in_shardings=(s.state_shardings,
                             jax.tree.map(lambda x: x.sharding, s.ref_params) if live else None,
                             None, replicated),
               out_shardings=(s.state_shardings, replicated), donate_argnums=(0,))
  args = (s.state, s.ref_params if live else None, _global_batch(host, s.mesh),
          _hparams(c, s.mesh))
  return fn, args


def ref_logps_program(s: Setup, micro: int):
  """`reference_lib.compute_pair_logps`'s jitted pass (packed as the trainer's default)."""
  packing = bool(s.config.train.get("packing", True))
  host = pair_batch(micro, s.prompt_len, s.response_len, False)
  host.pop("prompt_lengths")
  if packing:
    host = pack(s.config, host)
  fn = jax.jit(functools.partial(step_lib.pair_logps, s.model,
                                 logps_chunk=int(s.config.train.logps_chunk), packing=packing),
               out_shardings=NamedSharding(s.mesh, P()))
  return fn, (s.ref_params, _global_batch(host, s.mesh))


def _sampling_cfg(s: Setup):
  return sampling.SamplingConfig(max_new_tokens=s.new_tokens, eos_id=0, pad_id=PAD_ID)


def prefill_program(s: Setup):
  b, p = s.sample_batch, s.prompt_len
  fn = jax.jit(functools.partial(sampling.prefill, s.model, max_new_tokens=s.new_tokens,
                                 mesh=s.mesh))
  prompts = _global_batch({"t": np.zeros((b, p), np.int32), "m": np.ones((b, p), np.int32)},
                          s.mesh)
  return fn, (s.params, prompts["t"], prompts["m"])


def decode_program(s: Setup):
  b = s.sample_batch
  cache = jax.eval_shape(lambda: model_lib.init_cache(s.model_cfg, b, s.prompt_len +
                                                      s.new_tokens))
  cache = _abstract(cache, sharding.cache_shardings(s.mesh, cache))
  fn = jax.jit(functools.partial(sampling.decode_step, s.model, cfg=_sampling_cfg(s),
                                 mesh=s.mesh), donate_argnums=(1,))
  rows = _global_batch({"logits": np.zeros((b, s.model_cfg.vocab_size), s.model_cfg.dtype),
                        "done": np.zeros((b,), bool), "pos": np.zeros((b,), np.int32)}, s.mesh)
  replicated = NamedSharding(s.mesh, P())
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return fn, (s.params, cache, rows["logits"], rows["done"], rows["pos"],
              jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
              jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))


def build(s: Setup, name: str, micro: int):
  if name.startswith("daa_"):
    return train_program(s, "daa", "cached" in name, name.endswith("packed"), micro)
  if name == "sft":
    return train_program(s, "sft", False, False, micro)
  if name == "ref_logps":
    return ref_logps_program(s, micro)
  if name == "sample_prefill":
    return prefill_program(s)
  if name == "sample_decode":
    return decode_program(s)
  raise ConfigError(f"--programs: {name!r} is unknown; choose from {', '.join(PROGRAMS)}.")
