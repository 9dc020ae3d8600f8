"""`python -m daa_jax.bench`: the training/sampling benchmark (`daa_jax.accel.bench`)."""

import sys

from daa_jax.accel import bench as target

if __name__ == "__main__":
  sys.modules["__main__"].__doc__ = target.__doc__  # --help prints the command's own text
  sys.exit(target.main())
