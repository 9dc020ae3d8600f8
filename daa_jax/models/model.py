"""`CausalLM(config)`: the one entry to every model family, with a KV cache for decoding.

`CausalLM(config)` returns the module of `config.model_type`'s family (`models/gpt_neox.py`
for Pythia, `models/llama.py` for Llama/Mistral/Qwen2, `models/gemma2.py`). What they share
is written once: attention with the KV cache, rotary, norms in `models/layers.py`; masks,
`shared_segment` packing, the cache and scan/remat in `models/common.py`. Every family's
module tree uses its Hugging Face names, so weight conversion is a transpose and a rename
(`models/hf_convert.py`). With `config.scan_layers` the
blocks are one `nn.scan` named `layers` whose params carry a leading layer axis;
`to_scan_layout` / `from_scan_layout` convert between the two layouts.

Typical use:

  model = CausalLM(config)
  params = init_params(config, jax.random.key(0))
  logits = model.apply({'params': params}, tokens, attention_mask=mask)  # [B,L,V]

  # Decoding: prefill, then one token per step (same jitted function, two shapes).
  cache = init_cache(config, batch_size=B, max_len=P + G)
  logits, cache = model.apply({'params': params}, prompt, attention_mask=prompt_mask,
                              cache=cache)
  logits, cache = model.apply({'params': params}, next_token[:, None], cache=cache)
"""

from daa_jax.models.common import (  # noqa: F401
    Cache, CausalLM, abstract_params, from_scan_layout, init_cache, init_params, param_count,
    to_scan_layout)
from daa_jax.models.common import self_mask as _self_mask_both
from daa_jax.models.layers import fit_spec_to_shape, rotary_cos_sin  # noqa: F401


def _self_mask(valid, positions, segment_ids, shared_segment=None):
  """The full-attention mask [B,1,L,L] and positions [B,L] (tests)."""
  (mask, _), positions = _self_mask_both(valid, positions, segment_ids, shared_segment)
  return mask, positions
