"""`train.logps_chunk > 0` fuses the vocabulary projection into the chunked log-softmax.

The head runs per chunk of target positions inside a rematerialized `lax.map`, so no
`[N, L, V]` logits exist in the forward or the backward pass (at V = 50k they are the largest
activation of a DAA step). Values and gradients must equal the unchunked path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from daa_jax.models import model as model_lib
from daa_jax.models.config import ModelConfig
from daa_jax.train import objectives
from daa_jax.train import packing
from daa_jax.train import step as step_lib

from tests.train.test_packing import PAD_ID, SPEC, random_pairs, two_row_batch

N, L, D, V = 3, 11, 8, 29


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(N, L, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32)
  mask = jnp.asarray(rng.random((N, L)) < 0.7, jnp.int32)
  return hidden, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 3, 4, L])
def test_projected_chunks_equal_the_logits_path_values_and_gradients(chunk):
  hidden, w, targets, mask = _inputs()

  def loss(h, w, chunk, fused):
    if fused:
      out = objectives.sequence_logps(h, targets, mask, chunk, project=lambda x: x @ w)
    else:
      out = objectives.sequence_logps(h @ w, targets, mask)
    return out[0].sum(), out[1]

  (want, want_tok), want_g = jax.value_and_grad(loss, (0, 1), has_aux=True)(hidden, w, None,
                                                                          False)
  fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True), static_argnums=(2, 3))
  (got, got_tok), got_g = fn(hidden, w, chunk, True)
  np.testing.assert_allclose(got_tok, want_tok, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, e in zip(got_g, want_g):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # Masked positions are exactly 0, and the per-token values are real log-probs.
  assert np.all(np.asarray(got_tok)[np.asarray(mask) == 0] == 0)
  assert np.all(np.asarray(got_tok) <= 0)


def test_fused_chunks_hold_no_full_logits_in_any_dtype_forward_or_backward():
  hidden, w, targets, mask = _inputs()
  full = [f"f32[{N},{L},{V}]", f"bf16[{N},{L},{V}]"]

  def loss(h, w, chunk, fused):
    project = lambda x: (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16))  # noqa: E731
    if fused:
      return objectives.sequence_logps(h, targets, mask, chunk, project=project)[0].sum()
    return objectives.sequence_logps(project(h), targets, mask, chunk)[0].sum()

  grad = jax.grad(loss, (0, 1))
  unfused = str(jax.make_jaxpr(grad, static_argnums=(2, 3))(hidden, w, 4, False))
  fused = str(jax.make_jaxpr(grad, static_argnums=(2, 3))(hidden, w, 4, True))
  assert any(f in unfused for f in full)  # the probe finds the buffer when it exists
  assert not any(f in fused for f in full), fused


LLAMA = ModelConfig(model_type="llama", vocab_size=97, hidden_size=40, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
                    max_position_embeddings=128, rotary_pct=1.0, attention_bias=False,
                    hidden_act="silu", use_parallel_residual=False, tie_word_embeddings=True)
FAMILIES = {
    "gpt_neox": ModelConfig(vocab_size=97, hidden_size=40, num_hidden_layers=2,
                            num_attention_heads=5, intermediate_size=72,
                            max_position_embeddings=128),
    "llama_tied": LLAMA,
    # Gemma-2's final soft-capping lives in the head: the fused path must keep it.
    "gemma2_softcap": LLAMA.replace(model_type="gemma2", attention_head_dim=12,
                                    query_pre_attn_scalar=20.0, attn_logit_softcapping=2.0,
                                    final_logit_softcapping=3.0, hidden_act="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("layout", ["two_row", "packed"])
def test_model_logps_and_gradients_equal_with_the_fused_head(family, layout):
  cfg = FAMILIES[family]
  model = model_lib.CausalLM(cfg)
  params = model_lib.init_params(cfg, jax.random.key(1))
  batch = two_row_batch(random_pairs(np.random.default_rng(2), SPEC), 16, left_pad=True)
  packed = layout == "packed"
  if packed:
    batch = packing.pack_pairs(batch, pad_id=PAD_ID)

  def run(chunk):
    fn = functools.partial(step_lib.pair_logps, model, logps_chunk=chunk, packing=packed)
    return jax.jit(jax.value_and_grad(lambda p: (fn(p, batch) * jnp.array([1.0, -0.5])).sum(),
                                      has_aux=False))(params), jax.jit(fn)(params, batch)

  (want, want_g), want_lp = run(0)
  (got, got_g), got_lp = run(3)  # ragged: 16 - 1 and the packed R are not multiples of 3
  np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  flat_w, flat_g = jax.tree.leaves(want_g), jax.tree.leaves(got_g)
  for g, e in zip(flat_g, flat_w):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
  head = "embed_out" if family == "gpt_neox" else "embed_tokens"  # untied / tied head
  grads = {"/".join(str(getattr(e, "key", e)) for e in path): leaf
           for path, leaf in jax.tree_util.tree_flatten_with_path(got_g)[0]}
  assert any(head in path and np.abs(np.asarray(g)).max() > 0 for path, g in grads.items())


def test_sft_token_logps_equal_with_the_fused_head():
  cfg = FAMILIES["gpt_neox"]
  model = model_lib.CausalLM(cfg)
  params = model_lib.init_params(cfg, jax.random.key(4))
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (3, 13)), jnp.int32)
  attn = jnp.ones_like(tokens)
  pos = jnp.broadcast_to(jnp.arange(13), tokens.shape)
  loss_mask = jnp.asarray(rng.random((3, 13)) < 0.6, jnp.int32)
  args = (model, params, tokens, attn, pos, loss_mask)
  want = step_lib.sequence_logps(*args, logps_chunk=0)
  got = jax.jit(functools.partial(step_lib.sequence_logps, model), static_argnums=5)(
      params, tokens, attn, pos, loss_mask, 5)
  np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-5)
