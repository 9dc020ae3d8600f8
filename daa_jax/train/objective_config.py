"""Checks of `config.objective`'s coefficients for chipo, simpo and dpop (β and ε: `config.validate`).

Each failure is one `ConfigError` paragraph naming the field, its value and the allowed range.
"""

from __future__ import annotations

from daa_jax.errors import ConfigError

# field: (strictly positive?, what it is)
_NONNEGATIVE = {
    "gamma": (False, "SimPO's target reward margin"),
    "dpop_lambda": (False, "DPO-Positive's penalty weight"),
    "rmax": (True, "chipo's reward bound: each response's beta*phi is clipped to ±2*rmax"),
}


def validate_objective(o, prefix: str = "config.") -> None:
  """Raises `ConfigError` for a negative γ or DPO-Positive λ, a non-positive R_max (NaN fails
  too), and simpo without `normalize=mean` (SimPO's reward is the per-token mean log-prob)."""
  for field, (strict, what) in _NONNEGATIVE.items():
    v = o.get(field, 1.0)
    if not (v > 0 if strict else v >= 0):
      raise ConfigError(f"{prefix}objective.{field}={v} must be {'> 0' if strict else '>= 0'} "
                        f"({what}).")
  if o.get("name") == "simpo" and o.get("normalize") != "mean":
    raise ConfigError(f"{prefix}objective.normalize={o.get('normalize')!r} with "
                      "objective.name='simpo': SimPO's reward is the per-token mean log-prob; "
                      f"set --{prefix}objective.normalize=mean.")


def validate_ref_update(o, prefix: str = "config.") -> None:
  """TR-DPO's reference updates: a live reference of an objective that has one, a period
  τ >= 1 and, for soft updates, 0 < α <= 1."""
  kind = o.get("ref_update", "none")
  if kind == "none":
    return
  field = f"{prefix}objective.ref_update={kind!r}"
  if o.get("reference") == "cached":
    raise ConfigError(
        f"{field} updates the reference during training, but {prefix}objective.reference="
        "'cached' precomputes its log-probs once, before training: they would be the initial "
        f"reference's. Use --{prefix}objective.reference=live with reference updates, or "
        f"--{prefix}objective.ref_update=none to keep the cached reference.")
  if o.get("name") == "simpo":
    raise ConfigError(f"{field}: objective.name='simpo' is reference-free, there is no "
                      f"reference to update; set --{prefix}objective.ref_update=none.")
  every = o.get("ref_update_every", 0)
  if not int(every) >= 1:
    raise ConfigError(f"{field} needs {prefix}objective.ref_update_every >= 1 (τ, the steps "
                      f"between updates; TRL's ref_model_sync_steps); it is {every}.")
  alpha = o.get("ref_update_alpha", 0.6)
  if kind == "soft" and not 0 < alpha <= 1:
    raise ConfigError(f"{prefix}objective.ref_update_alpha={alpha} must be in (0, 1] (the "
                      "weight of the policy in the soft update α·πθ + (1−α)·π_ref; 1 is a "
                      "hard update).")
