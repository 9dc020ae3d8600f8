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
