"""The run's config fields: what `configs/*.py` compose, the closed sets, `validate`.

Shared pieces (`model_fields`, `optim_fields`, the mesh presets, `parse_arg`, `load_sibling`)
compose one level deep; `validate` checks every closed-set field and range before any data
is read. The model's own config (`ModelConfig`, sizes) is `daa_jax.models.config`.
"""

from __future__ import annotations
import difflib
from daa_jax.errors import ConfigError
from daa_jax.train import attention_config, objective_config

import ml_collections
from ml_collections import config_dict

from daa_jax.models import config as model_configs
from daa_jax.train import guard_config
from daa_jax.train import paths as paths_lib
from daa_jax.train import lora_state


# --- ml_collections configs ---------------------------------------------------------------
# Shared pieces that configs/*.py compose (one level deep). Field docs live next to defaults.

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
      close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
      fix = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(
          f"config argument {key!r} is unknown (in ':{arg}').{fix} This config takes: "
          f"{', '.join(sorted(defaults))} (other fields: --config.a.b=value).")
    parsed = _parse_value(value.strip()) if value else True
    if defaults[key] is not None and parsed is not None and type(parsed) is not type(defaults[key]):
      if isinstance(defaults[key], float) and isinstance(parsed, int):
        parsed = float(parsed)
      elif isinstance(defaults[key], str):
        parsed = value.strip()
      else:
        raise ConfigError(
            f"config argument {key}={value.strip()!r} (in ':{arg}') is not a "
            f"{type(defaults[key]).__name__}; give one like {key}={defaults[key]}.")
    out[key] = parsed
  return out


def model_fields(size: str = "tiny") -> ml_collections.ConfigDict:
  """`config.model`: a size-table entry (`model_configs.SIZES`: Pythia, Gemma-2, Llama-3.x, Qwen2.5, Mistral)
  plus execution options (see `ModelConfig`); `config.hf_model` takes its shape instead.

  `dtype` is the compute dtype (matmul inputs, activations), `param_dtype` the stored
  weights'; with `optim.state_dtype` and `objective.ref_dtype` they make the precision policy
  (`PRECISIONS`). Log-softmax, log-probs and losses are float32 whatever it says.
  """
  return ml_collections.ConfigDict(dict(
      size=size, dtype="float32", param_dtype="float32", scan_layers=False,
      remat_policy="none", attention_impl="xla", lora=lora_state.lora_fields(),  # rank 0: off
      vocab_size=0))  # vocab_size 0: the size table's (tiny: >= tokenizer)


# Precision policies: (param, compute, optimizer state, reference) dtypes. Log-softmax,
# log-probs and losses are float32 in every one. `fp32` is the CPU default and the exact
# one; `bf16` computes in bfloat16 and keeps the reference in bfloat16 but the weights,
# gradients and optimizer state in float32 (RMSprop's lr 5e-7 updates are below bfloat16's
# resolution of a weight); `bf16_state` also stores the optimizer state in bfloat16 (it is
# upcast to float32 for each update).
PRECISIONS = {
    "fp32": dict(param="float32", compute="float32", state="float32", reference="float32"),
    "bf16": dict(param="float32", compute="bfloat16", state="float32", reference="bfloat16"),
    "bf16_state": dict(param="float32", compute="bfloat16", state="bfloat16",
                       reference="bfloat16"),
}
DTYPES = ("float32", "bfloat16", "float16")


def apply_precision(config, name: str) -> None:
  """Sets `config.model.{param_dtype,dtype}`, `config.optim.state_dtype` and
  `config.objective.ref_dtype` from a `PRECISIONS` entry."""
  if name not in PRECISIONS:
    raise ConfigError(f"precision={name!r} is unknown; use one of {', '.join(PRECISIONS)}.")
  p = PRECISIONS[name]
  config.model.param_dtype = p["param"]
  config.model.dtype = p["compute"]
  config.optim.state_dtype = p["state"]
  config.objective.ref_dtype = p["reference"]


def optim_fields(recipe: str = "paper") -> ml_collections.ConfigDict:
  """`config.optim`. recipe 'paper' = RMSprop 5e-7, 150 warmup, constant, clip 10."""
  c = ml_collections.ConfigDict(dict(
      name="rmsprop", lr=5e-7, warmup_steps=150, schedule="constant", final_lr_frac=0.0,
      grad_clip=10.0, rms_decay=0.99, eps=1e-8, b1=0.9, b2=0.999, weight_decay=0.0,
      state_dtype="float32"))  # optimizer state (RMSprop's nu, Adam's moments) as stored
  if recipe == "adamw":
    c.update(name="adamw", lr=1e-4, warmup_steps=100, schedule="cosine", final_lr_frac=0.1,
             grad_clip=1.0, eps=1e-8, weight_decay=0.01)
  return c


