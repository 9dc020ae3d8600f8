"""evaluate/sampling.py: greedy = argmax, frequencies = softmax, cached = teacher-forced, exact
top-k/top-p support, determinism, and the same tokens on a (2,2,2) mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from daa_jax.models import model as model_lib
from daa_jax.evaluate import sampling
from daa_jax.models import sharding
from daa_jax.models.config import ModelConfig

# Even sizes so that the (2,2,2) mesh really shards vocab, embed, heads and mlp.
CFG = ModelConfig(vocab_size=34, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=40, max_position_embeddings=64)
MODEL = model_lib.CausalLM(CFG)
EOS, PAD = 3, 0


@pytest.fixture(scope="module")
def params():
  """Every leaf perturbed, so the next-token distributions are far from uniform."""
  p = model_lib.init_params(CFG, jax.random.key(0))
  leaves, treedef = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def prompts(batch=4, width=6, seed=0):
  """Left-padded prompts: row 1 has 2 pads, row 3 has 4."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CFG.vocab_size, (batch, width)).astype(np.int32)
  mask = np.ones((batch, width), np.int32)
  mask[1 % batch, :2] = 0
  mask[3 % batch, :4] = 0
  tokens[mask == 0] = PAD
  return tokens, mask


@functools.lru_cache(maxsize=None)
def sampler(cfg):
  return sampling.make_sampler(MODEL, cfg)  # one jit per config: tests share compiles


def run(params, tokens, mask, seed=0, **kw):
  cfg = sampling.SamplingConfig(**{"max_new_tokens": 8, "eos_id": EOS, "pad_id": PAD, **kw})
  return jax.device_get(sampler(cfg)(params, tokens, mask, jax.random.key(seed)))


@jax.jit
def full_logits(params, tokens, mask):
  return MODEL.apply({"params": params}, tokens, attention_mask=mask)


def check_structure(out):
  """Pads after EOS, lengths count up to and including EOS, zero log-probs past the end."""
  t = np.arange(out["tokens"].shape[1])[None]
  live = t < out["lengths"][:, None]
  assert np.all(out["tokens"][~live] == PAD)
  assert np.all(out["logps"][~live] == 0) and np.all(out["logps"][live] < 0)
  ended = out["finished"]
  last = out["tokens"][np.arange(len(ended)), np.maximum(out["lengths"] - 1, 0)]
  np.testing.assert_array_equal(last[ended], EOS)
  assert np.all(out["lengths"][~ended] == out["tokens"].shape[1])
  assert not np.any((out["tokens"] == EOS) & live & (t < out["lengths"][:, None] - 1))


def test_greedy_is_argmax_of_the_full_forward_step_by_step(params):
  tokens, mask = prompts()
  greedy = run(params, tokens, mask, temperature=0.0)
  check_structure(greedy)
  assert np.all(greedy["sample_logps"] == 0)  # a point mass
  # Teacher-forcing the greedy tokens: each one is the argmax after the ones before it.
  seq = np.concatenate([tokens, greedy["tokens"]], 1)
  live = np.arange(8)[None] < greedy["lengths"][:, None]
  seq_mask = np.concatenate([mask, live.astype(np.int32)], 1)
  logits = np.asarray(full_logits(params, seq, seq_mask))[:, 5:13]  # predicts tokens 6..13
  np.testing.assert_array_equal(logits.argmax(-1)[live], greedy["tokens"][live])
  # temperature -> 0 is greedy.
  cold = run(params, tokens, mask, temperature=1e-4, seed=7)
  np.testing.assert_array_equal(cold["tokens"], greedy["tokens"])
  np.testing.assert_allclose(cold["logps"], greedy["logps"], atol=1e-6)


def test_cached_logps_equal_teacher_forced_scores(params):
  tokens, mask = prompts(batch=8, seed=1)
  out = run(params, tokens, mask, seed=3)
  check_structure(out)
  assert out["finished"].any() and not out["finished"].all()  # both kinds of rows covered
  scored = jax.jit(functools.partial(sampling.score, MODEL))(
      params, tokens, mask, out["tokens"], out["lengths"])
  np.testing.assert_allclose(np.asarray(scored), out["logps"], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out["sample_logps"], out["logps"])  # exact sampling


