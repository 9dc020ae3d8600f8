"""Shared configuration pieces: `ModelConfig`, the Pythia size table, config helpers.

`ModelConfig` is the frozen dataclass that model code receives (the ConfigDict stops at the
boundary). `pythia(size)` returns the published Pythia shape; the `tiny*`
sizes are for tests and the built-in synthetic task.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from daa_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPT-NeoX (Pythia) architecture plus daa_jax's execution options.

  Architecture fields use Hugging Face `GPTNeoXConfig` names so `from_hf`/`to_hf` are nearly
  the identity. Execution fields (`dtype`, `scan_layers`, `remat_policy`, `attention_impl`) do
  not change the function the model computes.
  """

  vocab_size: int = 50304
  hidden_size: int = 512
  num_hidden_layers: int = 6
  num_attention_heads: int = 8
  intermediate_size: int = 2048
  rotary_pct: float = 0.25
  rotary_emb_base: float = 10000.0
  max_position_embeddings: int = 2048
  layer_norm_eps: float = 1e-5
  use_parallel_residual: bool = True
  attention_bias: bool = True
  hidden_act: str = "gelu"  # Pythia: exact (erf) GELU.
  tie_word_embeddings: bool = False
  bos_token_id: int = 0
  eos_token_id: int = 0
  # Execution options (not part of the HF architecture).
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  attention_impl: str = "xla"  # xla | cudnn | None (let jax choose)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"config.model: hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}; pick sizes that divide.")
    if self.rotary_dim % 2:
      # rotate_half pairs dim i with i + R/2; transformers fails on odd R as well.
      raise ConfigError(
          f"config.model: rotary_pct={self.rotary_pct} gives an odd rotary_dim="
          f"{self.rotary_dim} (head_dim {self.head_dim}); pick sizes giving an even one.")
    if self.hidden_act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"):
      raise ConfigError(f"config.model.hidden_act={self.hidden_act!r} is not supported.")
    if self.remat_policy not in ("none", "full", "dots", "dots_with_no_batch_dims"):
      raise ConfigError(
          f"config.model.remat_policy={self.remat_policy!r}; use none, full, dots or "
          "dots_with_no_batch_dims.")

  # --- Hugging Face interop -------------------------------------------------------------
  _HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "rotary_pct", "rotary_emb_base", "max_position_embeddings",
              "layer_norm_eps", "use_parallel_residual", "attention_bias", "hidden_act",
              "tie_word_embeddings", "bos_token_id", "eos_token_id")

  @classmethod
  def from_hf(cls, hf_config: Any, **overrides) -> "ModelConfig":
    """From a `transformers.GPTNeoXConfig` or its `config.json` dict.

    Accepts the keys that older transformers versions wrote for Pythia (e.g. `rotary_emb_base`
    at top level, no `attention_bias`, `rope_scaling: null`) as well as today's (`rope_theta`,
    `partial_rotary_factor`, `rope_parameters`).
    """
    d = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if d.get("model_type", "gpt_neox") != "gpt_neox":
      raise ConfigError(
          f"HF config has model_type={d.get('model_type')!r}; daa_jax loads GPT-NeoX "
          "(Pythia) models only.")
    kw = {}
    for k in cls._HF_KEYS:
      if k in d and d[k] is not None:
        kw[k] = d[k]
    rope = d.get("rope_parameters") or {}
    if isinstance(rope, Mapping):
      if rope.get("rope_theta") is not None:
        kw["rotary_emb_base"] = rope["rope_theta"]
      if rope.get("partial_rotary_factor") is not None:
        kw["rotary_pct"] = rope["partial_rotary_factor"]
    if d.get("rope_theta") is not None:
      kw["rotary_emb_base"] = d["rope_theta"]
    if d.get("partial_rotary_factor") is not None and "rotary_pct" not in d:
      kw["rotary_pct"] = d["partial_rotary_factor"]
    if d.get("rope_scaling"):
      raise ConfigError(f"HF config has rope_scaling={d['rope_scaling']!r}; only plain "
                        "rotary embeddings (Pythia) are supported.")
    kw["rotary_emb_base"] = float(kw.get("rotary_emb_base", 10000.0))
    kw["rotary_pct"] = float(kw.get("rotary_pct", 0.25))
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict:
    """Keyword arguments for `transformers.GPTNeoXConfig(**cfg.to_hf())`."""
    d = {k: getattr(self, k) for k in self._HF_KEYS}
    d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
             rope_theta=self.rotary_emb_base, partial_rotary_factor=self.rotary_pct,
             rope_scaling=None, initializer_range=0.02, use_cache=True,
             attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.1)
    return d


def _neox(hidden, layers, heads, vocab=50304):
  return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=4 * hidden, vocab_size=vocab)


