"""Hugging Face <-> daa_jax weights and configs, for every model family.

Each family's module tree uses its HF names (`daa_jax/models/`), so conversion is a rename
plus a transpose of Linear weights (torch stores [out, in], flax [in, out]); the family's
`hf_names` lists the pairs. GPT-NeoX, for example:

  gpt_neox.embed_in.weight [V,D]                       -> embed_in/embedding [V,D]
  gpt_neox.layers.N.<ln>.weight / .bias                -> layers_N/<ln>/scale / bias
  gpt_neox.layers.N.attention.query_key_value.weight^T -> layers_N/attention/query_key_value/kernel
  embed_out.weight^T (transformers 5: lm_head.weight^T) -> embed_out/kernel [D,V]

and Llama / Mistral / Qwen2 / Gemma-2:

  model.embed_tokens.weight [V,D]                      -> embed_tokens/embedding [V,D]
  model.layers.N.self_attn.q_proj.weight^T (.bias)     -> layers_N/self_attn/q_proj/kernel (bias)
  model.layers.N.mlp.gate_proj.weight^T                -> layers_N/mlp/gate_proj/kernel
  model.norm.weight                                    -> norm/scale
  lm_head.weight^T (untied only)                       -> lm_head/kernel [D,V]

Tied Llama-family and Gemma-2 models keep one embedding (the output projection reads it);
a stored `lm_head.weight` copy is skipped on load and not written on export.

Every converted tree is checked against `jax.eval_shape` of the model's init (structure,
shapes, dtypes) and a mismatch raises `CheckpointError` naming the HF tensor — we never pad or
drop silently. Loaded params are host numpy arrays; place them on a mesh with
`sharding.place_params` (or `jax.device_put` on one device).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from daa_jax.models import model as model_lib
from daa_jax.models import sharding
from daa_jax.models.config import ModelConfig
from daa_jax.errors import CheckpointError


def _flatten(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return tree


def _abstract(config: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flat abstract params of the non-scan layout (conversion works layer by layer)."""
  return dict(_flatten(model_lib.abstract_params(config.replace(scan_layers=False))))


def params_from_hf_state_dict(config: ModelConfig, state_dict: Mapping[str, Any],
                              dtype=jnp.float32, source: str | Mapping[str, str] = "state_dict"):
  """HF tensors -> daa_jax params (host numpy, `dtype`), in `config.scan_layers` layout.

  Args:
    config: the model config the tensors must fit.
    state_dict: HF tensor name -> array (numpy, or anything `np.asarray` takes; torch tensors
      are converted). Names as on the hub or as a base model saves them (without the
      `gpt_neox.` / `model.` prefix); old buffers are skipped.
    dtype: the params' dtype (float16/bfloat16 checkpoints are cast to it).
    source: the file name for error messages, or a dict tensor name -> file.

  Returns:
    The params tree, equal in structure and shapes to `model.abstract_params(config)`.

  Raises:
    CheckpointError: a tensor is missing, unknown or has the wrong shape.
  """
  def where(name):
    return source.get(name, "?") if isinstance(source, Mapping) else source

  files = (source if isinstance(source, str)
           else ", ".join(sorted(set(source.values()))) or "state_dict")

  dtype = np.dtype(dtype)
  family = config.family
  skip = family.ignored(config)
  tensors = {}
  for name, value in state_dict.items():
    canon = family.canonical(name)
    if skip(canon):
      continue
    tensors[canon] = (name, value)
  abstract = _abstract(config)
  wanted = family.hf_names(config)
  for target, alias in family.aliases(config).items():
    if target not in tensors and alias in tensors:
      tensors[target] = tensors[alias]
  flat = {}
  for path, hf_name in wanted.items():
    if hf_name not in tensors:
      raise CheckpointError(
          f"Checkpoint {files} has no tensor "
          f"'{hf_name}' (expected shape {_hf_shape(path, abstract[path].shape)}, for "
          f"{'/'.join(path)}); is it a {config.model_type} checkpoint of this config "
          f"({config.num_hidden_layers} layers, hidden {config.hidden_size})?")
    orig_name, value = tensors.pop(hf_name)
    array = _to_numpy(value)
    expected = _hf_shape(path, abstract[path].shape)
    if tuple(array.shape) != expected:
      raise CheckpointError(
          f"Tensor '{orig_name}' in {where(orig_name)} has shape {tuple(array.shape)} but the "
          f"config needs {expected} (daa_jax {'/'.join(path)} "
          f"{tuple(abstract[path].shape)}); check config.json against the weights.")
    if path[-1] == "kernel":
      array = array.T
    flat[path] = np.ascontiguousarray(array, dtype=dtype)  # one copy, C order
  if tensors:
    unknown = sorted(orig for orig, _ in tensors.values())
    raise CheckpointError(
        f"Checkpoint has tensors daa_jax does not know: {', '.join(unknown[:5])}"
        f"{' ...' if len(unknown) > 5 else ''} (in {where(unknown[0])}); it is not a plain "
        f"{config.model_type} model of this config (e.g. more layers than config.json says).")
  params = _unflatten(flat)
  if config.scan_layers:
    params = model_lib.to_scan_layout(params, config.num_hidden_layers)
  _check_against_abstract(config, params, dtype)
  return params