def objective_fields(name: str = "dpo", beta: float = 0.1) -> ml_collections.ConfigDict:
  """`config.objective`: the loss (daa_jax.train.objectives) and where reference log-probs come from."""
  return ml_collections.ConfigDict(dict(
      name=name, beta=beta, alpha=0.0, epsilon=0.0, sft_weight=0.0,
      normalize="mean" if name == "simpo" else "sum",  # SimPO is length-normalized
      gamma=0.5, rmax=5.0, dpop_lambda=50.0,  # simpo γ, chipo R_max, dpop λ (HPARAM_DEFAULTS)
      reference="live",  # live: frozen ref_params forward; cached: precomputed once, on disk
      ref_dtype="float32",
      # TR-DPO (Gorbatovski et al. 2024): every ref_update_every steps the reference becomes
      # α·πθ + (1−α)·π_ref (soft; TRL's ref_model_mixup_alpha / ref_model_sync_steps) or πθ
      # (hard); needs reference='live'. none: the frozen initial reference.
      ref_update="none", ref_update_every=0, ref_update_alpha=0.6))


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
      # > 0: the vocabulary projection and log-softmax in chunks of this many target
      # positions (no [N,L,V] logits: objectives.sequence_logps's fused form)
      logps_chunk=0,
      packing=config_dict.FieldReference(True, field_type=object),  # True | False | 'fixed'
                          # DAA: one [prompt|chosen|rejected] row per pair (daa_jax/packing.py);
                          # same values as two rows (<= 1e-5), prompt computed once; 'fixed':
                          # at fixed offsets (train/fixed_layout.py), for attention_impl='splash'
      packing_block=128,  # packing='fixed': P and R are multiples of this
      progress=True))


def log_fields() -> ml_collections.ConfigDict:
  """`config.log`: where metrics go besides `metrics.jsonl` and TensorBoard (`<workdir>/tb`)."""
  return ml_collections.ConfigDict(dict(
      wandb=""))  # a Weights & Biases project name ("": off); WANDB_MODE=offline needs no network


def check_wandb(config, prefix: str = "config.") -> None:
  """Raises ConfigError when `log.wandb` is set but the wandb package is not importable."""
  log = config.get("log")
  project = log.get("wandb") if log is not None else ""
  if not project:
    return
  try:
    import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(
        f"{prefix}log.wandb={project!r} asks for Weights & Biases logging, but the wandb "
        f"package is not installed ({e}). Install it with pip install -e \".[wandb]\" (or pip "
        f"install wandb), or set --{prefix}log.wandb='' to log to metrics.jsonl and "
        "TensorBoard only.") from None


def checkpoint_fields() -> ml_collections.ConfigDict:
  """`config.checkpoint`: schedule checkpoints (kept forever) + periodic ones (rotated)."""
  return ml_collections.ConfigDict(dict(
      epoch_fractions=PAPER_EPOCH_FRACTIONS,  # in epochs; > 1 allowed for multi-epoch runs
      every_steps=0,      # also save every N steps (0: off); these rotate with max_to_keep
      max_to_keep=2,
      async_save=True,
      export_params=True))  # params-only copy per schedule checkpoint, for evaluation


JOBS = ("sft", "daa", "eval", "sweep", "quickstart", "tree_mdp")
# Names defined in modules to the right of this one (config_lib imports none of them);
# tests/test_config.py checks that these tuples equal the modules' own.
OBJECTIVE_NAMES = ("dpo", "ipo", "ipo_azar", "slic", "rdpo", "cdpo", "robust", "chipo",
                   "simpo", "dpop")
DATA_FORMATS = ("tldr", "tldr_sft", "hh", "jsonl", "parquet", "tfds", "hf")
_DTYPES = ("float32", "bfloat16", "float16")

