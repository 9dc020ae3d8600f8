"""Throughput, MFU and memory benchmark of the DAA step, the SFT step and sampling.

One workload per process, random weights of a Pythia shape (no download), synthetic data of
exact lengths (the PyTorch baselines' `bench_common.make_pairs` when its tokenizer fits the
model's vocabulary, else random ids of the same lengths):

  python -m daa_jax.bench --model 70m --what train --pairs 8 --prompt_len 128 \\
      --response_len 128 --steps 10          # --no-packing: the two-row layout
  python -m daa_jax.bench --model 70m --what sample --pairs 8 --prompt_len 128 --new_tokens 128

It warms up, times `--steps` steps (each synchronized), and prints one bare JSON line on
stdout (also appended to `--out` when given; logs go to stderr) with `step_s_median`, `pairs_per_s`,
`tokens_per_s`, `model_flops`, `mfu`, `peak_mem_bytes`, `compile_s`, the settings and the
device. Definitions, chosen to match the PyTorch baselines' (`--baselines_dir`):

  * tokens/s, DAA: 2·pairs·(prompt_len + response_len) / step (chosen and rejected sequence
    tokens, whatever the layout; packing computes fewer but counts the same). SFT:
    pairs·(prompt_len + response_len). Sampling: pairs·new_tokens / wall time of one sampler
    call, prefill included (HF generate's definition).
  * response_len counts the EOS (the baselines' --completion-len).
  * model FLOPs: `metrics.step_flops` of the two-row workload (policy forward + backward,
    plus the reference forward unless cached), as the trainer's `perf/mfu` counts them, so
    packed and unpacked runs are comparable and packing shows up as a higher MFU.
    `executed_flops` estimates what the chosen layout actually computes.
  * peak memory: the device's `peak_bytes_in_use` on GPU/TPU; on CPU the process's max RSS.

`python -m daa_jax.bench compare ...` runs the same workload through daa_jax (one or more
`--variants`) and the PyTorch baselines (plain DPO step, TRL's DPOTrainer, HF generate) as
subprocesses, alternating them for `--rounds` rounds, and prints the ratios of medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
from daa_jax.models import config as model_configs
from daa_jax.accel import compare as compare_lib
from daa_jax.train import attention_config

WHATS = ("train", "train_cached_ref", "sft", "sample")
PAD_ID, EOS_ID = 1, 0  # bench_common's tokenizer: Pythia-style specials.


@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark item (all settings end up in the JSON line)."""
  model: str = "70m"
  what: str = "train"
  pairs: int = 8              # pairs (DAA), sequences (SFT) or prompts (sampling)
  prompt_len: int = 128
  response_len: int = 128     # incl. EOS
  new_tokens: int = 128       # sampling
  packing: bool = True        # the trainer's default (config.train.packing)
  pack_multiple: int = 8      # packed rows are padded to a multiple of this
  dtype: str = "float32"
  steps: int = 10
  warmup: int = 2
  optimizer: str = "rmsprop"  # rmsprop (the paper's) | adamw (the torch baseline's)
  attention_impl: str = "xla"
  remat_policy: str = "none"
  scan_layers: bool = False
  logps_chunk: int = 0
  ref_dtype: str = "float32"
  peak_tflops: float = 0.0    # 0: metrics.peak_flops of the device (None on CPU)
  seed: int = 0
  lora_rank: int = 0          # > 0: train LoRA adapters (alpha = 2·rank), the base frozen
  lora_target: str = "attention"  # a models/lora.py preset or regex
  baselines_dir: str = compare_lib.DEFAULT_BASELINES


# --- Data -------------------------------------------------------------------------------


def _bench_common(baselines_dir: str):
  """/work/shared/bench's bench_common module, or None when it (or `tokenizers`) is absent."""
  if not os.path.exists(os.path.join(baselines_dir, "bench_common.py")):
    return None
  if baselines_dir not in sys.path:
    sys.path.insert(0, baselines_dir)
  try:
    import bench_common  # pylint: disable=g-import-not-at-top
    return bench_common
  except ImportError:
    return None


