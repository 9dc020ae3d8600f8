"""Hugging Face GPT-NeoX (Pythia) <-> daa_jax weights and configs.

The module tree of `model.CausalLM` uses HF's names, so conversion is a rename plus a
transpose of Linear weights (torch stores [out, in], flax [in, out]):

  gpt_neox.embed_in.weight [V,D]                       -> embed_in/embedding [V,D]
  gpt_neox.layers.N.<ln>.weight / .bias                -> layers_N/<ln>/scale / bias
  gpt_neox.layers.N.attention.query_key_value.weight^T -> layers_N/attention/query_key_value/kernel
  gpt_neox.layers.N.{attention.dense,mlp.*}.weight^T   -> layers_N/.../kernel
  gpt_neox.final_layer_norm.weight / .bias             -> final_layer_norm/scale / bias
  embed_out.weight^T (transformers 5: lm_head.weight^T) -> embed_out/kernel [D,V]

Every converted tree is checked against `jax.eval_shape` of the model's init (structure,
shapes, dtypes) and a mismatch raises `CheckpointError` naming the HF tensor — we never pad or
drop silently. Loaded params are host numpy arrays; place them on a mesh with
`sharding.place_params` (or `jax.device_put` on one device).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from daa_jax import model as model_lib
from daa_jax.config_lib import ModelConfig
from daa_jax.errors import CheckpointError

# Buffers that old checkpoints (transformers 4.2x-4.3x) saved next to the weights: the
# causal-mask `attention.bias`, `attention.masked_bias` and rotary `inv_freq`. All are
# recomputed from the config, so they are skipped.
_IGNORED = re.compile(
    r"^(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)$")
_LAYER_PARTS = {  # HF module path inside a layer -> our module path.
    "input_layernorm": ("input_layernorm",),
    "post_attention_layernorm": ("post_attention_layernorm",),
    "attention.query_key_value": ("attention", "query_key_value"),
    "attention.dense": ("attention", "dense"),
    "mlp.dense_h_to_4h": ("mlp", "dense_h_to_4h"),
    "mlp.dense_4h_to_h": ("mlp", "dense_4h_to_h"),
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def _hf_names(config: ModelConfig) -> dict[tuple[str, ...], str]:
  """Our (non-scan) param path -> HF tensor name (without the `gpt_neox.` prefix)."""
  names = {("embed_in", "embedding"): "embed_in.weight",
           ("final_layer_norm", "scale"): "final_layer_norm.weight",
           ("final_layer_norm", "bias"): "final_layer_norm.bias",
           ("embed_out", "kernel"): "embed_out.weight"}
  for i in range(config.num_hidden_layers):
    for hf, ours in _LAYER_PARTS.items():
      is_norm = hf.endswith("layernorm")
      names[(f"layers_{i}", *ours, "scale" if is_norm else "kernel")] = f"layers.{i}.{hf}.weight"
      if is_norm or config.attention_bias:
        names[(f"layers_{i}", *ours, "bias")] = f"layers.{i}.{hf}.bias"
  return names


def _canonical(name: str) -> str:
  """Strips `gpt_neox.` and maps transformers>=5's `lm_head` to the hub's `embed_out`."""
  name = name.removeprefix("gpt_neox.")
  return "embed_out.weight" if name == "lm_head.weight" else name


def _hub_name(canon: str) -> str:
  """The name a tensor has on the hub: `gpt_neox.` prefix except the top-level head."""
  return canon if canon == "embed_out.weight" else "gpt_neox." + canon


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
      are converted). Names may carry the `gpt_neox.` prefix; old buffers are skipped.
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
  tensors = {}
  for name, value in state_dict.items():
    canon = _canonical(name)
    if _IGNORED.match(canon):
      continue
    tensors[canon] = (name, value)
  abstract = _abstract(config)
  wanted = _hf_names(config)
  if (config.tie_word_embeddings and "embed_out.weight" not in tensors
      and "embed_in.weight" in tensors):
    # Tied checkpoints store the input embedding only; daa_jax keeps an untied copy.
    tensors["embed_out.weight"] = tensors["embed_in.weight"]
  flat = {}
  for path, hf_name in wanted.items():
    if hf_name not in tensors:
      raise CheckpointError(
          f"Checkpoint {files} has no tensor "
          f"'{_hub_name(hf_name)}' (expected shape {_hf_shape(path, abstract[path].shape)}, for "
          f"{'/'.join(path)}); is it a GPT-NeoX checkpoint of this config "
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
        "GPT-NeoX model of this config (e.g. more layers than config.json says).")
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
  """daa_jax params (either layout) -> HF tensors named as on the hub (`gpt_neox.` prefix,
  top-level `embed_out.weight`, which every transformers version loads)."""
  params = jax.device_get(params)
  if "layers" in params:
    params = model_lib.from_scan_layout(params, config.num_hidden_layers)
  flat = dict(_flatten(params))
  out = {}
  for path, hf_name in _hf_names(config).items():
    if path not in flat:
      raise CheckpointError(f"Params have no {'/'.join(path)} (for HF tensor '{hf_name}').")
    array = np.asarray(flat.pop(path))
    if path[-1] == "kernel":
      array = array.T
    out[_hub_name(hf_name)] = np.ascontiguousarray(array, dtype=dtype)
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
      "pass a Hugging Face GPT-NeoX model directory or hub id.")


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
  """The `ModelConfig` of a HF GPT-NeoX model directory or hub id (config.json only).

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
  """Loads a HF GPT-NeoX (Pythia) checkpoint.

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


def save_pretrained(config: ModelConfig, params, out_dir: str, dtype=np.float32) -> None:
  """Writes `config.json` + `model.safetensors` that `transformers` loads.

  `GPTNeoXForCausalLM.from_pretrained(out_dir)` finds every tensor (no missing or unexpected
  keys). config.json carries both today's keys (`rope_parameters`) and the old
  `rotary_pct`/`rotary_emb_base`, so transformers 4.x reads the same architecture.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  hf_config = config.to_hf()
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    hf_config = transformers.GPTNeoXConfig(**hf_config).to_dict()
  except ImportError:
    pass
  hf_config.update(rotary_pct=config.rotary_pct, rotary_emb_base=config.rotary_emb_base,
                   architectures=["GPTNeoXForCausalLM"], torch_dtype=np.dtype(dtype).name,
                   dtype=np.dtype(dtype).name)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  save_file(hf_state_dict_from_params(config, params, dtype=dtype),
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