# The Pythia suite (Biderman et al. 2023): all share rotary_pct 0.25, parallel residual,
# untied embeddings, max_position_embeddings 2048. Vocab sizes are the padded ones in the
# released checkpoints (6.9b and 12b are padded further for tensor parallelism).
PYTHIA_SIZES: dict[str, dict] = {
    "14m": _neox(128, 6, 4),
    "31m": _neox(256, 6, 8),
    "70m": _neox(512, 6, 8),
    "160m": _neox(768, 12, 12),
    "410m": _neox(1024, 24, 16),
    "1b": _neox(2048, 16, 8),
    "1.4b": _neox(2048, 24, 16),
    "2.8b": _neox(2560, 32, 32),
    "6.9b": _neox(4096, 32, 32, vocab=50432),
    "12b": _neox(5120, 36, 40, vocab=50688),
    # Test / synthetic-task sizes (odd-ish shapes catch layout bugs; vocab set by the data).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256, vocab_size=264, max_position_embeddings=512),
    "tiny2": dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=384, vocab_size=264, max_position_embeddings=512),
    "tiny4": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512, vocab_size=264, max_position_embeddings=512),
}


def pythia(size: str, **overrides) -> ModelConfig:
  """The `ModelConfig` of a Pythia size (e.g. `pythia("1b")`), with optional overrides."""
  key = size.lower().removeprefix("pythia-")
  if key not in PYTHIA_SIZES:
    raise ConfigError(
        f"config.model.size={size!r} is not a known size; choose one of "
        f"{', '.join(PYTHIA_SIZES)}.")
  return ModelConfig(**{**PYTHIA_SIZES[key], **overrides})


def hub_id(size: str) -> str:
  """The Hugging Face hub id of a Pythia size (the standard, non-deduped suite)."""
  return f"EleutherAI/pythia-{size.lower().removeprefix('pythia-')}"


# --- ml_collections configs ---------------------------------------------------------------
# Shared pieces that configs/*.py compose (one level deep). Field docs live next to defaults.

import ml_collections  # noqa: E402  (kept next to its users for readability)

MESH_PRESETS = {
    # name: (data, fsdp, tensor); one -1 takes the remaining devices.
    "dp": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "dp_fsdp": (2, -1, 1),
    "fsdp_tp2": (1, -1, 2),
    "tp": (1, 1, -1),
}

PAPER_EPOCH_FRACTIONS = (0.215, 0.43, 0.645, 0.86, 1.0)


def _parse_value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if low in ("none", "null"):
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config file's `key=value,...` argument (big_vision style) over `defaults`.

  `parse_arg("size=1b,beta=0.05", size="tiny", beta=0.1, runlocal=False)` gives a ConfigDict
  with `size='1b'`, `beta=0.05`, `runlocal=False`. A bare word `x` means `x=True`. Unknown keys
  raise `ConfigError` listing the known ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"config argument {key!r} is unknown; this config takes: "
          f"{', '.join(sorted(defaults))} (other fields: --config.a.b=value).")
    parsed = _parse_value(value.strip()) if value else True
    if defaults[key] is not None and parsed is not None and type(parsed) is not type(defaults[key]):
      if isinstance(defaults[key], float) and isinstance(parsed, int):
        parsed = float(parsed)
      elif isinstance(defaults[key], str):
        parsed = value.strip()
    out[key] = parsed
  return out


def model_fields(size: str = "tiny") -> ml_collections.ConfigDict:
  """`config.model`: a Pythia size plus execution options (see `ModelConfig`)."""
  return ml_collections.ConfigDict(dict(
      size=size, dtype="float32", scan_layers=False, remat_policy="none",
      attention_impl="xla", vocab_size=0))  # vocab_size 0: the size table's (tiny: >= tokenizer)


def optim_fields(recipe: str = "paper") -> ml_collections.ConfigDict:
  """`config.optim`. recipe 'paper' = RMSprop 5e-7, 150 warmup, constant, clip 10."""
  c = ml_collections.ConfigDict(dict(
      name="rmsprop", lr=5e-7, warmup_steps=150, schedule="constant", final_lr_frac=0.0,
      grad_clip=10.0, rms_decay=0.99, eps=1e-8, b1=0.9, b2=0.999, weight_decay=0.0))
  if recipe == "adamw":
    c.update(name="adamw", lr=1e-4, warmup_steps=100, schedule="cosine", final_lr_frac=0.1,
             grad_clip=1.0, eps=1e-8, weight_decay=0.01)
  return c


def objective_fields(name: str = "dpo", beta: float = 0.1) -> ml_collections.ConfigDict:
  """`config.objective`: the loss (daa_jax.objectives) and where reference log-probs come from."""
  return ml_collections.ConfigDict(dict(
      name=name, beta=beta, alpha=0.0, epsilon=0.0, sft_weight=0.0, normalize="sum",
      reference="live",  # live: frozen ref_params forward; cached: precomputed once, on disk
      ref_dtype="float32"))


def train_fields() -> ml_collections.ConfigDict:
  """`config.train`: the loop."""
  return ml_collections.ConfigDict(dict(
      batch_size=128,     # global pairs (DAA) or sequences (SFT) per optimizer step
      grad_accum=1,       # micro-batches per step (the paper: 8 x 16 = 128)
      num_epochs=1.0,
      max_steps=-1,       # > 0 caps the run
      log_every=10,
      eval_every=0,       # held-out preference metrics every N steps (0: off)
      eval_batches=4,
      logps_chunk=0,      # > 0: log-softmax over the vocabulary in chunks of this many tokens
      packing=True,       # DAA: one [prompt|chosen|rejected] row per pair (daa_jax/packing.py);
                          # same values as two rows (<= 1e-5), prompt computed once
      debug_nan_step=-1,  # tests: inject a NaN loss at this step
      debug_kill_after_checkpoint=-1,  # tests: SIGKILL right after this step's save starts
      debug_sigterm_at_step=-1,        # tests: send ourselves SIGTERM after this step
      progress=True))


