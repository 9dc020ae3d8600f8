"""Model families, one module each, and the registry `CausalLM(config)` dispatches on.

Adding a family: a module here that subclasses `common.CausalLM`, names its modules as its
HF checkpoint does, and calls `common.register(common.Family(...))`; plus its import line
below. Nothing else in daa_jax branches on the family.
"""

from daa_jax.models import common
from daa_jax.models import gemma2  # noqa: F401  (registers gemma2)
from daa_jax.models import gpt_neox  # noqa: F401  (registers gpt_neox)
from daa_jax.models import llama  # noqa: F401  (registers llama, mistral, qwen2)

FAMILIES = common.FAMILIES
family_of = common.family_of
