"""daa_jax: Direct Alignment Algorithms (DPO, IPO, SLiC, ...) on Pythia-style decoders in JAX.

Importing the package never touches devices; see DESIGN.md (in the repository) for the module map.
"""

__version__ = "0.1.0"
