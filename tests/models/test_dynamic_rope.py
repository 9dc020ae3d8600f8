"""Dynamic-NTK rope (`rope_type='dynamic'`) past `max_position_embeddings`.

A token is rotated with the NTK base of the length at which it is generated,
`base(max(position + 1, max_position_embeddings))`: causal and per token. So a sequence
sampled with the KV cache is scored by teacher forcing with the same rotations it was
sampled with, a row's log-probs do not depend on the other rows of its batch, and the
logits equal transformers' own cached decoding, one token at a time. (transformers'
teacher-forced forward instead rotates every token with the base of the whole batch's
longest position, which makes a token's probability depend on the tokens after it.)
"""

import functools
import inspect

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daa_jax.evaluate import sampling  # noqa: E402
from daa_jax.models import hf_convert  # noqa: E402
from daa_jax.models import model as model_lib  # noqa: E402
from daa_jax.models.config import ModelConfig  # noqa: E402

V, MAX_POS, EOS, PAD = 40, 8, 1, 0


@pytest.fixture(scope="module")
def hf_and_ours():
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=MAX_POS,
      rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
      attn_implementation="eager")
  hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if "norm" not in name:
        p.normal_(0.0, 0.3)  # far from uniform: rotations visibly matter
  config = ModelConfig.from_hf(hf_config)
  assert dict(config.rope_scaling)["rope_type"] == "dynamic"
  return hf, config, hf_convert.params_from_hf_state_dict(config, hf.state_dict())


def ours(config, params, tokens, mask):
  fn = jax.jit(lambda p, t, m: model_lib.CausalLM(config).apply(
      {"params": p}, t, attention_mask=m))
  return np.asarray(fn(params, tokens, mask))


def hf_stepwise(hf_config, state, tokens):
  """transformers' cached decoding, one token per call, from a freshly loaded model (its
  dynamic rope keeps state across calls)."""
  hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  hf.load_state_dict(state)
  # transformers 5.x names the cache argument `cache`, 4.x `past_key_values`.
  name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
  cache, out = transformers.DynamicCache(), []
  with torch.no_grad():
    for t in range(tokens.shape[1]):
      step = hf(torch.tensor(tokens[:, t:t + 1], dtype=torch.long), use_cache=True,
                position_ids=torch.tensor([[t]] * tokens.shape[0]), **{name: cache})
      out.append(step.logits[:, -1].float().numpy())
  return np.stack(out, 1)


def test_logits_equal_transformers_cached_decoding_past_max_positions(hf_and_ours):
  hf, config, params = hf_and_ours
  tokens = np.random.default_rng(0).integers(2, V, (2, 3 * MAX_POS)).astype(np.int32)
  expected = hf_stepwise(hf.config, hf.state_dict(), tokens)
  got = ours(config, params, tokens, np.ones_like(tokens))
  assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max(axis=(0, 2))
  # Within max_position_embeddings it is also transformers' teacher-forced forward.
  with torch.no_grad():
    short = hf(torch.tensor(tokens[:, :MAX_POS], dtype=torch.long)).logits.numpy()
  assert np.abs(got[:, :MAX_POS] - short).max() <= 1e-4


def test_a_rows_logits_do_not_depend_on_its_batch(hf_and_ours):
  _, config, params = hf_and_ours
  tokens = np.random.default_rng(1).integers(2, V, (2, 3 * MAX_POS)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, MAX_POS - 2:] = 0  # a short row (right-padded) beside a long one
  both = ours(config, params, tokens, mask)
  alone = ours(config, params, tokens[1:, :MAX_POS - 2], mask[1:, :MAX_POS - 2])
  np.testing.assert_allclose(both[1, :MAX_POS - 2], alone[0], atol=1e-5, rtol=0)


def test_sampled_past_max_positions_scores_as_it_was_sampled(hf_and_ours):
  _, config, params = hf_and_ours
  model = model_lib.CausalLM(config)
  rng = np.random.default_rng(2)
  tokens = rng.integers(2, V, (4, 6)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :2] = 0  # left-padded prompts of 6 and 4 tokens
  tokens[mask == 0] = PAD
  cfg = sampling.SamplingConfig(max_new_tokens=3 * MAX_POS, eos_id=EOS, pad_id=PAD)
  out = jax.device_get(sampling.make_sampler(model, cfg)(params, tokens, mask,
                                                         jax.random.key(0)))
  assert out["lengths"].max() + 6 > 2 * MAX_POS  # sampled well past max_position_embeddings
  scored = jax.jit(functools.partial(sampling.score, model))(
      params, tokens, mask, out["tokens"], out["lengths"])
  np.testing.assert_allclose(np.asarray(scored), out["logps"], atol=1e-5, rtol=0)