# Every field with a closed set of values, by dotted path (checked where the config has it).
# A tuple-valued field (`objectives`) is checked element by element.
CHOICES: dict[str, tuple] = {
    "job": JOBS,
    "model.dtype": _DTYPES,
    "model.param_dtype": _DTYPES,
    "optim.state_dtype": _DTYPES,
    "model.remat_policy": ("none", "full", "dots", "dots_with_no_batch_dims"),
    "model.attention_impl": ("auto", "xla", "blockwise", "cudnn", "splash", "gpu_flash", None),
    "objective.name": OBJECTIVE_NAMES,
    "objective.normalize": ("sum", "mean"),
    "objective.reference": ("live", "cached"),
    "objective.ref_update": ("none", "soft", "hard"),
    "guard.stop": guard_config.STOP_RULES,
    "guard.judge.name": guard_config.JUDGES,
    "objective.ref_dtype": _DTYPES,
    "optim.name": ("rmsprop", "adamw", "adam", "sgd"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "data.format": DATA_FORMATS,
    "data.truncation_side": ("keep_end", "keep_start"),
    "data.overlong": ("truncate", "drop"),
    "judge.name": ("auto", "gold", "reward_model", "llm", "none"),
    "judge.task": ("tldr", "dialogue"),
    # Studies (configs/quickstart.py, configs/sweep_paper.py).
    "mode": ("local", "commands"),
    "sft_source": ("train", "hf"),
    "pairs": ("policy_samples", "data"),
    "fit_r0": ("sft", "fit"),
    "objectives": OBJECTIVE_NAMES,
    # The Tree MDP (configs/tree_mdp.py).
    "policy": ("tabular", "linear"),
    "optimizer": ("adam", "sgd"),
}
_TREE_MDP_CHOICES = {"reference": ("uniform", "random", "data")}


def _get_path(config, path: str):
  node = config
  for key in path.split("."):
    if not hasattr(node, "get") or key not in node:
      return _MISSING
    node = node[key]
  return node


_MISSING = object()


def check_choice(field: str, value, allowed, noun: str = "value") -> None:
  """Raises `ConfigError` when `value` is not in `allowed`, suggesting the closest name.

  Args:
    field: the dotted field name as the user writes it (`config.objective.name`).
    value: the configured value.
    allowed: the permitted values.
    noun: what the field holds, for the message ("size": "is not a known size").
  """
  if value in allowed:
    return
  names = [str(a) for a in allowed]
  close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
  fix = f" Did you mean {close[0]!r}? Set --{field}={close[0]}." if close else ""
  raise ConfigError(f"{field}={value!r} is not a known {noun}; choose one of: "
                    f"{', '.join(names)}.{fix}")


def _check_choices(config, prefix: str) -> None:
  job = config.get("job")
  table = dict(CHOICES, **_TREE_MDP_CHOICES) if job == "tree_mdp" else CHOICES
  for path, allowed in table.items():
    value = _get_path(config, path)
    if value is _MISSING:
      continue
    values = value if isinstance(value, (tuple, list)) and path == "objectives" else (value,)
    if path == "objectives":  # a sweep's labelled variants (study/sweep.py) count as names
      allowed = tuple(allowed) + tuple(config.get("variants") or ())
    noun = path.split(".")[-1].replace("_", " ")
    noun = {"name": {"optim": "optimizer"}.get(path.split(".")[0], path.split(".")[0]),
            "objectives": "objective", "job": "job"}.get(noun, noun)
    for v in values:
      check_choice(f"{prefix}{path}", v, allowed, noun)
  size = _get_path(config, "model.size")
  if size is not _MISSING and not config.get("hf_model"):  # hf_model: the checkpoint's shape
    check_choice(f"{prefix}model.size", model_configs.size_key(str(size)), ("auto",) + tuple(model_configs.SIZES), "size")
  for s in (config.get("sizes") or ()) if job in ("sweep", "quickstart") else ():
    check_choice(f"{prefix}sizes", model_configs.size_key(str(s)), tuple(model_configs.SIZES), "size")


def validate(config, num_devices: int | None = None, prefix: str = "config.") -> None:
  """Checks a config before any expensive work; raises `ConfigError` with the fix.

  Every closed-set field (`CHOICES`: job, objective, optimizer, schedule, data format,
  judge, dtypes, ...) is checked, with the closest allowed name for a typo; a study's
  `sft` and `daa` sub-configs are checked as their own jobs.
  """
  job = config.get("job")
  check_choice(f"{prefix}job", job, JOBS, "job")
  _check_choices(config, prefix)
  if job in ("sweep", "quickstart"):
    for sub in ("sft", "daa"):
      if sub in config:
        validate(config[sub], None, prefix=f"{prefix}{sub}.")
    return
  if job in ("sft", "daa"):
    check_wandb(config, prefix)
    t = config.train
    if t.batch_size <= 0:
      raise ConfigError(f"{prefix}train.batch_size={t.batch_size} must be positive.")
    if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
      raise ConfigError(
          f"{prefix}train.batch_size={t.batch_size} is not divisible by "
          f"{prefix}train.grad_accum={t.grad_accum}; make the batch a multiple of it.")
    attention_config.validate_packing(config, prefix)
    chunk = t.get("logps_chunk", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
      raise ConfigError(f"{prefix}train.logps_chunk={chunk!r} must be an int >= 0: target "
                        "positions per chunk of the fused vocabulary projection (0: off; "
                        "e.g. 128 on CPU/GPU or for large vocabularies).")
    if config.optim.lr <= 0:
      raise ConfigError(f"{prefix}optim.lr={config.optim.lr} must be positive.")
    lora_state.validate_lora(config, prefix)
    if job == "daa":
      o = config.objective
      objective_config.validate_objective(o, prefix)  # gamma, rmax, dpop_lambda, simpo
      objective_config.validate_ref_update(o, prefix)  # TR-DPO
      if not o.beta > 0:
        raise ConfigError(f"{prefix}objective.beta={o.beta} must be > 0 (it scales the "
                          "log-ratio; beta -> 0 removes the KL constraint).")
      if not 0 <= o.epsilon < 0.5:
        raise ConfigError(f"{prefix}objective.epsilon={o.epsilon} must be in [0, 0.5).")
      guard_config.validate_guard(config, prefix)
    fr = tuple(config.checkpoint.epoch_fractions or ())
    if any(f <= 0 for f in fr):
      raise ConfigError(f"{prefix}checkpoint.epoch_fractions={fr} must all be > 0.")
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


# Local paths made absolute where a job starts: train/paths.py.
LOCAL_PATHS, LOCAL_IF_PRESENT = paths_lib.LOCAL_PATHS, paths_lib.LOCAL_IF_PRESENT
absolute_path, resolve_paths = paths_lib.absolute_path, paths_lib.resolve_paths


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