def make_sequences(w: Workload, vocab_size: int, num: int, seed: int = 0):
  """`num` (prompt, chosen, rejected) id lists: prompt_len and response_len - 1 + EOS ids.

  Returns (sequences, source) where source says where the ids came from.
  """
  bc = _bench_common(w.baselines_dir)
  if bc is not None and vocab_size >= 8192:
    tok, _ = bc.build_tokenizer()
    out = []
    for pair in bc.make_pairs(num, w.prompt_len, w.response_len, seed=seed):
      prompt = tok.encode(pair["prompt"]).ids
      responses = [tok.encode(pair["prompt"] + pair[k]).ids[len(prompt):] + [EOS_ID]
                   for k in ("chosen", "rejected")]
      out.append((prompt, *responses))
    if all(len(p) == w.prompt_len and len(c) == len(r) == w.response_len for p, c, r in out):
      return out, "bench_common.make_pairs"
  rng = np.random.default_rng(seed)
  ids = lambda n: list(rng.integers(2, vocab_size, n))  # noqa: E731
  return [(ids(w.prompt_len), ids(w.response_len - 1) + [EOS_ID],
           ids(w.response_len - 1) + [EOS_ID]) for _ in range(num)], "random_ids"


def pair_batch(sequences) -> dict[str, np.ndarray]:
  """The data contract's `[B,2,L]` preference batch of right-padded rows."""
  num = len(sequences)
  length = max(len(p) + max(len(c), len(r)) for p, c, r in sequences)
  batch = {"tokens": np.full((num, 2, length), PAD_ID, np.int32)}
  for k in ("loss_mask", "attention_mask", "positions"):
    batch[k] = np.zeros((num, 2, length), np.int32)
  batch["lengths"] = np.zeros((num, 2), np.int32)
  batch["prompt_lengths"] = np.array([len(s[0]) for s in sequences], np.int32)
  for b, (prompt, *responses) in enumerate(sequences):
    for s, response in enumerate(responses):
      n, p = len(prompt) + len(response), len(prompt)
      batch["tokens"][b, s, :n] = list(prompt) + list(response)
      batch["attention_mask"][b, s, :n] = 1
      batch["positions"][b, s, :n] = np.arange(n)
      batch["loss_mask"][b, s, p - 1:n - 1] = 1  # t predicts token t + 1
      batch["lengths"][b, s] = len(response)
  return batch


# --- Timing -----------------------------------------------------------------------------


def peak_memory_bytes() -> tuple[int, str]:
  """(bytes, what was measured): device peak on GPU/TPU, process max RSS on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def _timed(fn, *args):
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def _model_config(w: Workload, vocab_size: int | None = None):
  """The workload's ModelConfig; 'auto' attention resolved as a run resolves it."""
  import jax  # pylint: disable=g-import-not-at-top
  overrides = dict(dtype=w.dtype, attention_impl=w.attention_impl,
                   remat_policy=w.remat_policy, scan_layers=w.scan_layers)
  if vocab_size:
    overrides["vocab_size"] = vocab_size
  cfg = model_configs.pythia(w.model, **overrides)
  if cfg.attention_impl == "auto":
    kernel, _ = attention_config.resolve_auto(
        cfg, jax.default_backend(), "sft" if w.what == "sft" else "daa", w.packing)
    cfg = cfg.replace(attention_impl=kernel)
  return cfg


def _optimizer(w: Workload):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from daa_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  from daa_jax.train import optim
  if w.optimizer == "rmsprop":
    c = config_lib.optim_fields("paper")
  elif w.optimizer == "adamw":
    # The torch baseline's AdamW: lr 1e-6, no weight decay, no clipping.
    c = config_lib.optim_fields("adamw")
    c.update(lr=1e-6, weight_decay=0.0, grad_clip=0.0, schedule="constant")
  else:
    raise ValueError(f"--optimizer={w.optimizer!r}; use rmsprop or adamw.")
  c.warmup_steps = 0
  return optim.make(ml_collections.ConfigDict(c), total_steps=10_000)[0]


