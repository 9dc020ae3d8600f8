"""TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
Good Alignment"), as TRL's `sync_ref_model` does them.

Every τ = `objective.ref_update_every` optimizer steps the reference becomes

  soft:  π_ref ← α·πθ + (1 − α)·π_ref     (α = `objective.ref_update_alpha`, TRL's
                                           `ref_model_mixup_alpha`; τ: `ref_model_sync_steps`)
  hard:  π_ref ← πθ                         (α = 1)

on the parameters, in float32, stored in the reference's dtype. The loop applies it after the
step whose count is a multiple of τ, before that step's checkpoint, which saves the reference
beside the state (`checkpoint.Checkpointer.save(..., reference=...)`): a resumed run continues
from the reference it had, bitwise. Evaluation and the guard measure the KL to the initial
reference (the SFT policy), the paper's axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def enabled(objective) -> bool:
  return objective.get("ref_update", "none") != "none"


def alpha(objective) -> float:
  return 1.0 if objective.get("ref_update") == "hard" else float(objective.ref_update_alpha)


def due(objective, step: int) -> bool:
  """Whether the reference is updated after optimizer step `step` (1-based count)."""
  return enabled(objective) and step > 0 and step % int(objective.ref_update_every) == 0


def mix(ref, params, weight: jax.Array):
  """weight·params + (1 − weight)·ref, leaf by leaf in float32, in the reference's dtypes."""
  return jax.tree.map(
      lambda r, p: (weight * p.astype(jnp.float32)
                    + (1.0 - weight) * r.astype(jnp.float32)).astype(r.dtype), ref, params)


def make(objective, ref_shardings):
  """The jitted update `(ref, params) -> new ref`, keeping the reference's shardings (no
  donation: the initial reference may still be held by evaluation or the guard)."""
  weight = jnp.float32(alpha(objective))
  return jax.jit(lambda r, p: mix(r, p, weight), out_shardings=ref_shardings)
