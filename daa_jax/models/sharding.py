"""The device mesh, the one logical-axis rules table, and host <-> global arrays.

Mesh axes are ('data', 'fsdp', 'tensor'): the batch is split over data x fsdp, weights are
split over fsdp (ZeRO-3 style, gathered per layer by XLA) and over tensor (Megatron-style:
heads and MLP columns). `models/model.py` names only logical axes; `LOGICAL_RULES` maps them here.

How the trainer uses this module:

  mesh = sharding.make_mesh(config.mesh)                  # e.g. (-1, 1, 1)
  p_shard = sharding.param_shardings(model_config, mesh)
  params = sharding.init_params_sharded(model_config, mesh, rng)   # or
  params = sharding.place_params(host_params, p_shard)            # converted HF weights
  step = jax.jit(train_step, in_shardings=(..., p_shard, sharding.batch_sharding(mesh, 3)),
                 out_shardings=..., donate_argnums=...)
  with sharding.activate(mesh):       # trace AND call inside: activation constraints
    batch = sharding.host_to_global(host_batch, mesh)
    state, metrics = step(state, batch)

`activate` must be entered when the function is traced (the first call): the activation
constraints in `models/model.py` read the logical rules and the mesh from the context at trace time
and are no-ops outside it.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Iterator, Sequence

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from daa_jax.models import model as model_lib
from daa_jax.models.config import ModelConfig
from daa_jax.errors import CheckpointError, ConfigError, DataError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one table from logical axis names (models/model.py) to mesh axes. Weights and activations use
# different names so that e.g. `embed` is FSDP-sharded in weights but replicated in the
# residual stream.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Weights.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("qkv", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query k/v projections: only where G divides
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes (GSPMD propagates shardings).

  Args:
    shape: three sizes, e.g. (8, 1, 1); one may be -1 (all remaining devices).
    devices: default `jax.devices()`.

  Raises:
    ConfigError: the shape does not fit the device count (names `config.mesh`).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = tuple(int(s) for s in shape)
  n = len(devices)
  if len(shape) != len(MESH_AXES) or shape.count(-1) > 1 or any(
      s == 0 or s < -1 for s in shape):
    raise ConfigError(f"config.mesh={shape} must be 3 positive sizes for {MESH_AXES}, at "
                      "most one of them -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ConfigError(f"config.mesh={shape}: {n} devices are not divisible by {known}; "
                        "pick sizes whose product divides the device count.")
    shape = tuple(n // known if s == -1 else s for s in shape)
  if math.prod(shape) != n:
    raise ConfigError(f"config.mesh={shape} needs {math.prod(shape)} devices but there are "
                      f"{n}; make the product equal the device count (or use -1).")
  try:
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  except AttributeError:  # jax without AxisType: every axis is Auto.
    axis_types = None
  kwargs = {} if axis_types is None else {"axis_types": axis_types}
  # jax>=0.7 defaults make_mesh axes to Explicit; our shardings are propagated (Auto).
  return jax.make_mesh(shape, MESH_AXES, devices=devices, **kwargs)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Makes the model's logical activation constraints active on `mesh`.

  Sets `mesh` as the current mesh (`jax.set_mesh`) and installs `LOGICAL_RULES`; trace and
  call jitted steps inside it. Outside, the constraints are no-ops (single device).
  """
  set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh")
  with set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def _named(mesh, spec: Sequence[Any], shape: Sequence[int],
           units: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, P(*model_lib.fit_spec_to_shape(spec, shape, dict(mesh.shape),
                                                            units)))


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh):
  """NamedShardings of the params tree (unboxed structure), from the logical annotations.

  A mesh axis that does not divide a dimension is dropped for that dimension (replicated),
  and logged: jit rejects uneven shardings. A `kv_heads` dimension (G key/value heads of K
  dims) is sharded only where G divides: splitting inside a head would make every device
  gather the other half for each query head of the group.
  """
  boxed = model_lib.abstract_params(config, boxed=True)
  specs = nn.get_partition_spec(boxed)  # logical names per leaf
  abstract = nn.unbox(boxed)

  def one(path, logical, leaf):
    mesh_spec = tuple(nn.logical_to_mesh_axes(tuple(logical), LOGICAL_RULES))
    units = [config.head_dim if name == "kv_heads" else 1 for name in tuple(logical)]
    sharding = _named(mesh, mesh_spec, leaf.shape, units)
    if tuple(sharding.spec) != mesh_spec + (None,) * (leaf.ndim - len(mesh_spec)):
      logging.info("param %s %s: spec %s does not divide on mesh %s; using %s",
                   jax.tree_util.keystr(path), leaf.shape, mesh_spec, dict(mesh.shape),
                   sharding.spec)
    return sharding

  return jax.tree_util.tree_map_with_path(
      one, specs, abstract, is_leaf=lambda x: isinstance(x, P))


def init_params_sharded(config: ModelConfig, mesh: jax.sharding.Mesh, rng: jax.Array):
  """Fresh params created already sharded (never whole on one device)."""
  shardings = param_shardings(config, mesh)
  return jax.jit(lambda r: model_lib.init_params(config, r), out_shardings=shardings)(rng)


