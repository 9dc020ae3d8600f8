"""The reference pass: per-pair reference log-probs, computed once and cached next to the data."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import jax
import numpy as np
from absl import logging
from etils import epath
from daa_jax.models import sharding
from daa_jax.train import objectives
from daa_jax.train import step as step_lib
from daa_jax.data import pipeline as data_pipeline
from daa_jax.train import init as init_lib
from daa_jax.train import heldout as heldout_lib


def _ref_cache_path(config, workdir, dataset, split: str) -> str:
  key = json.dumps(dict(data=dataset.fingerprint, ref=init_lib.reference_identity(config),
                        model=config.model.to_dict(), split=split,
                        ref_dtype=config.objective.ref_dtype), sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  cache_dir = config.data.get("cache_dir") or os.path.join(workdir, "cache")
  return os.path.join(cache_dir, f"ref_logps_{split}_{digest}.npy")


def compute_pair_logps(model, params, dataset, mesh, batch_size: int,
                       logps_chunk: int = 0, pack=None, between_batches=None) -> np.ndarray:
  """Log-probs `[N,2]` of every pair of `dataset` under `params` (one pass, eval order).

  `pack`: None, or `packing.packer(dataset)` to run prompt-shared packed rows (same values,
  fewer FLOPs). `between_batches`: called before each batch (the preemption agreement point).
  """
  loader = data_pipeline.Loader(dataset, batch_size=batch_size, seed=0, shuffle=False,
                           drop_remainder=False)
  # Every process iterates the whole (unsharded) loader and gets the logps back replicated,
  # so `device_get` works when the mesh spans several processes.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(functools.partial(step_lib.pair_logps, model, logps_chunk=logps_chunk,
                                 packing=pack is not None), out_shardings=replicated)
  out = np.zeros((len(dataset), 2), np.float32)
  for batch in loader:
    if between_batches is not None:
      between_batches()
    valid = batch.pop("valid").astype(bool)
    index = batch.pop("index")
    batch = {k: v for k, v in batch.items() if k != "ref_logps"}
    if pack is not None:
      batch = pack(batch)
    logps = np.asarray(jax.device_get(fn(params, sharding.host_to_global(
        batch, mesh, whole=True))))
    out[index[valid]] = logps[valid]
  return out


def attach_reference(config, workdir, model, ref_params_fn, dataset, mesh, split, pack=None,
                     between_batches=None):
  """Returns the dataset with a `ref_logps` column, from the on-disk cache when present;
  unchanged, with no reference pass, for a reference-free objective (simpo).

  `pack`, `between_batches`: as for `compute_pair_logps`. The cache file is written whole
  (aside, then renamed), so an interrupted pass leaves no cache and the next start recomputes.
  """
  if not objectives.needs_reference(config.objective.name):
    logging.info("reference log-probs: none, %s is reference-free", config.objective.name)
    return dataset
  path = epath.Path(_ref_cache_path(config, workdir, dataset, split))  # local or gs://
  if path.exists():
    logging.info("reference log-probs: cache hit %s (no reference forward needed)", path)
    with path.open("rb") as f:
      ref = np.load(f)
  else:
    logging.info("reference log-probs: computing over %d %s pairs", len(dataset), split)
    ref = compute_pair_logps(model, ref_params_fn(), dataset, mesh,
                             batch_size=heldout_lib.eval_batch_size(config, mesh),
                             logps_chunk=config.train.logps_chunk, pack=pack,
                             between_batches=between_batches)
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + ".tmp")
      with tmp.open("wb") as f:
        np.save(f, ref)
      tmp.replace(path)
  return dataset.with_column("ref_logps", ref)
