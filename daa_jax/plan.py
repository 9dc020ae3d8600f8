"""`python -m daa_jax.plan`: the memory planner and AOT lowering (`daa_jax.accel.plan`)."""

import sys

from daa_jax.accel import plan as target

if __name__ == "__main__":
  sys.modules["__main__"].__doc__ = target.__doc__  # --help prints the command's own text
  sys.exit(target.cli())