def test_truncated_sample_logps_are_the_renormalized_filtered_distribution(params):
  tokens, mask = prompts(seed=2)
  out = run(params, tokens, mask, seed=5, temperature=0.7, top_k=5, top_p=0.9)
  check_structure(out)
  seq = np.concatenate([tokens, out["tokens"]], 1)
  live = np.arange(8)[None] < out["lengths"][:, None]
  logits = np.asarray(full_logits(params, seq, np.concatenate([mask, live], 1).astype(np.int32)))
  logits = logits[:, 5:13].astype(np.float64) / 0.7
  for b, t in zip(*np.nonzero(live)):
    order = np.argsort(-logits[b, t], kind="stable")[:5]
    p = np.exp(logits[b, t, order] - logits[b, t, order].max())
    p /= p.sum()
    keep = order[:int(np.sum(np.cumsum(p) - p < 0.9))]
    tok = out["tokens"][b, t]
    assert tok in keep
    q = np.exp(logits[b, t, keep] - logits[b, t, keep].max())
    np.testing.assert_allclose(out["sample_logps"][b, t], np.log(q[keep == tok] / q.sum())[0],
                               atol=1e-4)
    model_logp = logits[b, t] * 0.7 - np.logaddexp.reduce(logits[b, t] * 0.7)
    np.testing.assert_allclose(out["logps"][b, t], model_logp[tok], atol=1e-4)


def test_filter_logits_keeps_exactly_the_right_support():
  probs = np.array([[0.04, 0.5, 0.15, 0.3, 0.01]])
  logits = jnp.asarray(np.log(probs), jnp.float32)

  def support(**kw):
    cfg = sampling.SamplingConfig(**kw)
    return set(np.flatnonzero(np.isfinite(np.asarray(sampling.filter_logits(logits, cfg)[0]))))

  assert support() == {0, 1, 2, 3, 4}
  assert support(top_k=1) == {1}
  assert support(top_k=3) == {1, 3, 2}
  assert support(top_p=0.45) == {1}
  assert support(top_p=0.7) == {1, 3}
  assert support(top_p=0.9) == {1, 3, 2}
  assert support(top_p=0.97) == {1, 3, 2, 0}
  assert support(top_k=2, top_p=0.9) == {1, 3}  # top-p of the renormalized top-2
  assert support(top_k=3, top_p=0.75) == {1, 3}  # 0.5/0.95 < 0.75 < 0.8/0.95
  # Ties: exactly k tokens, the lower ids first.
  tied = jnp.zeros((1, 6), jnp.float32)
  kept = np.isfinite(np.asarray(sampling.filter_logits(tied, sampling.SamplingConfig(top_k=4))))
  np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 0, 0])
  # Temperature only rescales.
  hot = sampling.filter_logits(logits, sampling.SamplingConfig(temperature=2.0))
  np.testing.assert_allclose(np.asarray(hot), np.asarray(logits) / 2)


def chi_square_p(counts, probs):
  """Pearson's test; bins with expected count < 5 are pooled (the test's validity)."""
  expected = probs * counts.sum()
  small = expected < 5
  obs = np.append(counts[~small], counts[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.6, "top_k": 6}])
def test_one_step_frequencies_match_the_softmax(params, kw):
  n = 4096
  tokens, mask = prompts(batch=1, seed=4)
  tokens, mask = np.repeat(tokens, n, 0), np.repeat(mask, n, 0)
  out = run(params, tokens, mask, seed=11, max_new_tokens=1, **kw)
  logits = np.asarray(full_logits(params, tokens[:1], mask[:1]))[0, -1].astype(np.float64)
  logits /= kw.get("temperature", 1.0)
  if "top_k" in kw:
    logits[np.argsort(-logits)[kw["top_k"]:]] = -np.inf
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  counts = np.bincount(out["tokens"][:, 0], minlength=CFG.vocab_size)
  assert np.all(counts[probs == 0] == 0)  # never outside the support
  assert chi_square_p(counts, probs) > 1e-3
  # The frequencies are informative: a uniform distribution is rejected.
  assert chi_square_p(counts, np.where(probs > 0, 1.0, 0.0) / np.sum(probs > 0)) < 1e-6


def test_deterministic_per_seed(params):
  tokens, mask = prompts()
  a, b = run(params, tokens, mask, seed=1), run(params, tokens, mask, seed=1)
  c = run(params, tokens, mask, seed=2)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["logps"], b["logps"])
  assert not np.array_equal(a["tokens"], c["tokens"])


