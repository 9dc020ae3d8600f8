"""Lowers the trainer's and the sampler's programs for TPU or CUDA pods from any machine, and
plans per-device memory.

  python -m daa_jax.plan --config configs/daa.py:size=6.9b --mesh 1,16,1 --platform tpu \\
      --topology v5e:4x4 --device_memory 16GiB
  python -m daa_jax.plan --config configs/daa.py:size=6.9b,precision=bf16 --mesh 1,1,1 \\
      --platform cuda --device_memory 141GB --config.model.remat_policy=full

The programs are the real ones, built from the config as `train/loop.py`, `evaluate/loop.py` and
`evaluate/sampling.py` build them: the DAA step (live or cached reference; packed or two-row rows),
the SFT step, the reference log-prob pass, and sampling's prefill and decode step. Inputs are
abstract (`jax.ShapeDtypeStruct` with shardings), so nothing is allocated.

  * `--platform tpu`: the mesh is made of the devices of a TPU topology
    (`jax.experimental.topologies.get_topology_desc`, libtpu: `pip install -e ".[tpu]"`)
    and every program is compiled by the TPU compiler; the compiled program's
    `memory_analysis()` is the per-device memory. A compile that runs out of HBM is reported
    as `fits: false` with the compiler's message, as the pod would.
  * `--platform cuda`: the mesh is a `jax.sharding.AbstractMesh` and programs are lowered
    (StableHLO for CUDA); activations come from a formula (`activation_bytes`), which the
    tests check against the TPU compiler on the same program and mesh.

Weights, gradients, optimizer state and the reference are exact on both platforms: bytes of
each array's shard under its real sharding. `max_micro_batch` solves memory = linear in the
micro-batch: on TPU through the compiled totals at the configured micro-batch and twice it
(one extra compile; `--nofit` uses the formula's slope instead), on CUDA through the formula. The last stdout line is one JSON object (`lowered`, `compiled`,
`per_device_bytes`, `fits`, `max_micro_batch`, per-program details); above it, a table.

Packed rows are planned at their largest size: a `--prompt_len` prompt (default
`config.data.max_prompt_length`) and two responses of `--response_len` tokens (default
`max_length - prompt_len`), as `packing.pack_pairs` lays them out. 'Auto' data lengths are fitted
from `config.data` as training fits them (`init.resolve_auto`); the configs' default synthetic
task, or data that cannot be read here, needs both flags (a ConfigError says so).
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp

from daa_jax.train import config as config_lib
from daa_jax.accel import programs as programs_lib
from daa_jax.train import lora_state
from daa_jax.errors import ConfigError
from daa_jax.models import config as model_configs
from daa_jax.accel import devices as devices_lib

PROGRAMS = programs_lib.PROGRAMS


# --- Meshes --------------------------------------------------------------------------------


# --- Memory --------------------------------------------------------------------------------


def activation_bytes(cfg: model_configs.ModelConfig, mesh_shape: dict, name: str, micro: int,
                     row_len: int, vocab_rows: int) -> int:
  """Per-device activation bytes of a program at `micro` rows (pairs or sequences) per step.

  A formula for platforms without a local compiler (CUDA), checked against the TPU
  compiler's `memory_analysis()` in the tests. Counts what the backward pass keeps per layer
  at the remat policy (full: each layer's input, plus one layer recomputed), the attention
  probabilities in float32, the vocabulary projection at `vocab_rows` positions per row
  (logits, float32 log-softmax and its gradient), and two layers of FSDP-gathered weights.

  Args:
    cfg: the model config (dtype, remat_policy).
    mesh_shape: mesh axis -> size.
    name: a `PROGRAMS` name.
    micro: rows of one micro-batch (all devices).
    row_len: tokens per row (packed length, two-row length or prompt length).
    vocab_rows: positions per row that go through the vocabulary projection.
  """
  c = jnp.dtype(cfg.dtype).itemsize
  d, f, h, n, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                   cfg.num_hidden_layers, cfg.vocab_size)
  tp = mesh_shape["tensor"]
  dp = mesh_shape["data"] * mesh_shape["fsdp"]
  rows = max(micro // dp, 1) * (2 if name.endswith("tworow") else 1)
  tokens = rows * row_len
  attention = h / tp * row_len * (4 + 4 + c)  # float32 logits and probs, probs in compute dtype
  if cfg.attention_impl in ("splash", "gpu_flash", "blockwise"):  # tiled: per-query statistics
    attention = h / tp * 2 * 4
  full_layer = c * (2 * d + 6 * d / tp + d / tp + d + 2 * f / tp) + attention  # per token
  layer_weights = (4 * d * d + 2 * d * f) / tp
  gathered = 2 * layer_weights * (c + 4) if mesh_shape["fsdp"] > 1 else 0
  if name in ("sample_prefill", "sample_decode", "ref_logps"):  # forward only: one layer live
    return int(tokens * full_layer + rows * vocab_rows * v / tp * (c + 4) + gathered / 2)
  saved = {"none": full_layer,
           "full": c * d,
           "dots": c * (5 * d + f) / tp + 4 * h / tp * row_len + c * d,
           "dots_with_no_batch_dims": c * (5 * d + f) / tp + c * d}[cfg.remat_policy]
  layers = tokens * (n * saved + (full_layer if cfg.remat_policy != "none" else 0))
  logits = rows * vocab_rows * v / tp * (c + 4 + 4)
  return int(layers + logits + 2 * c * d * tokens + gathered)


def _program_shapes(s: programs_lib.Setup, name: str) -> tuple[int, int]:
  """(row length, vocab-projected positions per row) of a program."""
  p, r = s.prompt_len, s.response_len
  packed = bool(s.config.train.get("packing", True))
  if name.endswith("packed") or (name == "ref_logps" and packed):
    if s.config.train.get("packing") == "fixed":  # train/fixed_layout.py: P + 2R slots
      block = int(s.config.train.get("packing_block", 128))
      p, r = (int(math.ceil(n / block) * block) for n in (p, r))
      return p + 2 * r, 2 * r
    return int(math.ceil((p + 2 * r) / 8) * 8), 2 * int(math.ceil(r / 8) * 8)
  if name in ("sample_prefill",):
    return p, 1
  if name == "sample_decode":
    return 1, 1
  return p + r, p + r


def lower_one(s: programs_lib.Setup, name: str, micro: int, platform: str) -> dict:
  """Lowers (and on TPU compiles) one program; its per-device memory, exact where it can be."""
  fn, args = programs_lib.build(s, name, micro)
  state, ref, batch, cache = None, None, None, None
  if name.startswith("daa_") or name == "sft":
    state, ref, batch = args[0], args[1], args[2]
    if ref is None and "ref_logps" in batch:
      ref = batch["ref_logps"]
  elif name == "ref_logps":
    ref, batch = args
  else:
    cache = args[1] if name == "sample_decode" else None
  # The trained params (LoRA: the adapters; the base is counted as the reference).
  trained = state.params if state is not None else s.params
  params = programs_lib.shard_bytes(trained) if name != "ref_logps" else 0
  grads = 0
  if state is not None:
    elems = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(trained))
    grad_size = (4 if s.config.train.grad_accum > 1 or lora_state.enabled(s.config)
                 else jnp.dtype(s.model_cfg.param_dtype).itemsize)
    grads = elems * grad_size
  mem = {"params": params, "grads": grads,
         "opt_state": programs_lib.shard_bytes(state.opt_state) if state is not None else 0,
         "reference": programs_lib.shard_bytes(ref) if ref is not None else 0,
         "batch": programs_lib.shard_bytes(batch) if batch is not None else 0,
         "kv_cache": programs_lib.shard_bytes(cache) if cache is not None else 0}
  out = {"program": name, "micro_batch": micro, "lowered": False, "compiled": False}
  t0 = time.time()
  try:
    with devices_lib._activate(s.mesh):
      traced = fn.trace(*args)
      lowered = (traced.lower() if platform == "tpu"
                 else traced.lower(lowering_platforms=(platform,)))
    out["lowered"] = True
  except Exception as e:  # reported per program; the others still run
    out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
  out["lower_s"] = round(time.time() - t0, 2)
  fixed = sum(mem.values())
  row_len, vocab_rows = _program_shapes(s, name)
  formula = activation_bytes(s.model_cfg, dict(s.mesh.shape), name, micro, row_len, vocab_rows)
  mem["activations"] = formula
  out["formula_total"] = fixed + formula
  if platform == "tpu" and out["lowered"]:
    t0 = time.time()
    try:
      ma = lowered.compile().memory_analysis()
      out["compiled"] = True
      compiled_total = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                        - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
      out["memory_analysis"] = {k: getattr(ma, k) for k in (
          "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")}
      # What the weights, gradients, state and batch do not account for. The compiler may
      # fuse gradients into the update and never hold all of them, so on small models the
      # compiled total can be below their sum: then activations are 0 and `total` is the
      # compiler's, the breakdown a bound.
      mem["activations"] = max(compiled_total - fixed, 0)
      out["compiled_total"] = compiled_total
    except Exception as e:  # an out-of-memory here is what the pod would hit
      msg = str(e)
      out["error"] = f"{type(e).__name__}: {msg.splitlines()[0][:400]}"
      out["oom"] = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    out["compile_s"] = round(time.time() - t0, 2)
  mem["total"] = out.get("compiled_total", sum(mem.values()))
  out["per_device_bytes"] = mem
  return out


def primary_program(config) -> str:
  """The program `train.run` would run for this config."""
  if config.job == "sft":
    return "sft"
  live = config.objective.get("reference", "live") == "live"
  packed = bool(config.train.get("packing", True))
  return f"daa_{'live' if live else 'cached'}_{'packed' if packed else 'tworow'}"


def plan(config, mesh_shape, platform: str, topology: str | None = None,
         device_memory: int | str | None = None, programs=None, micro_batch: int | None = None,
         fit: bool = True, prompt_len=None, response_len=None, sample_batch=None,
         new_tokens=None, log=None) -> dict:
  """Lowers `programs` on the mesh and plans memory; returns the JSON-able result.

  Args:
    config: a training config (job sft or daa).
    mesh_shape: (data, fsdp, tensor).
    platform: 'tpu' (compiled for `topology`'s devices) or 'cuda' (lowered, abstract mesh).
    topology: a TPU topology name, e.g. 'v5e:4x4'.
    device_memory: usable bytes per device (or '16GiB'); TPU default: the chip's HBM.
    programs: names from `PROGRAMS`; default all of them for the config's job.
    micro_batch: rows per micro-batch; default `batch_size / grad_accum`.
    fit: find `max_micro_batch` (TPU: two extra compiles of the trainer's program).
    prompt_len, response_len, sample_batch, new_tokens: shapes (module docstring).
    log: a callable for progress lines (default: none).

  Raises:
    ConfigError: a bad flag (unknown topology or program, a mesh that does not match the
      topology, a missing --device_memory for CUDA) or config value.
  """
  log = log or (lambda *_: None)
  if config.job not in ("sft", "daa"):
    raise ConfigError(f"config.job={config.job!r}: plan takes a training config (sft or daa).")
  if platform != "tpu" and config.model.get("attention_impl") == "splash":
    raise ConfigError("config.model.attention_impl='splash' is the TPU kernel (off TPU it runs "
                      "in Pallas interpret mode, a test path); plan it with --platform tpu, or "
                      "plan CUDA with attention_impl='gpu_flash', 'auto' or 'blockwise'.")
  if platform != "cuda" and config.model.get("attention_impl") == "gpu_flash":
    raise ConfigError("config.model.attention_impl='gpu_flash' is the CUDA (Triton) kernel "
                      "(off CUDA it runs in Pallas interpret mode, a test path); plan it with "
                      "--platform cuda, or plan TPU with attention_impl='splash', 'auto' or "
                      "'blockwise'.")
  mesh = devices_lib.make_mesh(mesh_shape, platform, topology)
  config.unlock()
  config.mesh = tuple(mesh.shape.values())
  if micro_batch:
    config.train.batch_size = int(micro_batch) * int(config.train.grad_accum)
  config_lib.validate(config, math.prod(config.mesh))
  device_kind = "abstract (cuda)"
  if platform == "tpu":
    device_kind = mesh.devices.flat[0].device_kind
  if device_memory is None:
    hbm = [b for k, b in devices_lib.TPU_HBM.items() if k in device_kind.lower()] if platform == "tpu" else []
    if not hbm:
      raise ConfigError(f"--device_memory is needed for {device_kind}: the usable bytes per "
                        "device, e.g. 80GB (H100), 141GB (H200).")
    device_memory = hbm[0]
  device_memory = devices_lib.parse_bytes(device_memory) if isinstance(device_memory, str) else int(
      device_memory)
  names = list(programs or (programs_lib.PROGRAMS if config.job == "daa" else
                            ("sft", "sample_prefill", "sample_decode")))
  for name in names:
    if name not in programs_lib.PROGRAMS:
      raise ConfigError(f"--programs: {name!r} is unknown; choose from {', '.join(programs_lib.PROGRAMS)}.")
  primary = primary_program(config)
  if primary not in names:
    names.insert(0, primary)
  micro = config.train.batch_size // config.train.grad_accum
  s = programs_lib.make_setup(config, mesh, prompt_len, response_len, sample_batch, new_tokens,
                             platform)
  results = {}
  for name in names:
    log(f"{name}: lowering for {platform} ...")
    results[name] = lower_one(s, name, micro, platform)
  main = results[primary]
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  mem = dict(main["per_device_bytes"])
  mem["kv_cache"] = max((r["per_device_bytes"]["kv_cache"] for r in results.values()),
                        default=0)
  slope, fixed_total, source = None, None, None
  if fit and platform == "tpu":
    # Memory is linear in the micro-batch: the configured one (compiled above) and one more.
    other = 2 * micro if main["compiled"] else dp
    log(f"{primary}: compiling at {other} rows per micro-batch to fit memory ...")
    points = [(micro, main)] if main["compiled"] else []
    points.append((other, lower_one(s, primary, other, platform)))
    if other == dp and points[-1][1]["compiled"]:
      points.append((2 * dp, lower_one(s, primary, 2 * dp, platform)))
    if len(points) == 2 and all(p["compiled"] for _, p in points):
      (m1, p1), (m2, p2) = points
      t1, t2 = p1["per_device_bytes"]["total"], p2["per_device_bytes"]["total"]
      slope = (t2 - t1) * dp / (m2 - m1)  # bytes per dp rows
      fixed_total = t1 - slope * m1 / dp
      source = f"TPU compiler at {m1} and {m2} rows"
      if slope <= 0:  # tiny programs: the compiler's padding hides the rows' bytes
        slope = None
  if slope is None and main["lowered"] and (platform != "tpu" or main["compiled"]):
    # CUDA, or TPU without the extra compile (--nofit): the formula's slope from the total
    # at the configured micro-batch (the compiled one on TPU).
    row_len, vocab_rows = _program_shapes(s, primary)
    act = lambda m: activation_bytes(s.model_cfg, dict(mesh.shape), primary, m, row_len,  # noqa: E731
                                     vocab_rows)
    slope = act(2 * dp) - act(dp)
    fixed_total = main["per_device_bytes"]["total"] - slope * micro / dp
    source = "activation formula's slope from the configured micro-batch's total"
  if not main.get("compiled") and platform == "tpu" and slope is not None:
    # The configured micro-batch did not compile (e.g. out of memory): the linear fit's total.
    mem["total"] = int(fixed_total + slope * micro / dp)
    mem["activations"] = max(mem["total"] - sum(
        mem[k] for k in ("params", "grads", "opt_state", "reference", "batch", "kv_cache")), 0)
  max_micro = 0
  if slope and slope > 0:
    max_micro = max(int((device_memory - fixed_total) // slope), 0) * dp
  fits = bool(mem["total"] <= device_memory and main["lowered"] and not main.get("oom")
              and (platform != "tpu" or main["compiled"]))
  precision = {"param": s.model_cfg.param_dtype, "compute": s.model_cfg.dtype,
               "optimizer_state": config.optim.get("state_dtype", "float32"),
               "reference": config.objective.get("ref_dtype", "float32"),
               "log_softmax_logps_losses": "float32"}
  return {
      "config": {"size": config.model.size, "job": config.job, "remat": s.model_cfg.remat_policy,
                 "scan_layers": s.model_cfg.scan_layers, "grad_accum": config.train.grad_accum,
                 "prompt_len": s.prompt_len, "response_len": s.response_len,
                 "lora_rank": int(config.model.lora.rank) if lora_state.enabled(config) else 0,
                 "attention_impl": config.model.get("attention_impl"),
                 "attention_kernel": s.model_cfg.attention_impl,  # 'auto' resolved
                 "packing": config.train.get("packing", True)},
      "platform": platform, "topology": topology, "mesh": dict(mesh.shape),
      "device_kind": device_kind, "device_memory": device_memory, "precision": precision,
      "primary": primary, "micro_batch": micro,
      "lowered": all(r["lowered"] for r in results.values()),
      "compiled": platform == "tpu" and all(r["compiled"] for r in results.values()),
      "per_device_bytes": mem, "fits": fits, "max_micro_batch": max_micro,
      "max_micro_batch_from": source,
      "programs": results}


def table(result: dict) -> str:
  """The human-readable summary printed above the JSON line."""
  r = result
  lines = [f"{r['config']['size']} {r['config']['job']} on {r['platform']} "
           f"{r['topology'] or ''} mesh {r['mesh']} ({r['device_kind']}, "
           f"{devices_lib.gib(r['device_memory'])} GiB/device); precision {r['precision']}; "
           f"remat {r['config']['remat']}; attention {r['config'].get('attention_kernel')}, "
           f"packing {r['config'].get('packing')}",
           f"{'program':<18} {'micro':>5} {'lowered':>7} {'compiled':>8} {'params':>7} "
           f"{'grads':>7} {'opt':>7} {'ref':>7} {'kv':>7} {'act':>7} {'total':>7} GiB  note"]
  for name, p in r["programs"].items():
    m = p["per_device_bytes"]
    note = p.get("error", "")[:60]
    lines.append(f"{name:<18} {p['micro_batch']:>5} {str(p['lowered']):>7} "
                 f"{str(p['compiled']):>8} {devices_lib.gib(m['params']):>7} {devices_lib.gib(m['grads']):>7} "
                 f"{devices_lib.gib(m['opt_state']):>7} {devices_lib.gib(m['reference']):>7} {devices_lib.gib(m['kv_cache']):>7} "
                 f"{devices_lib.gib(m['activations']):>7} {devices_lib.gib(m['total']):>7}      {note}")
  lines.append(f"trainer's program {r['primary']}: {devices_lib.gib(r['per_device_bytes']['total'])} GiB "
               f"per device of {devices_lib.gib(r['device_memory'])}: fits={r['fits']}, "
               f"max micro-batch {r['max_micro_batch']}")
  return "\n".join(lines)


def cli(argv=None) -> int:
  """`python -m daa_jax.plan ...` (module docstring)."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flag = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                                lock_config=False)
  mesh_flag = flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor sizes.")
  platform_flag = flags.DEFINE_enum("platform", "tpu", ["tpu", "cuda"], "Target platform.")
  topology_flag = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4.")
  memory_flag = flags.DEFINE_string("device_memory", None, "Usable bytes per device.")
  programs_flag = flags.DEFINE_list("programs", None, f"Subset of {', '.join(programs_lib.PROGRAMS)}.")
  micro_flag = flags.DEFINE_integer("micro_batch", None, "Rows per micro-batch.")
  fit_flag = flags.DEFINE_bool("fit", True, "Find the largest micro-batch that fits.")
  prompt_flag = flags.DEFINE_integer("prompt_len", None, "Prompt tokens.")
  response_flag = flags.DEFINE_integer("response_len", None, "Response tokens (incl. EOS).")
  sample_flag = flags.DEFINE_integer("sample_batch", None, "Prompts per sampling batch.")
  new_flag = flags.DEFINE_integer("new_tokens", None, "Sampled tokens per prompt.")

  def main(_):
    from daa_jax.errors import DaaError  # pylint: disable=g-import-not-at-top
    try:
      mesh = [int(x) for x in mesh_flag.value.split(",")]
    except ValueError:
      mesh = None
    try:
      if mesh is None:
        raise ConfigError(f"--mesh={mesh_flag.value!r}; write data,fsdp,tensor, e.g. 1,16,1.")
      if config_flag.value is None:
        raise ConfigError("--config is required, e.g. --config configs/daa.py:size=1b.")
      result = plan(config_flag.value, mesh, platform_flag.value, topology_flag.value,
                    memory_flag.value, programs_flag.value, micro_flag.value, fit_flag.value,
                    prompt_flag.value, response_flag.value, sample_flag.value, new_flag.value,
                    log=lambda m: print(m, file=sys.stderr, flush=True))
    except DaaError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    print(table(result))
    print(json.dumps(result, default=str))

  app.run(main, argv=argv)
  return 0


if __name__ == "__main__":
  cli()
