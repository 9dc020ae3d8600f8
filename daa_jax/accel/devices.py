"""Target devices for the planner: TPU topologies through libtpu, abstract CUDA meshes, HBM sizes."""

from __future__ import annotations

import contextlib
import math
import os
import re
import flax.linen as nn
import jax
from daa_jax.models import sharding
from daa_jax.errors import ConfigError


# HBM per chip of the TPU generations (device_kind substring -> bytes).
TPU_HBM = {"v5 lite": 16 * 2**30, "v5e": 16 * 2**30, "v6 lite": 32 * 2**30,
           "v5p": 95 * 2**30, "v5": 95 * 2**30, "v4": 32 * 2**30, "v3": 16 * 2**30}


_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
  """'16GiB', '141GB', '80e9' -> bytes. Raises ConfigError naming --device_memory."""
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise ConfigError(f"--device_memory={text!r}; write a size like 16GiB, 141GB or 80e9.")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n) -> str:
  return "-" if n is None else f"{n / 2**30:.2f}"


def tpu_devices(topology: str):
  """The devices of a TPU topology (e.g. 'v5e:4x4'), compiled for by libtpu on this host."""
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f"--platform tpu needs libtpu on this machine ({e}); install it with "
                      "pip install -e \".[tpu]\", or use --platform cuda.") from e
  # Other jax processes on this machine (which load libtpu too, as a plugin) hold its lock
  # file; compiling for a described topology needs no exclusive access to a chip.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 and v5p chips run as one device of two TensorCores ("megacore"), as jax sees them on
  # the VM: a v4-32 (v4:2x2x4) is 16 devices.
  megacore = topology.split(":")[0].lower() in ("v4", "v5p")
  try:
    return topologies.get_topology_desc(
        platform="tpu", topology_name=topology,
        **({"chip_config_name": "megacore"} if megacore else {})).devices
  except Exception as e:  # libtpu raises various errors for names it does not know
    raise ConfigError(f"--topology={topology!r} is not a TPU topology libtpu knows ({e}); "
                      "write GENERATION:CHIPS, e.g. v5e:4x4 (v5e-16), v4:2x2x4 (v4-32), "
                      "v5p:4x4x4.") from e


def make_mesh(shape, platform: str, topology: str | None):
  """A ('data','fsdp','tensor') mesh: TPU topology devices, or an AbstractMesh for CUDA."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"--mesh={','.join(map(str, shape))} must be 3 positive sizes "
                      "data,fsdp,tensor (one may be -1 with --platform tpu).")
  if platform == "tpu":
    if topology:
      devices = tpu_devices(topology)
    elif jax.default_backend() == "tpu":  # on a TPU VM: its own chips (the first ones)
      devices = jax.devices()
      if -1 not in shape and math.prod(shape) < len(devices):
        devices = devices[:math.prod(shape)]
      topology = f"local {len(devices)} x {devices[0].device_kind}"
    else:
      raise ConfigError("--platform tpu needs --topology here (no TPU attached), e.g. "
                        "--topology v5e:4x4.")
    n, known = len(devices), math.prod(s for s in shape if s != -1)
    if (-1 in shape and n % known) or (-1 not in shape and known != n):
      raise ConfigError(f"--mesh={','.join(map(str, shape))} needs {known} devices but "
                        f"--topology={topology} has {n}; make the sizes multiply to {n}.")
    return sharding.make_mesh(shape, devices=devices)
  if platform == "cuda":
    if topology:
      raise ConfigError("--topology is for --platform tpu; a CUDA mesh is abstract, drop it.")
    if -1 in shape:
      raise ConfigError(f"--mesh={','.join(map(str, shape))}: --platform cuda has no device "
                        "count to resolve -1 from; give all three sizes, e.g. 1,8,1.")
    return jax.sharding.AbstractMesh(shape, sharding.MESH_AXES,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
  raise ConfigError(f"--platform={platform!r}; use tpu or cuda.")


@contextlib.contextmanager
def _activate(mesh):
  """`sharding.activate` for a concrete mesh; the abstract-mesh equivalent otherwise."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    with jax.sharding.use_abstract_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      yield
  else:
    with sharding.activate(mesh):
      yield