def test_sharded_on_a_2x2x2_mesh_gives_the_same_tokens(params):
  tokens, mask = prompts(batch=8, seed=6)
  cfg = sampling.SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD)
  expected = run(params, tokens, mask, seed=9)
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.param_shardings(CFG, mesh)
  sharded = sharding.place_params(jax.device_get(params), shardings)
  qkv = sharded["layers_0"]["attention"]["query_key_value"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert len(qkv.addressable_shards[0].data.flatten()) == qkv.size // 4
  batch = sharding.host_to_global({"t": tokens, "m": mask}, mesh)
  sampler = sampling.make_sampler(MODEL, cfg, mesh)
  out = sampler(sharded, batch["t"], batch["m"], jax.random.key(9))
  assert out["tokens"].sharding.spec[0] == ("data", "fsdp")  # the batch stays split
  out = jax.device_get(out)
  np.testing.assert_array_equal(out["tokens"], expected["tokens"])
  np.testing.assert_allclose(out["logps"], expected["logps"], atol=1e-5)
  # The weights kept their shardings (nothing was gathered into new arrays).
  assert jax.tree.map(lambda x: x.sharding, sharded) == shardings
  assert sampler.jitted._cache_size() == 1


def test_score_both_is_exactly_zero_for_identical_params(params):
  tokens, mask = prompts()
  out = run(params, tokens, mask, seed=4)
  fn = jax.jit(functools.partial(sampling.score_both, MODEL))
  same = jax.device_get(fn(params, params, tokens, mask, out["tokens"], out["lengths"]))
  np.testing.assert_array_equal(same["policy_logps"], same["ref_logps"])
  assert np.all(same["kl_step"] == 0) and np.all(same["forward_kl_step"] == 0)
  other = jax.tree.map(lambda x: x * 1.1, params)
  diff = jax.device_get(fn(params, other, tokens, mask, out["tokens"], out["lengths"]))
  live = np.arange(8)[None] < out["lengths"][:, None]
  assert np.all(diff["kl_step"][live] > 0) and np.all(diff["forward_kl_step"][live] > 0)
  np.testing.assert_allclose(diff["policy_logps"], out["logps"], atol=1e-5)


def test_draw_inverts_the_cdf_and_never_picks_a_zero_probability_token():
  """`draw` (one uniform per row) against exact probabilities with holes in the support."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=64) * 2
  logits[[0, 5, 6, 30, 62, 63]] = -np.inf  # zero-probability tokens, incl. both ends
  logp = jax.nn.log_softmax(jnp.asarray(np.tile(logits, (20000, 1)), jnp.float32), axis=-1)
  toks = np.asarray(jax.jit(sampling.draw)(jax.random.key(3), logp))
  probs = np.exp(np.asarray(logp[0], np.float64))
  counts = np.bincount(toks, minlength=64)
  assert np.all(counts[probs == 0] == 0)
  assert chi_square_p(counts, probs / probs.sum()) > 1e-3
  # A point mass is always drawn, wherever it is.
  point = jnp.full((4, 64), -jnp.inf).at[jnp.arange(4), jnp.array([0, 1, 40, 63])].set(0.0)
  np.testing.assert_array_equal(np.asarray(sampling.draw(jax.random.key(0), point)),
                                [0, 1, 40, 63])


def test_decoding_stops_when_every_row_has_ended_with_the_same_outputs(params):
  """EOS made likely (~1/3 per step): all rows end before T = 16; the while loop stops right
  after the last EOS and its outputs equal running all T decode steps."""
  boosted = jax.tree.map(lambda x: x, params)
  kernel = boosted["embed_out"]["kernel"]
  # The final LayerNorm's output h is ~ its bias b plus a bounded part; a kernel column of
  # 1.0 * b for EOS adds |b|^2 to EOS's logit.
  bias = boosted["final_layer_norm"]["bias"] = jnp.full_like(
      boosted["final_layer_norm"]["bias"], 0.35)
  boosted["embed_out"]["kernel"] = kernel.at[:, EOS].set(bias)
  tokens, mask = prompts(batch=8, seed=2)
  cfg = sampling.SamplingConfig(max_new_tokens=16, eos_id=EOS, pad_id=PAD)
  rng = jax.random.key(5)
  out = jax.device_get(jax.jit(functools.partial(
      sampling.sample, MODEL, cfg=cfg, return_steps=True))(boosted, tokens, mask, rng))
  check_structure(out)
  assert out["finished"].all() and out["lengths"].max() < 16
  assert int(out["steps"]) == out["lengths"].max()  # stopped right after the last EOS

  @jax.jit
  def all_steps(p):
    cache, logits, next_pos = sampling.prefill(MODEL, p, tokens, mask, 16)
    def body(carry, t):
      cache, logits, done = carry
      cache, logits, done, new = sampling.decode_step(MODEL, p, cache, logits, done,
                                                      next_pos, t, rng, cfg)
      return (cache, logits, done), new
    _, (tok, logp, slogp, alive) = jax.lax.scan(
        body, (cache, logits, jnp.zeros((8,), bool)), jnp.arange(16))
    return tok.T, logp.T, alive.T

  tok, logp, alive = jax.device_get(all_steps(boosted))
  np.testing.assert_array_equal(out["tokens"], tok)
  np.testing.assert_array_equal(out["logps"], logp)
  np.testing.assert_array_equal(out["lengths"], alive.sum(-1))