def _hf_shape(path: tuple[str, ...], shape) -> tuple[int, ...]:
  return tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16 view of torch's.
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _check_against_abstract(config: ModelConfig, params, dtype) -> None:
  """Structure, shapes and dtypes must equal the model's abstract init (a silent mismatch would train the wrong model)."""
  abstract = model_lib.abstract_params(config)
  ours = jax.tree_util.tree_map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), params)
  want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), np.dtype(dtype)), abstract)
  if ours != want:
    raise CheckpointError(f"Converted params do not match the model's init: {ours} vs {want}")


def hf_state_dict_from_params(config: ModelConfig, params, dtype=np.float32
                              ) -> dict[str, np.ndarray]:
  """daa_jax params (either layout) -> HF tensors named as on the hub (GPT-NeoX: `gpt_neox.`
  prefix and a top-level `embed_out.weight`, which every transformers version loads)."""
  # Every process gets the whole tensors (an all-gather where the mesh spans processes).
  params = sharding.global_to_host(params)
  if "layers" in params:
    params = model_lib.from_scan_layout(params, config.num_hidden_layers)
  flat = dict(_flatten(params))
  out = {}
  for path, hf_name in config.family.hf_names(config).items():
    if path not in flat:
      raise CheckpointError(f"Params have no {'/'.join(path)} (for HF tensor '{hf_name}').")
    array = np.asarray(flat.pop(path))
    if path[-1] == "kernel":
      array = array.T
    out[hf_name] = np.ascontiguousarray(array, dtype=dtype)
  if flat:
    raise CheckpointError(f"Params have entries with no HF tensor: "
                          f"{sorted('/'.join(p) for p in flat)[:5]}")
  return out


# --- Files -------------------------------------------------------------------------------


def _read_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Tensors of a local HF model directory and the file each came from."""
  def st_file(fname):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(os.path.join(path, fname), framework="numpy") as f:
      return {k: f.get_tensor(k) for k in f.keys()}

  def bin_file(fname):
    import torch  # pylint: disable=g-import-not-at-top
    # weights_only: a pickle from the internet must not run code.
    return torch.load(os.path.join(path, fname), map_location="cpu", weights_only=True)

  for index, single, reader in (
      ("model.safetensors.index.json", "model.safetensors", st_file),
      ("pytorch_model.bin.index.json", "pytorch_model.bin", bin_file)):
    if os.path.exists(os.path.join(path, index)):
      with open(os.path.join(path, index)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, single)):
      files = [single]
    else:
      continue
    tensors, sources = {}, {}
    for fname in files:
      if not os.path.exists(os.path.join(path, fname)):
        raise CheckpointError(f"{os.path.join(path, index)} lists {fname}, which is missing; "
                              "re-download the checkpoint.")
      for k, v in reader(fname).items():
        tensors[k] = v
        sources[k] = os.path.join(path, fname)
    return tensors, sources
  raise CheckpointError(
      f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
      "pass a Hugging Face model directory or hub id.")


def _download(repo_id: str, revision: str | None) -> str:
  """A hub snapshot with config.json and only one weight format (safetensors preferred)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    files = huggingface_hub.list_repo_files(repo_id, revision=revision)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"Cannot list Hugging Face repo {repo_id!r} (revision {revision}): "
                          f"{e}; check the name or pass a local directory.") from e
  fmt = "*.safetensors*" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*"
  return huggingface_hub.snapshot_download(
      repo_id, revision=revision, allow_patterns=["config.json", fmt])