def place_params(host_params, shardings):
  """Host (numpy) params -> global jax arrays; each device receives only its shard."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree_util.tree_map(one, host_params, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, every other axis replicated."""
  if ndim == 0:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_shard(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """Which rows of each global batch this process loads: `(shard_index, shard_count)`.

  The batch is split over data x fsdp only, so where the tensor axis (or any replication)
  spans processes, several processes hold replicas of the same rows and must load the same
  ones: splitting by process index instead would feed each replica different rows (and
  `make_array_from_process_local_data` would accept it silently). Processes are grouped by the
  contiguous block of batch slices their devices hold; `shard_count` blocks, this process's is
  `shard_index`. Single-process: (0, 1).

  Raises:
    ConfigError: the processes' devices do not hold equal contiguous blocks of the batch (a
      device order this loader cannot feed); names `config.mesh`.
  """
  slices = mesh.shape["data"] * mesh.shape["fsdp"]
  held: dict[int, set[int]] = {}
  for device, index in batch_sharding(mesh, 1).devices_indices_map((slices,)).items():
    held.setdefault(device.process_index, set()).add(index[0].start or 0)
  blocks = sorted({tuple(sorted(v)) for v in held.values()})
  size = len(blocks[0])
  if any(b != tuple(range(k * size, (k + 1) * size)) for k, b in enumerate(blocks)):
    raise ConfigError(
        f"config.mesh={tuple(mesh.shape.values())}: the processes' devices hold batch slices "
        f"{blocks} of the data x fsdp axes, not equal contiguous blocks, so no per-process "
        "loading feeds them; order the mesh so each process's devices are adjacent along "
        "data x fsdp (e.g. put the axis that spans processes first).")
  return blocks.index(tuple(sorted(held[jax.process_index()]))), len(blocks)


def host_to_global(batch, mesh: jax.sharding.Mesh, whole: bool = False):
  """Per-process numpy batch (this host's rows) -> global arrays sharded by `batch_sharding`.

  Single-process, the local batch is the global batch; its size must divide by
  data x fsdp. `whole=True`: every process holds the same whole global batch (evaluation
  passes over an unsharded loader) and each device takes its own rows from it.
  """
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(
          batch_sharding(mesh, np.ndim(x)), np.asarray(x),
          np.shape(x) if whole else None), batch)


def global_to_host(tree):
  """Global arrays -> numpy with the whole global value, on every process.

  The inverse of `host_to_global(..., whole=True)`. An array whose shards are not all
  addressable here (the mesh spans processes) is all-gathered first: a collective, so every
  process must call this with the same tree. Other leaves are fetched with `device_get`.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(one, tree)


def share_from_process_0(fn):
  """`fn()` on process 0 only; its result, or its error, reaches every process.

  For work done once per job whose result every process needs: a decision read from files
  (which steps are left to do) or an LLM judge's answers. Single-process, `fn()`. The result
  (numpy arrays, scalars, lists, dicts) travels as JSON text, so floats arrive exactly. An
  error on process 0 is raised on every process (the same class for the project's errors,
  else RuntimeError), so no process waits for a result that never comes.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error, payload = None, b""
  if jax.process_index() == 0:
    try:
      payload = json.dumps({"result": _to_json(fn())}).encode()
    except Exception as e:  # pylint: disable=broad-except
      error = e
      payload = json.dumps({"error": type(e).__name__, "message": str(e)}).encode()
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  data = np.zeros(size, np.int32)  # int32: the broadcast is a sum over processes
  if jax.process_index() == 0:
    data[:] = np.frombuffer(payload, np.uint8)
  data = multihost_utils.broadcast_one_to_all(data)
  message = json.loads(np.asarray(data, np.uint8).tobytes())
  if error is not None:
    raise error
  if "error" in message:
    known = {c.__name__: c for c in (ConfigError, DataError, CheckpointError)}
    raise known.get(message["error"], RuntimeError)(f"(on process 0) {message['message']}")
  return _from_json(message["result"])


def _to_json(x):
  if isinstance(x, np.ndarray):
    return {"__array__": x.tolist(), "dtype": x.dtype.str}
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  return x.item() if isinstance(x, np.generic) else x


def _from_json(x):
  if isinstance(x, dict):
    if "__array__" in x:
      return np.asarray(x["__array__"], np.dtype(x["dtype"]))
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


def fetch(tree):
  """Global arrays -> numpy, whole on every process (`global_to_host`)."""
  return global_to_host(tree)


def cache_shardings(mesh: jax.sharding.Mesh, cache):
  """Shardings of a `model.init_cache` tree: batch over data x fsdp, heads over tensor."""
  def one(x):
    if x.ndim == 0:
      return NamedSharding(mesh, P())
    if x.ndim == 2:  # 'mask' [B,S]
      return _named(mesh, (BATCH_AXES, None), x.shape)
    lead = (None,) if x.ndim == 5 else ()  # scan layout: [N,B,H,S,K]
    return _named(mesh, lead + (BATCH_AXES, "tensor", None, None), x.shape)
  return jax.tree_util.tree_map(one, cache)
