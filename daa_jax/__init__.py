"""daa_jax: Direct Alignment Algorithms (DPO, IPO, SLiC, ...) on Pythia-style decoders in JAX.

Importing the package never touches devices; README.md lists the jobs.
"""

__version__ = "0.1.0"