def _local_dir(name_or_path: str, revision: str | None, config_only: bool = False) -> str:
  """A local directory for a model directory or hub id (downloading only the latter)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if (os.path.exists(name_or_path) or name_or_path.startswith((".", "/"))
      or name_or_path.count("/") != 1):
    raise CheckpointError(f"{name_or_path!r} is neither a model directory nor a hub id "
                          "(owner/name).")
  if config_only:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    try:
      return os.path.dirname(huggingface_hub.hf_hub_download(
          name_or_path, "config.json", revision=revision))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"Cannot fetch config.json of {name_or_path!r} (revision "
                            f"{revision}): {e}; check the name or pass a local directory.") from e
  return _download(name_or_path, revision)


def load_config(name_or_path: str, revision: str | None = None, **overrides) -> ModelConfig:
  """The `ModelConfig` of a HF model directory or hub id (config.json only).

  Args:
    name_or_path: as in `load_pretrained`.
    revision: hub revision.
    **overrides: `ModelConfig` fields to set (e.g. `scan_layers=True`).

  Raises:
    CheckpointError: no config.json.
  """
  path = _local_dir(name_or_path, revision, config_only=True)
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model directory.")
  with open(config_file) as f:
    return ModelConfig.from_hf(json.load(f), **overrides)


def load_pretrained(name_or_path: str, dtype=jnp.float32,
                    config_overrides: Mapping[str, Any] | None = None,
                    revision: str | None = None):
  """Loads a HF checkpoint of any supported family (GPT-NeoX, Llama, Mistral, Qwen2, Gemma-2).

  Args:
    name_or_path: a local model directory, or a hub id such as "EleutherAI/pythia-1b"
      (downloaded with `huggingface_hub.snapshot_download`).
    dtype: dtype of the returned params (weights stored as float16/bfloat16 are cast).
      Not the compute dtype: that is `config_overrides={'dtype': 'bfloat16'}`.
    config_overrides: `ModelConfig` fields to set, typically execution options
      (`dtype`, `scan_layers`, `remat_policy`, `attention_impl`). With `scan_layers=True`
      the params come in the scanned layout.
    revision: hub revision (branch, tag or Pythia step such as "step143000").

  Returns:
    (config, params): a `ModelConfig` and host numpy params in its layout.

  Raises:
    CheckpointError: missing files, or weights that do not fit config.json.
  """
  path = _local_dir(name_or_path, revision)
  config = load_config(path, **dict(config_overrides or {}))
  tensors, sources = _read_weights(path)
  return config, params_from_hf_state_dict(config, tensors, dtype=dtype, source=sources)


def save_pretrained(config: ModelConfig, params, out_dir: str, dtype=np.float32,
                    max_shard_bytes: int | None = None) -> None:
  """Writes `config.json` + safetensors that `transformers` loads.

  `AutoModelForCausalLM.from_pretrained(out_dir)` finds every tensor (no missing or
  unexpected keys). GPT-NeoX's config.json also carries the old `rotary_pct` /
  `rotary_emb_base`, and the Llama family's the old `rope_theta` / `rope_scaling`, so
  transformers 4.x reads the same architecture.

  Args:
    config: the model config.
    params: params in either layout.
    out_dir: created if missing.
    dtype: dtype of the stored tensors.
    max_shard_bytes: if set and the tensors are larger, write `model-0000i-of-0000n.safetensors`
      files of at most about this size plus `model.safetensors.index.json` (as HF does).

  In a multi-process job every process calls it (the params are gathered collectively) and
  process 0 writes the files.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = hf_state_dict_from_params(config, params, dtype=dtype)
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  hf_config = config.to_hf()
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    hf_config = transformers.AutoConfig.for_model(**hf_config).to_dict()
  except ImportError:
    pass
  hf_config.update(config.family.legacy_hf_keys(config))
  hf_config.update(architectures=config.to_hf()["architectures"],
                   torch_dtype=np.dtype(dtype).name, dtype=np.dtype(dtype).name)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  total = sum(a.nbytes for a in tensors.values())
  if not max_shard_bytes or total <= max_shard_bytes:
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return
  shards, size = [[]], 0
  for name, array in tensors.items():
    if shards[-1] and size + array.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += array.nbytes
  weight_map = {}
  for i, names in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in names}, os.path.join(out_dir, fname),
              metadata={"format": "pt"})
    weight_map.update({n: fname for n in names})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