def checkpoint_fields() -> ml_collections.ConfigDict:
  """`config.checkpoint`: schedule checkpoints (kept forever) + periodic ones (rotated)."""
  return ml_collections.ConfigDict(dict(
      epoch_fractions=PAPER_EPOCH_FRACTIONS,  # in epochs; > 1 allowed for multi-epoch runs
      every_steps=0,      # also save every N steps (0: off); these rotate with max_to_keep
      max_to_keep=2,
      async_save=True,
      export_params=True))  # params-only copy per schedule checkpoint, for evaluation


def validate(config, num_devices: int | None = None) -> None:
  """Checks a training config before any expensive work; raises `ConfigError` with the fix."""
  job = config.get("job")
  if job not in ("sft", "daa", "eval", "tree_mdp", "sweep", "quickstart"):
    raise ConfigError(f"config.job={job!r}; use sft, daa, eval, sweep, quickstart or tree_mdp.")
  if job in ("sft", "daa"):
    size = config.model.size
    if size.lower().removeprefix("pythia-") not in PYTHIA_SIZES:
      raise ConfigError(f"config.model.size={size!r} is not a known size; choose one of "
                        f"{', '.join(PYTHIA_SIZES)}.")
    t = config.train
    if t.batch_size <= 0:
      raise ConfigError(f"config.train.batch_size={t.batch_size} must be positive.")
    if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
      raise ConfigError(
          f"config.train.batch_size={t.batch_size} is not divisible by "
          f"config.train.grad_accum={t.grad_accum}; make the batch a multiple of it.")
    if config.optim.lr <= 0:
      raise ConfigError(f"config.optim.lr={config.optim.lr} must be positive.")
    if job == "daa":
      o = config.objective
      if not o.beta > 0:
        raise ConfigError(f"config.objective.beta={o.beta} must be > 0 (it scales the "
                          "log-ratio; beta -> 0 removes the KL constraint).")
      if o.normalize not in ("sum", "mean"):
        raise ConfigError(f"config.objective.normalize={o.normalize!r}; use 'sum' or 'mean'.")
      if not 0 <= o.epsilon < 0.5:
        raise ConfigError(f"config.objective.epsilon={o.epsilon} must be in [0, 0.5).")
      if o.reference not in ("live", "cached"):
        raise ConfigError(f"config.objective.reference={o.reference!r}; use live or cached.")
    fr = tuple(config.checkpoint.epoch_fractions or ())
    if any(f <= 0 for f in fr):
      raise ConfigError(f"config.checkpoint.epoch_fractions={fr} must all be > 0.")
  mesh = tuple(config.get("mesh") or (-1, 1, 1))
  if len(mesh) != 3 or sum(1 for m in mesh if m == -1) > 1 or any(
      m == 0 or m < -1 for m in mesh):
    raise ConfigError(f"config.mesh={mesh} must be 3 sizes (data, fsdp, tensor), at most one "
                      "of them -1.")
  if num_devices is not None:
    known = 1
    for m in mesh:
      known *= m if m > 0 else 1
    if num_devices % known:
      raise ConfigError(
          f"config.mesh={mesh} does not divide the {num_devices} devices; use sizes whose "
          f"product divides {num_devices} (or put -1 on one axis to take the rest).")
    if config.get("job") in ("sft", "daa"):
      resolved = [m if m > 0 else num_devices // known for m in mesh]
      data_par = resolved[0] * resolved[1]
      micro = config.train.batch_size // config.train.grad_accum
      if micro % data_par:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} / grad_accum="
            f"{config.train.grad_accum} = {micro} per micro-batch does not split over the "
            f"{data_par} data-parallel devices of config.mesh={mesh}; use a multiple of "
            f"{data_par}.")


def shrink_for_local(config) -> None:
  """`runlocal`: shrink a training config onto a laptop CPU (a small synthetic dataset, small
  batches, an optimizer that moves a tiny random model in minutes). Architecture-independent:
  combine with `size=tiny` for the fastest run."""
  config.train.batch_size = 32
  config.train.grad_accum = 1
  config.train.num_epochs = 3.0
  config.train.log_every = 5
  config.optim.update(name="adam", lr=3e-4, warmup_steps=30, schedule="constant",
                      grad_clip=10.0)
  config.checkpoint.async_save = True
  if config.data.source == "synthetic":
    config.data.synthetic.num_sft = 2000
    config.data.synthetic.num_pairs = 512
    config.data.synthetic.num_eval = 128


def load_sibling(this_file: str, name: str, arg: str | None = None):
  """`get_config(arg)` of another file in the same configs/ directory (composition by import,
  one level deep), returned unlocked for the caller to adjust."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"daa_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config
