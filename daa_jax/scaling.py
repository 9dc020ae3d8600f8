"""`python -m daa_jax.scaling SWEEP_DIR`: refit and redraw a finished sweep (`daa_jax.study`)."""

import sys

from daa_jax.study import outputs as target

if __name__ == "__main__":
  sys.modules["__main__"].__doc__ = target.__doc__  # --help prints the command's own text
  sys.exit(target.main())
