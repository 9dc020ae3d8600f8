"""Held-out preference metrics (accuracy, margins) of a policy against its reference, per pair."""

from __future__ import annotations

import numpy as np
from daa_jax.models import sharding
from daa_jax.data import pipeline as data_pipeline


def eval_batch_size(config, mesh) -> int:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.train.batch_size // config.train.grad_accum
  return max(dp, (micro // dp) * dp)


def heldout_per_pair(eval_fn, params, ref_params, hparams, batches, mesh,
                     keys=("loss", "accuracy", "rewards_chosen", "rewards_rejected")
                     ) -> dict[str, np.ndarray]:
  """The held-out loop of training and evaluation: `eval_fn` over `batches` of (host batch,
  identical on every process; valid [B] bool), returning each of `keys` (a `per_pair` entry of
  the step's metrics, or a top-level one such as `policy_logps`) for the valid rows,
  concatenated in order."""
  out = {k: [] for k in keys}
  for host, valid in batches:
    _, m = eval_fn(params, ref_params, sharding.host_to_global(host, mesh, whole=True), hparams)
    got = sharding.fetch({k: m["per_pair"][k] if k in m["per_pair"] else m[k] for k in keys})
    for k in keys:
      out[k].append(np.asarray(got[k])[valid])
  return {k: np.concatenate(v) for k, v in out.items()}


def heldout_metrics(eval_fn, params, ref_params, hparams, dataset, mesh, batch_size,
                    max_batches: int = 0, pack=None) -> dict[str, float]:
  """Mean loss, reward accuracy and margin over held-out pairs (padding rows excluded).

  `pack`: None, or a host-side batch transform (`packing.pack_pairs`) for a packed step.
  """
  loader = data_pipeline.Loader(dataset, batch_size=batch_size, seed=0, shuffle=False,
                           drop_remainder=False)

  def batches():
    for i, batch in enumerate(loader):
      if max_batches and i >= max_batches:
        return
      valid = batch.pop("valid").astype(bool)
      batch.pop("index")
      yield (batch if pack is None else pack(batch)), valid

  cat = heldout_per_pair(eval_fn, params, ref_params, hparams, batches(), mesh)
  margin = cat["rewards_chosen"] - cat["rewards_rejected"]
  return {"eval/loss": float(cat["loss"].mean()),
          "eval/reward_acc": float(cat["accuracy"].mean()),  # ties half, as the objective
          "eval/margin": float(margin.mean()), "eval/num_pairs": float(len(margin))}
