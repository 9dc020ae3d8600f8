"""evaluate/loop.py: KL estimators against closed forms, the length R², the reward-model judge
against transformers, and a tiny DAA run evaluated end to end."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from daa_jax.evaluate import loop as evaluate
from daa_jax.evaluate import judges
from daa_jax import main as main_lib
from daa_jax.train import loop as train
from daa_jax.data import tokenize
from daa_jax.data import pipeline as data_pipeline
from daa_jax.evaluate import kl as kl_lib
from daa_jax.evaluate import prompts as prompts_lib
from daa_jax.evaluate import store as store_lib
from daa_jax.evaluate import setup as setup_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def load_config(name, arg=None):
  """configs/ is not a package: load a config file by path, as config_flags does."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# --- Estimators -----------------------------------------------------------------------------


def categorical_logps(p, q, n, tokens, seed):
  """n sequences of `tokens` i.i.d. draws from p: per-token log p and log q, [n, tokens]."""
  y = np.random.default_rng(seed).choice(len(p), size=(n, tokens), p=p)
  return np.log(p)[y], np.log(q)[y]


def test_kl_estimators_match_the_closed_form_within_3_standard_errors():
  p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
  q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
  exact = float(np.sum(p * np.log(p / q)))  # KL(p‖q) per token
  stderr = {}
  for n in (2000, 8000):
    # Two-token responses: the sequence KL is twice the per-token KL.
    lp, lq = categorical_logps(p, q, n, tokens=2, seed=n)
    est = kl_lib.kl_estimates(lp, lq)
    for name in ("k1", "k3", "k3_seq"):
      mean, se = kl_lib.mean_stderr(est[name])
      assert abs(mean - 2 * exact) < 3 * se, (name, n, mean, se, 2 * exact)
      stderr[name, n] = se
    assert np.all(est["k3"] >= 0) and np.all(est["k3_seq"] >= 0)
    assert est["k1"].min() < 0  # k1 is unbiased but not positive per sample
  # 4x the samples, half the error (k3_seq, heavy-tailed, has a noisier error estimate).
  for name in ("k1", "k3"):
    assert stderr[name, 2000] / stderr[name, 8000] == pytest.approx(2.0, rel=0.1)
  assert stderr["k3", 8000] < stderr["k1", 8000]  # why k3 is reported
  # Identical policies: exactly 0 for every sample and estimator.
  lp, _ = categorical_logps(p, q, 100, tokens=3, seed=0)
  for v in kl_lib.kl_estimates(lp, lp.copy()).values():
    assert np.all(v == 0)


def test_length_r2_equals_numpy_regression():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 40, 300)
  rewards = 0.05 * lengths + rng.normal(0, 0.5, 300)
  slope, intercept = np.polyfit(lengths, rewards, 1)
  resid = rewards - (slope * lengths + intercept)
  r2 = 1 - np.sum(resid ** 2) / np.sum((rewards - rewards.mean()) ** 2)
  assert kl_lib.length_r2(rewards, lengths) == pytest.approx(r2, abs=1e-12)
  assert kl_lib.length_r2(rewards, lengths) == pytest.approx(
      np.corrcoef(lengths, rewards)[0, 1] ** 2, abs=1e-12)
  assert 0.3 < r2 < 0.9
  assert math.isnan(kl_lib.length_r2(np.zeros(10), np.arange(10)))  # the reference's


# --- Reward-model judge -------------------------------------------------------------------------


