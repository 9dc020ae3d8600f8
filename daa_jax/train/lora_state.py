"""LoRA in training: the `config.model.lora` block, the adapters' shapes and shardings, and
the base's fingerprint that checkpoints carry.

With LoRA on, `TrainState.params` holds only the adapters (`models/lora.py`; the optimizer
state is adapter-shaped) and the frozen base travels as the step's `ref_params`: the policy is
`lora.merge(base, adapters, scale)` inside the step (with `dropout > 0`, training runs
`lora.with_adapters`: dropout on the adapters' input), the reference is the base itself. The
base is stored once, in `config.objective.ref_dtype`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from daa_jax.errors import CheckpointError, ConfigError
from daa_jax.models import lora as lora_lib
from daa_jax.models import model as model_lib

PyTree = Any
BASE_FILE = "lora_base.json"  # in the run's workdir: the base's source and fingerprint


def lora_fields() -> ml_collections.ConfigDict:
  """`config.model.lora`: off unless `rank` > 0 (and `enabled`)."""
  return ml_collections.ConfigDict(dict(
      enabled=True, rank=0, alpha=16.0, dropout=0.0, target="attention", seed=0))


def enabled(config) -> bool:
  m = config.get("model")
  lo = m.get("lora") if m is not None else None
  return bool(lo is not None and lo.get("enabled", True) and int(lo.get("rank", 0)) > 0)


def scale(config) -> float:
  """alpha / rank (PEFT's default scaling)."""
  lo = config.model.lora
  return float(lo.alpha) / int(lo.rank)


def step_fields(config) -> dict:
  """`step.StepConfig`'s LoRA fields for `config` (LoRA off: their defaults)."""
  if not enabled(config):
    return {}
  lo = config.model.lora
  return dict(lora=True, lora_scale=scale(config), lora_dropout=float(lo.dropout),
              dropout_seed=int(lo.seed))


def validate_lora(config, prefix: str = "config.") -> None:
  """Raises `ConfigError` for a LoRA block daa_jax cannot honour."""
  lo = config.get("model", {}).get("lora")
  p = f"{prefix}model.lora."
  if lo is not None and int(lo.get("rank", 0)) < 0:
    raise ConfigError(f"{p}rank={lo.rank} must be >= 0 (0: LoRA off).")
  if lo is None or not enabled(config):
    return
  if not float(lo.alpha) > 0:
    raise ConfigError(f"{p}alpha={lo.alpha} must be > 0 (the adapters are scaled by "
                      "alpha/rank).")
  if not 0.0 <= float(lo.dropout) < 1.0:
    raise ConfigError(
        f"{p}dropout={lo.dropout} must be in [0, 1): the rate at which each input of an "
        "adapter is zeroed in training (PEFT's lora_dropout; 0: off, e.g. 0.05 or 0.1).")
  o = config.get("objective")
  if config.get("job") == "daa" and o is not None and o.get("ref_update", "none") != "none":
    raise ConfigError(
        f"{p}rank={lo.rank} with {prefix}objective.ref_update={o.ref_update!r}: with LoRA the "
        "reference is the frozen base itself (adapters off), and TR-DPO's reference updates "
        "would make it a second, moving copy of the weights, which the LoRA step does not hold "
        f"(not implemented); set --{prefix}objective.ref_update=none or --{p}rank=0.")
  g = config.get("guard")
  if config.get("job") == "daa" and g is not None and g.get("enabled"):
    raise ConfigError(
        f"{p}rank={lo.rank} with {prefix}guard.enabled=True: the over-optimization guard "
        "samples from full params and does not read LoRA adapters yet; set "
        f"--{prefix}guard.enabled=False or --{p}rank=0.")


def adapter_layout(config, abstract_base: PyTree, mesh,
                   base_shardings: PyTree | None = None) -> tuple[PyTree, PyTree]:
  """(abstract adapters, their shardings).

  With `base_shardings` (the base's NamedShardings, `sharding.param_shardings`), each
  adapter follows the logical axes of its base matrix, as MaxText's and qwix's LoRA do:
  `a` [.., in, r] takes the kernel's spec on its leading (layer) and input dimensions, `b`
  [.., r, out] on its leading and output dimensions; the rank dimension is replicated. So
  `a@b` has the kernel's sharding and the merged `W + scale·a@b` needs no resharding, and on
  an fsdp/tensor mesh no device holds a whole adapter of a 7-9B model's all-linear set.
  Without `base_shardings` (a single device, tests): replicated.
  """
  lo = config.model.lora
  abstract = lora_lib.abstract_adapters(abstract_base, int(lo.rank), str(lo.target))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if base_shardings is None:
    return abstract, jax.tree.map(lambda _: replicated, abstract)
  base_flat = lora_lib.flatten(base_shardings)
  P = jax.sharding.PartitionSpec

  def one(path, leaf):
    kernel = base_flat[path[:-1] + ("kernel",)]
    spec = tuple(kernel.spec) + (None,) * (leaf.ndim - len(kernel.spec))
    lead, (s_in, s_out) = spec[:-2], spec[-2:]
    own = (s_in, None) if path[-1] == "a" else (None, s_out)
    return jax.sharding.NamedSharding(mesh, P(*lead, *own))

  flat = lora_lib.flatten(abstract)
  return abstract, lora_lib.unflatten({p: one(p, x) for p, x in flat.items()})


def init_adapters(config, abstract_base: PyTree) -> PyTree:
  lo = config.model.lora
  return lora_lib.init_adapters(abstract_base, int(lo.rank), str(lo.target),
                                jax.random.key(int(lo.seed)))


def fingerprint(params: PyTree) -> str:
  """A short hash of the base: every leaf's path, shape and dtype and a strided sample of
  up to 4096 of its values (read as float32 bytes), over the per-layer layout (the same
  weights hash the same with or without scan_layers). One jitted gather of the samples,
  replicated, so every process reads them (collective on a multi-process mesh)."""
  def per_layer(p):
    if "layers" in p:
      p = model_lib.from_scan_layout(p, jax.tree.leaves(p["layers"])[0].shape[0])
    return lora_lib.flatten(p)

  abstract = jax.eval_shape(per_layer, params)
  names = sorted(abstract)

  def samples(p):
    flat = per_layer(p)
    out = []
    for n in names:
      x = flat[n].reshape(-1)
      out.append(x[:: max(1, x.size // 4096)][:4096].astype(jnp.float32))
    return out

  first = getattr(jax.tree.leaves(params)[0], "sharding", None)
  replicated = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                if isinstance(first, jax.sharding.NamedSharding) else None)
  values = jax.device_get(jax.jit(samples, out_shardings=replicated)(params))
  h = hashlib.sha256()
  for n, v in zip(names, values):
    a = abstract[n]
    h.update(f"{'/'.join(n)}:{tuple(a.shape)}:{np.dtype(a.dtype).name};".encode())
    h.update(np.ascontiguousarray(v).tobytes())
  return h.hexdigest()[:16]


def base_record(identity: str, fp: str) -> dict:
  return {"source": identity, "fingerprint": fp}


def check_base(recorded: dict | None, current: dict, where: str) -> None:
  """Refuses adapters trained on another base than the one this config loads."""
  if not recorded or recorded.get("fingerprint") == current["fingerprint"]:
    return
  raise CheckpointError(
      f"{where} holds LoRA adapters trained on the base {recorded.get('source')} with "
      f"fingerprint {recorded.get('fingerprint')}, but this config's base "
      f"({current['source']}) has fingerprint {current['fingerprint']}: the base changed under "
      "the checkpoint, and adapters only mean something on the weights they were trained on. "
      "Restore the original base (the same config.hf_model / config.init_from files), or "
      "start over in a fresh --workdir.")


def write_base_record(workdir: str, record: dict) -> None:
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / BASE_FILE
  tmp = path.parent / (BASE_FILE + ".tmp")
  tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
  tmp.replace(path)


def read_base_record(run_dir: str) -> dict | None:
  path = epath.Path(run_dir) / BASE_FILE
  return json.loads(path.read_text()) if path.exists() else None


def run_lora(run_dir: str) -> ml_collections.ConfigDict | None:
  """The run config of a LoRA run directory (None: not a LoRA run, or no config.json)."""
  path = epath.Path(run_dir) / "config.json"
  if not path.exists():
    return None
  cfg = ml_collections.ConfigDict(json.loads(path.read_text()))
  return cfg if enabled(cfg) else None


def settle_base(workdir: str, identity: str, base: PyTree, restored_meta: dict | None,
                latest: int | None) -> dict:
  """The base's record (source, fingerprint); refuses a restored checkpoint whose adapters
  were trained on another base; writes `lora_base.json` into the workdir."""
  record = base_record(identity, fingerprint(base))
  if restored_meta is not None:
    check_base(restored_meta.get("lora"), record, f"{workdir}/checkpoints/{latest}")
  write_base_record(workdir, record)
  return record