def _executed_flops(cfg, w: Workload, passes: float) -> float:
  """FLOPs the chosen layout computes (prompt once with packing; vocab head on responses)."""
  from daa_jax.train import metrics  # pylint: disable=g-import-not-at-top
  p, r, b = w.prompt_len, w.response_len, w.pairs
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  body = lambda ctx: metrics.forward_flops_per_token(cfg, ctx) - head  # noqa: E731
  if w.packing:
    tokens, ctx, head_positions = b * (p + 2 * r), p + 2 * r, 2 * b * r
  else:
    tokens, ctx, head_positions = 2 * b * (p + r), p + r, 2 * b * (p + r)
  return passes * (body(ctx) * tokens + head * head_positions)


def bench_train(w: Workload) -> dict[str, Any]:
  """The DAA (live or cached reference) or SFT step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from daa_jax.train import metrics  # pylint: disable=g-import-not-at-top
  from daa_jax.train import packing
  from daa_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top
  from daa_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  from daa_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top

  cfg = _model_config(w)
  model = model_lib.CausalLM(cfg)
  params = model_lib.init_params(cfg, jax.random.key(w.seed))
  tx = _optimizer(w)
  kind = "sft" if w.what == "sft" else "daa"
  cached = w.what == "train_cached_ref"
  # LoRA as the trainer runs it: the state holds the adapters, the frozen base goes in as the
  # step's ref_params (policy = base + (alpha/r)·A@B, reference = base), stored in ref_dtype.
  lora = w.lora_rank > 0
  scfg = step_lib.StepConfig(kind=kind, cached_ref=cached, logps_chunk=w.logps_chunk,
                             packing=w.packing and kind == "daa", lora=lora,
                             lora_scale=2.0 if lora else 1.0)
  hparams = {k: jnp.float32(v) for k, v in
             dict(beta=0.1, alpha=0.0, epsilon=0.0, sft_weight=0.0).items()}
  ref_params = None
  if lora:
    ref_params = jax.tree.map(lambda p: jnp.asarray(p, dtype=w.ref_dtype), params)
    params = lora_lib.init_adapters(params, w.lora_rank, w.lora_target, jax.random.key(1))
  elif kind == "daa" and not cached:
    # A copy: the state (and so `params`) is donated to the step.
    ref_params = jax.tree.map(lambda p: jnp.array(p, dtype=w.ref_dtype, copy=True), params)

  num_batches = min(w.steps + w.warmup, 4)  # distinct batches, cycled
  seqs, source = make_sequences(w, cfg.vocab_size, w.pairs * num_batches, w.seed)
  host, pack_s = [], []
  for i in range(num_batches):
    batch = pair_batch(seqs[i * w.pairs:(i + 1) * w.pairs])
    if kind == "sft":
      batch = {k: (v[:, 0] if v.ndim >= 2 and k != "prompt_lengths" else v)
               for k, v in batch.items()}
    if cached:
      batch["ref_logps"] = np.full((w.pairs, 2), -1.0 * w.response_len, np.float32)
    if scfg.packing:
      start = time.perf_counter()
      batch = packing.pack_pairs(batch, pad_id=PAD_ID, multiple=w.pack_multiple)
      pack_s.append(time.perf_counter() - start)
    host.append(batch)
  batches = [jax.device_put(b) for b in host]

  state = step_lib.init_state(params, tx)
  fn = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, cfg=scfg),
               donate_argnums=(0,))
  start = time.perf_counter()
  compiled = fn.lower(state, ref_params, batches[0], hparams).compile()
  compile_s = time.perf_counter() - start
  times, loss = [], None
  for i in range(w.warmup + w.steps):
    (state, m), dt = _timed(compiled, state, ref_params, batches[i % num_batches], hparams)
    if i >= w.warmup:
      times.append(dt)
    loss = float(m["loss/total"])
  median = statistics.median(times)
  seq_len = w.prompt_len + w.response_len
  sequences = w.pairs * (2 if kind == "daa" else 1)
  tokens = sequences * seq_len
  flops = metrics.step_flops(cfg, tokens, seq_len, kind, cached)
  passes = 3.0 + (1.0 if kind == "daa" and not cached else 0.0)
  executed = (_executed_flops(cfg, w, passes) if kind == "daa" else flops)
  return dict(step_s_median=median, step_s_min=min(times), step_s_all=times,
              compile_s=compile_s, pairs_per_s=w.pairs / median, tokens_per_s=tokens / median,
              model_flops=flops, executed_flops=executed, data=source, final_loss=loss,
              pack_s_per_batch=statistics.median(pack_s) if pack_s else None,
              packed_shape=list(host[0]["tokens"].shape) if scfg.packing else None,
              n_params=model_lib.param_count(ref_params if lora else params),
              n_trained_params=model_lib.param_count(params),
              opt_state_bytes=sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))


def bench_sample(w: Workload) -> dict[str, Any]:
  """`sampling.make_sampler`: prefill + `new_tokens` decode steps, pure sampling."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from daa_jax.train import metrics  # pylint: disable=g-import-not-at-top
  from daa_jax.evaluate import sampling
  from daa_jax.models import model as model_lib  # pylint: disable=g-import-not-at-top

  cfg = _model_config(w)
  model = model_lib.CausalLM(cfg)
  params = model_lib.init_params(cfg, jax.random.key(w.seed))
  seqs, source = make_sequences(w, cfg.vocab_size, w.pairs, w.seed + 1)
  prompts = jnp.asarray(np.array([s[0] for s in seqs], np.int32))  # [B,P], all real
  mask = jnp.ones(prompts.shape, jnp.int32)
  # eos_id -1: never stops early, like the baseline's min_new_tokens = max_new_tokens.
  scfg = sampling.SamplingConfig(max_new_tokens=w.new_tokens, temperature=1.0, top_k=0,
                                 top_p=1.0, eos_id=-1, pad_id=PAD_ID)
  sampler = sampling.make_sampler(model, scfg)
  jitted = getattr(sampler, "jitted", sampler)
  start = time.perf_counter()
  compiled = jitted.lower(params, prompts, mask, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(w.warmup + w.steps):
    _, dt = _timed(compiled, params, prompts, mask, jax.random.key(100 + i))
    if i >= w.warmup:
      times.append(dt)
  median = statistics.median(times)
  ctx = w.prompt_len + w.new_tokens
  flops = metrics.forward_flops_per_token(cfg, ctx) * w.pairs * ctx
  return dict(step_s_median=median, step_s_min=min(times), step_s_all=times,
              compile_s=compile_s, pairs_per_s=w.pairs / median,
              tokens_per_s=w.pairs * w.new_tokens / median, model_flops=flops,
              executed_flops=flops, data=source, n_params=model_lib.param_count(params))


def run(w: Workload) -> dict[str, Any]:
  """Benchmarks one workload; returns the JSON-able result."""
  import jax  # pylint: disable=g-import-not-at-top
  from daa_jax.train import metrics  # pylint: disable=g-import-not-at-top
  if w.what not in WHATS:
    raise ValueError(f"--what={w.what!r}; use one of {', '.join(WHATS)}.")
  if w.what in ("sft", "sample"):
    w = dataclasses.replace(w, packing=False)  # pair packing applies to DAA steps only
  result = bench_sample(w) if w.what == "sample" else bench_train(w)
  device = jax.devices()[0]
  peak = w.peak_tflops * 1e12 if w.peak_tflops else metrics.peak_flops(device.device_kind)
  peak_source = ("--peak_tflops" if w.peak_tflops else "device table" if peak else
                 f"unknown for {device.device_kind!r}: pass --peak_tflops for an MFU")
  achieved = result["model_flops"] / result["step_s_median"]
  mem, mem_kind = peak_memory_bytes()
  result.update(
      bench="daa_jax", **{k: v for k, v in dataclasses.asdict(w).items()
                          if k not in ("baselines_dir", "peak_tflops")},
      # One peak: the one used for MFU (TFLOP/s per device), null when unknown, and whence.
      model_tflops_per_s=achieved / 1e12, peak_tflops=peak / 1e12 if peak else None,
      peak_source=peak_source,
      mfu=achieved / peak if peak else None,
      mfu_executed=result["executed_flops"] / result["step_s_median"] / peak if peak else None,
      peak_mem_bytes=mem, peak_mem_kind=mem_kind, device_kind=device.device_kind,
      platform=device.platform, num_devices=jax.device_count(), jax=jax.__version__,
      attention_kernel=_model_config(w).attention_impl,
      tokens_per_s_definition=(
          "pairs*new_tokens / sampler wall time (prefill included)" if w.what == "sample" else
          f"{'' if w.what == 'sft' else '2*'}pairs*(prompt_len+response_len) / median step"))
  return result


def emit(result: dict, out: str | None = None) -> None:
  """Prints the result as one bare JSON line on stdout (logs go to stderr)."""
  line = json.dumps(result, sort_keys=True)
  print(line, flush=True)
  if out:
    with open(out, "a", encoding="utf-8") as f:
      f.write(line + "\n")


# --- compare: daa_jax vs the PyTorch baselines, interleaved ---------------------------------


# --- CLI --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m daa_jax.bench", description=__doc__.split("\n")[0])
  p.add_argument("command", nargs="?", default="run", choices=["run", "compare"])
  d = Workload()
  p.add_argument("--model", default=d.model,
                 help="a size-table entry: 70m, 1b, ..., gemma-2-2b, llama-3.2-1b, ..., tiny")
  p.add_argument("--what", default=d.what, choices=WHATS)
  p.add_argument("--pairs", type=int, default=d.pairs)
  p.add_argument("--prompt_len", type=int, default=d.prompt_len)
  p.add_argument("--response_len", type=int, default=d.response_len, help="incl. EOS")
  p.add_argument("--new_tokens", type=int, default=d.new_tokens)
  p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=d.packing,
                 help="prompt-shared pair packing (the trainer's default); --no-packing: "
                      "the two-row layout")
  p.add_argument("--pack_multiple", type=int, default=d.pack_multiple,
                 help="pad packed rows to a multiple of this (64 suits cuDNN attention)")
  p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
  p.add_argument("--steps", type=int, default=d.steps, help="timed steps (median)")
  p.add_argument("--warmup", type=int, default=d.warmup)
  p.add_argument("--optimizer", default=d.optimizer, choices=["rmsprop", "adamw"])
  p.add_argument("--attention_impl", default=d.attention_impl, help="xla | blockwise | cudnn | gpu_flash | splash | auto "
                      "(the platform's kernel, as a run picks it)")
  p.add_argument("--remat_policy", default=d.remat_policy)
  p.add_argument("--scan_layers", action="store_true")
  p.add_argument("--logps_chunk", type=int, default=d.logps_chunk)
  p.add_argument("--ref_dtype", default=d.ref_dtype)
  p.add_argument("--peak_tflops", type=float, default=d.peak_tflops,
                 help="peak TFLOP/s per device for MFU (default: known devices only)")
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--lora_rank", type=int, default=d.lora_rank,
                 help="> 0: train LoRA adapters of this rank (alpha = 2 x rank) over a frozen "
                      "base, which is also the reference")
  p.add_argument("--lora_target", default=d.lora_target,
                 help="LoRA targets: attention | all_linear | a regex over kernel paths")
  p.add_argument("--out", default=None, help="append the JSON line to this file")
  p.add_argument("--baselines_dir", default=d.baselines_dir)
  # compare
  p.add_argument("--compare", action="store_true", help="same as the `compare` command")
  p.add_argument("--variants", default="",
                 help="compare: daa_jax items, e.g. train,train+two_row,train_cached_ref+scan+dots")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--no_trl", action="store_true")
  p.add_argument("--no_baselines", action="store_true", help="compare daa_jax variants only")
  p.add_argument("--timeout_s", type=int, default=3600)
  return p


def main(argv=None) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  logging.set_verbosity(logging.INFO)
  if args.command == "compare" or args.compare:
    emit(compare_lib.compare(args), args.out)
    return
  fields = {f.name for f in dataclasses.fields(Workload)}
  w = Workload(**{k: v for k, v in vars(args).items() if k in fields})
  emit(run(w), args.out)


if __name__ == "__main__":
  main()