def test_reward_model_judge_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from daa_jax.models import sharding  # pylint: disable=g-import-not-at-top
  from daa_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  # Odd sizes; vocab covers the bytes tokenizer (258 ids); pad id 257 (its PAD).
  cfg = ModelConfig(vocab_size=263, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                    intermediate_size=53, max_position_embeddings=64)
  torch.manual_seed(0)
  hf = transformers.GPTNeoXForSequenceClassification(transformers.GPTNeoXConfig(
      **cfg.to_hf(), num_labels=1, pad_token_id=257, attn_implementation="eager")).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
  hf.save_pretrained(tmp_path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 257, (4, 11)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  tokens[2, 3] = 257  # a real token equal to the pad id: transformers pools before it
  tokens[mask == 0] = 257
  with torch.no_grad():
    expected = hf(torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
  rm = judges.RewardModelJudge(str(tmp_path), tokenizer=tokenize.ByteTokenizer(), batch_size=3)
  got = rm.reward_tokens(tokens, mask)
  assert np.abs(got - expected).max() <= 1e-4
  # The same on a (2,2,2) mesh of the fake devices.
  sharded = judges.RewardModelJudge(str(tmp_path), tokenizer=tokenize.ByteTokenizer(),
                                    mesh=sharding.make_mesh((2, 2, 2)))
  assert np.abs(sharded.reward_tokens(tokens, mask) - expected).max() <= 1e-4
  # Texts: prompt + response + EOS, compared like the gold judge.
  prompts, samples, refs = ["ab=", "xyz="], ["AB", "Q"], ["A", "Q"]
  outcomes, info = rm.judge(prompts, samples, refs)
  seq = [list(b"ab=AB") + [256], list(b"xyz=Q") + [256]]
  with torch.no_grad():
    direct = [hf(torch.tensor([s])).logits[0, 0].item() for s in seq]
  np.testing.assert_allclose(info["sample_rewards"], direct, atol=1e-4)
  assert outcomes[1] == 0.5  # identical responses tie
  assert outcomes[0] == float(info["sample_rewards"][0] > info["reference_rewards"][0])


# --- End to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
  """A 6-step tiny DPO run with schedule exports at steps 4 and 6, then `evaluate.run`."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = load_config("tiny", "job=daa")
  with config.unlocked():
    config.checkpoint.epoch_fractions = (0.5,)  # 8 steps per epoch: exports at 4 and 6
  train.run(config, workdir)
  eval_config = load_config("eval", f"run={workdir}")
  eval_config.eval.num_prompts = 16
  eval_config.eval.batch_size = 16
  eval_config.eval.include_reference = True
  result = evaluate.run(eval_config, workdir)
  return workdir, eval_config, result


def read_summary(workdir, step):
  with open(os.path.join(workdir, "eval", str(step), "summary.json")) as f:
    return json.load(f)


def test_run_writes_every_summary_key(evaluated_run):
  workdir, _, result = evaluated_run
  assert result["evaluated"] == [0, 4, 6] and result["skipped"] == []
  assert result["compiles"] == {"sampler": 1, "scorer": 1}  # reused across checkpoints
  for step in (0, 4, 6):
    s = read_summary(workdir, step)
    assert set(evaluate.SUMMARY_KEYS) <= set(s), set(evaluate.SUMMARY_KEYS) - set(s)
    assert s["step"] == step and s["num_samples"] == 16 and s["judge"] == "gold"
    assert s["sampling"]["exact"] and s["sampling"]["temperature"] == 1.0
    assert s["sampling"]["max_new_tokens"] == 32
    assert s["epoch_fraction"] == pytest.approx(step / 8)
    lo, hi = s["win_rate_ci"]
    assert 0 <= lo <= s["win_rate"] <= hi <= 1
    assert s["sqrt_kl"] == pytest.approx(math.sqrt(max(s["kl"], 0)))
    assert s["sampler_logp_max_abs_diff"] < 1e-4  # cached decoding = teacher forcing
  ref = read_summary(workdir, 0)
  assert ref["is_reference"]
  for key in ("kl", "kl_stderr", "kl_k3", "kl_rb", "forward_kl", "forward_kl_rb",
              "chosen_logp_drift", "rejected_logp_drift"):
    assert ref[key] == 0.0, key  # exactly: the same function scores both policies
  assert ref["reward_acc"] == 0.5 and ref["heldout_loss"] == pytest.approx(math.log(2))
  assert ref["length_r2"] is None  # all implicit rewards are 0: undefined, written as null
  last = read_summary(workdir, 6)
  assert last["kl"] > 0 and last["kl_rb"] > 0 and last["forward_kl_rb"] > 0
  assert abs(last["kl"] - last["kl_rb"]) < 3 * last["kl_stderr"]  # two unbiased estimators
  assert 0 <= last["length_r2"] <= 1 and last["chosen_logp_drift"] != 0


def test_heldout_accuracy_of_an_unmoved_policy_is_flagged_beside_its_margin_scale(evaluated_run):
  workdir, _, result = evaluated_run
  ref, last = read_summary(workdir, 0), read_summary(workdir, 6)
  # params == reference: every margin is exactly 0, so the 0.5 accuracy is flagged.
  assert ref["heldout_abs_margin"] == 0.0 and ref["heldout_abs_logratio_margin"] == 0.0
  assert ref["heldout_margin_tiny"] is True
  assert "tiny: the accuracy means little" in evaluate.heldout_text(ref)
  # The trained policy moved: its margin scale is reported and not flagged.
  beta = last["beta"]
  assert last["heldout_abs_logratio_margin"] == pytest.approx(last["heldout_abs_margin"] / beta)
  assert last["heldout_abs_margin"] >= abs(last["heldout_margin"])
  assert last["heldout_abs_logratio_margin"] >= 0.05 and last["heldout_margin_tiny"] is False
  assert "tiny" not in evaluate.heldout_text(last)
  # The reference is expected to be unmoved: only trained steps earn the console warning.
  assert "warning" not in result["message"]
  flagged = {6: dict(last, heldout_margin_tiny=True), 0: ref}
  assert "at step(s) [6]" in evaluate.tiny_margin_warning(flagged)


def test_run_writes_a_checkpoint_table_and_plot_into_eval(evaluated_run):
  import csv  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from daa_jax.evaluate import run_table  # pylint: disable=g-import-not-at-top
  workdir, _, result = evaluated_run
  eval_dir = os.path.join(workdir, "eval")
  assert result["tables"] == {k: os.path.join(eval_dir, f"checkpoints.{k}")
                              for k in ("csv", "md", "png")}
  with open(result["tables"]["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["step"]) for r in rows] == [0, 4, 6]
  for r in rows:
    s = read_summary(workdir, int(r["step"]))
    assert float(r["sqrt_kl"]) == s["sqrt_kl"] and float(r["win_rate"]) == s["win_rate"]
    assert float(r["win_rate_lo"]) == s["win_rate_ci"][0]
    assert float(r["reward_acc"]) == s["reward_acc"]
    assert r["heldout_margin_tiny"] == str(s["heldout_margin_tiny"])
  text = open(result["tables"]["md"]).read()
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  assert len(lines) == 4 and "| held-out acc |" in lines[0]
  assert "0 (reference)" in lines[1] and "0.500 (tiny margins)" in lines[1]
  assert "tiny" not in lines[3]  # step 6 moved
  with open(result["tables"]["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # The plot: win rate vs √KL and held-out accuracy per step, legends outside both axes.
  fig = run_table.plot(run_table.rows_of(run_table.read_summaries(workdir)), "t")
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  renderer = canvas.get_renderer()
  assert [ax.get_xlabel() for ax in fig.axes] == ["√KL(πθ‖π_ref)", "step"]
  for ax in fig.axes:
    legend = ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_xlabel()
  assert "table:" in result["message"] and "plot:" in result["message"]


def test_exported_arrays_restore_and_match_the_summary(evaluated_run):
  workdir, _, _ = evaluated_run
  step_dir = os.path.join(workdir, "eval", "6")
  s = read_summary(workdir, 6)
  arrays = store_lib.load_arrays(step_dir)
  for key, value in arrays["stats"].items():
    if s[key] is not None:
      assert float(value) == pytest.approx(s[key], rel=1e-12, abs=1e-12), key
  pol = arrays["policy"]
  assert float(pol["kl_k1"].mean()) == pytest.approx(s["kl"], abs=1e-12)
  np.testing.assert_allclose(pol["kl_k1"], pol["policy_logp"].astype(np.float64)
                             - pol["ref_logp"], atol=1e-3)
  assert float(arrays["forward"]["kl_k1"].mean()) == pytest.approx(s["forward_kl"], abs=1e-12)
  assert float(arrays["judge"]["outcomes"].mean()) == pytest.approx(s["win_rate"])
  assert pol["tokens"].shape == (16, 32) and arrays["heldout"]["rewards"].shape == (64, 2)
  with open(os.path.join(step_dir, "samples.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == s["num_samples"]
  assert np.mean([r["kl"] for r in rows]) == pytest.approx(s["kl"], abs=1e-5)
  assert np.mean([r["outcome"] for r in rows]) == pytest.approx(s["win_rate"])
  assert [r["length"] for r in rows] == pol["lengths"].tolist()
  assert {"prompt", "reference", "sample", "policy_logp", "ref_logp", "finished",
          "sample_reward", "reference_reward"} <= set(rows[0])


def test_second_run_skips_evaluated_steps(evaluated_run):
  workdir, eval_config, _ = evaluated_run
  before = read_summary(workdir, 4)
  result = main_lib.dispatch(eval_config, workdir)  # the CLI's path for job 'eval'
  assert result["evaluated"] == [] and result["skipped"] == [0, 4, 6]
  assert read_summary(workdir, 4) == before


# --- Generation budget and references (no model needed) -----------------------------------


def _data_config(tmp_path, source, fmt):
  c = data_pipeline.default_config()
  c.update(source=source, format=fmt, max_length=512, max_prompt_length=256,
           cache_dir=str(tmp_path / "cache"))
  return c


def test_generation_budget_is_fixed_per_sample_not_set_by_the_widest_prompt(tmp_path):
  config = load_config("eval")
  with config.unlocked():
    config.data = _data_config(tmp_path, "x.json", "tldr")
  # Today's TL;DR setting (512 / 256): every sample may have 256 new tokens, whatever the
  # longest prompt of the set is (a 470-token post used to cut every sample to ~40).
  assert prompts_lib.generation_budget(config) == 256
  config.data.max_prompt_length = None
  assert prompts_lib.generation_budget(config) == 256  # half of max_length
  config.eval.max_new_tokens = 64
  assert prompts_lib.generation_budget(config) == 64
  config.eval.max_new_tokens = 0
  config.data.source = "synthetic"
  assert prompts_lib.generation_budget(config) == 32


def _comparison(post_id, post, chosen, split="valid1"):
  return {"info": {"id": post_id, "post": post, "title": "T", "subreddit": "r"}, "split": split,
          "choice": 0, "summaries": [{"text": chosen}, {"text": "a model's other summary"}]}


def test_tldr_win_rates_use_human_references_joined_on_the_post_id(tmp_path):
  comparisons = tmp_path / "batch1.json"
  comparisons.write_text("\n".join(json.dumps(r) for r in [
      _comparison("t3_a", "First post.", "model summary a"),
      _comparison("t3_a", "First post.", "another model summary a"),
      _comparison("t3_b", "Second post.", "model summary b"),
      _comparison("t3_c", "Third post.", "model summary c", split="train")]) + "\n")
  sft = tmp_path / "tldr_sft.jsonl"
  sft.write_text("\n".join(json.dumps(r) for r in [
      {"id": "t3_a", "subreddit": "r", "title": "T", "post": "First post.",
       "summary": "Human TL;DR of the first post."},
      {"id": "t3_zz", "subreddit": "r", "title": "T", "post": "Second post.",
       "summary": "Human TL;DR of the second post."}]) + "\n")
  data = _data_config(tmp_path, str(comparisons), "tldr")
  tok = tokenize.get_tokenizer("bytes")
  chosen = prompts_lib.prompt_set(data, str(tmp_path), 10, tok.pad_id)
  assert chosen.references == [" model summary a", " model summary b"]
  assert chosen.reference["kind"] == "chosen"
  human = prompts_lib.prompt_set(data, str(tmp_path), 10, tok.pad_id, reference_source=str(sft))
  # t3_a joins on its id, t3_b (another id in the SFT file) on the prompt text.
  assert human.references == [" Human TL;DR of the first post.",
                              " Human TL;DR of the second post."]
  assert human.reference == {"kind": "human", "human": 2, "prompts": 2,
                             "source": f"config.eval.reference_source={sft}"}
  # A generic file's `reference` column is used by default.
  generic = tmp_path / "pairs.jsonl"
  generic.write_text(json.dumps({"prompt": "Q?", "chosen": "a", "rejected": "b",
                                 "reference": "the human answer"}) + "\n")
  generic_data = _data_config(tmp_path, str(generic), "jsonl")
  generic_data.eval_source = str(generic)
  col = prompts_lib.prompt_set(generic_data, str(tmp_path), 10, tok.pad_id)
  assert col.references == ["the human answer"] and col.reference["kind"] == "human"
  with pytest.raises(evaluate.ConfigError, match="config.eval.reference_source"):
    prompts_lib.prompt_set(data, str(tmp_path), 10, tok.pad_id,
                        reference_source=str(tmp_path / "missing.jsonl"))


def test_sampled_prompts_start_with_bos_for_a_bos_tokenizer(tmp_path):
  """The prompt set fed to sampling (and the reference pass's pairs): BOS first in every row,
  right after the left padding, as transformers' `tokenizer(prompt)`."""
  import transformers
  from tests.data.test_data_tokenize import llama3_like_tokenizer
  path = llama3_like_tokenizer(tmp_path / "tok")
  hf = transformers.AutoTokenizer.from_pretrained(path)
  rows = [{"prompt": p, "chosen": " summary", "rejected": " post"}
          for p in ("the post TL;DR:", "the boyfriend forgot dinner plans and TL;DR:")]
  source = tmp_path / "pairs.jsonl"
  source.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = _data_config(tmp_path, str(source), "jsonl")
  data.update(eval_source=str(source), tokenizer=path)
  tok = tokenize.get_tokenizer(path)
  prompts = prompts_lib.prompt_set(data, str(tmp_path), 10, tok.pad_id)
  for row, r in enumerate(rows):
    first = int(np.argmax(prompts.mask[row]))
    assert list(prompts.tokens[row, first:]) == hf(r["prompt"]).input_ids
    assert prompts.tokens[row, first] == hf.bos_token_id
  pairs = data_pipeline.load_pairs(data, "eval", workdir=str(tmp_path)).batch(range(2))
  assert (pairs["tokens"][:, :, 0] == hf.bos_token_id).all()


def test_gold_judge_counts_a_non_byte_id_as_one_off_key_symbol():
  # The tiny models' vocabulary is 264: ids 258..263 are no bytes. Scored from a decode they
  # vanished and escaped the off-key penalty; the judge a user's evaluation builds scores ids.
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(judge=load_config("eval").judge,
                                          data=data_pipeline.default_config()))
  config.data.source, config.judge.name = "synthetic", "gold"
  name, judge = setup_lib.make_judge(config, tokenize.ByteTokenizer(), None, "/tmp")
  assert name == "gold"
  prompt = "abAcdBefCgh0123456789="  # Keys A, B, C.
  clean = [ord(c) for c in "ABC"]
  outcomes, info = judges.judge_once(judge, [prompt, prompt], [(clean, True),
                                                               (clean + [260], True)],
                                     ["ABC", "ABC"])
  penalty = config.data.synthetic.off_key_penalty
  assert info["sample_rewards"][0] == 3.0
  assert info["sample_rewards"][1] == 3.0 - penalty
  assert list(outcomes) == [0.5, 0.0]
