"""Hugging Face encoders in and out, without PyTorch: safetensors read and written with numpy.

Import: ``config.json`` + ``*.safetensors`` (sharded too) of a BERT or XLM-RoBERTa checkpoint
(mBERT, mDPR, mContriever, XLM-R, mE5), from a local directory or a hub id, into the Flax
``Encoder``'s tree, with the pooling and normalisation of its sentence-transformers description
(``modules.json``) where it has one. Export: a trained encoder as a HF model directory (``config.json``,
``model.safetensors``, tokenizer files) plus a sentence-transformers pooling description, so
``transformers.AutoModel`` and ``sentence_transformers.SentenceTransformer`` load it.

Every name and layout difference is in ``_LAYER_TABLE`` / ``_EMBEDDING_TABLE``: HF name -> Flax path,
with the one transform HF needs (``nn.Linear`` stores ``[out, in]``, Flax ``Dense`` ``[in, out]``).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import shutil

import numpy as np
from absl import logging

FAMILIES = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel", "roberta": "RobertaModel"}

# (HF suffix, Flax path below the transformer, transposed?)
_EMBEDDING_TABLE = [
    ("embeddings.word_embeddings.weight", ("word_embeddings", "embedding"), False),
    ("embeddings.position_embeddings.weight", ("position_embeddings", "embedding"), False),
    ("embeddings.token_type_embeddings.weight", ("token_type_embeddings", "embedding"), False),
    ("embeddings.LayerNorm.weight", ("embeddings_LayerNorm", "scale"), False),
    ("embeddings.LayerNorm.bias", ("embeddings_LayerNorm", "bias"), False),
]
_LAYER_TABLE = [
    ("attention.self.query", ("attention_self", "query")),
    ("attention.self.key", ("attention_self", "key")),
    ("attention.self.value", ("attention_self", "value")),
    ("attention.output.dense", ("attention_output_dense",)),
    ("attention.output.LayerNorm", ("attention_output_LayerNorm",)),
    ("intermediate.dense", ("intermediate_dense",)),
    ("output.dense", ("output_dense",)),
    ("output.LayerNorm", ("output_LayerNorm",)),
]
# Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def name_table(num_layers: int, type_vocab_size: int) -> list[tuple[str, tuple[str, ...], bool]]:
  """Every ``(HF name, Flax path, transposed)`` of an encoder with ``num_layers`` layers."""
  table = [row for row in _EMBEDDING_TABLE if type_vocab_size or "token_type" not in row[0]]
  for layer in range(num_layers):
    for hf_module, flax_module in _LAYER_TABLE:
      hf = f"encoder.layer.{layer}.{hf_module}"
      flax = (f"layer_{layer}",) + flax_module
      if hf_module.endswith("LayerNorm"):
        table += [(f"{hf}.weight", flax + ("scale",), False), (f"{hf}.bias", flax + ("bias",), False)]
      else:
        table += [(f"{hf}.weight", flax + ("kernel",), True), (f"{hf}.bias", flax + ("bias",), False)]
  return table


# What ``resolve`` downloads: weights, configs and tokenizer files of encoders and of the Qwen generator,
# never pytorch_model.bin or other framework copies. Newer hub repos keep the chat template in its own
# chat_template.jinja rather than in tokenizer_config.json; without it the generator has no template.
DOWNLOAD_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "sentencepiece*",
                     "special_tokens_map.json", "vocab.txt", "*.model", "modules.json", "1_Pooling/*",
                     "chat_template.jinja")


def resolve(name_or_path: str) -> str:
  """A local directory holding the checkpoint: the path itself, or a hub snapshot (cached)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name_or_path, allow_patterns=list(DOWNLOAD_PATTERNS))
  except Exception as error:  # Offline, unknown repo, gated repo: all need the same advice.
    raise FileNotFoundError(
        f"could not get {name_or_path!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
        f"Without network access, download it on a machine that has it "
        f"(`huggingface-cli download {name_or_path} --local-dir DIR`), copy DIR here and pass DIR instead.") from error


def read_hf_config(directory: str) -> dict:
  """``config.json``, plus under ``sentence_transformers`` what the model's sentence-transformers description
  prescribes (``read_sentence_transformers``) when it has one."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory}: no config.json; not a Hugging Face model directory")
  with open(path, encoding="utf-8") as file:
    hf_config = json.load(file)
  description = read_sentence_transformers(directory)
  if description:
    hf_config["sentence_transformers"] = description
  return hf_config


# Single pooling modes of sentence-transformers' Pooling that the encoder computes (its names, old and new).
_POOLING_MODES = {"cls": "cls", "mean": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}


def read_sentence_transformers(directory: str) -> dict:
  """``{"pooling": "cls" | "mean", "normalize": bool}`` from ``modules.json`` and ``1_Pooling/config.json``,
  or ``{}`` without a ``modules.json``.

  Sentence-transformers models (all-MiniLM-L6-v2, mE5, ...) are trained to be used pooled and normalised
  as this description says, and their config.json does not say it: an import that kept the configured
  CLS pooling would give other embeddings than the model's. Modules the encoder cannot reproduce (Dense,
  other pooling modes) are named in a warning and left out.
  """
  path = os.path.join(directory, "modules.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as file:
    modules = json.load(file)
  description = {"normalize": False}
  for module in modules:
    kind = module.get("type", "").rsplit(".", 1)[-1]
    if kind == "Transformer":
      continue
    if kind == "Normalize":
      description["normalize"] = True
      continue
    if kind == "Pooling":
      with open(os.path.join(directory, module.get("path", ""), "config.json"), encoding="utf-8") as file:
        pooling = json.load(file)
      # sentence-transformers >= 6 writes "pooling_mode"; earlier versions one boolean per mode.
      modes = pooling.get("pooling_mode", [key for key, value in pooling.items()
                                           if key.startswith("pooling_mode_") and value is True])
      modes = [modes] if isinstance(modes, str) else list(modes)
      if len(modes) == 1 and modes[0] in _POOLING_MODES:
        description["pooling"] = _POOLING_MODES[modes[0]]
        continue
    logging.warning("%s: sentence-transformers module %s (%s) is not reproduced by the encoder; the imported "
                    "model's embeddings will differ from sentence-transformers'", path, module.get("name"),
                    module.get("type"))
  return description


def model_config_from_hf(hf_config: dict, model_config):
  """``model_config`` with its architecture fields replaced by the checkpoint's, and its pooling and
  normalisation by those of the checkpoint's sentence-transformers description, where it has one."""
  family = hf_config.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"config.json: model_type {family!r} is not supported; expected one of {sorted(FAMILIES)}")
  activation = hf_config.get("hidden_act", "gelu")
  if activation != "gelu":
    raise ValueError(f"config.json: hidden_act {activation!r} is not supported (the encoder uses exact gelu)")
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("config.json: only absolute position embeddings are supported")
  config = model_config.copy_and_resolve_references()
  config.update(
      vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
      num_layers=hf_config["num_hidden_layers"], num_heads=hf_config["num_attention_heads"],
      intermediate_size=hf_config["intermediate_size"],
      max_position_embeddings=hf_config["max_position_embeddings"],
      type_vocab_size=hf_config.get("type_vocab_size", 2),
      # RoBERTa-style models count positions from pad_token_id + 1.
      position_offset=hf_config.get("pad_token_id", 1) + 1 if family != "bert" else 0,
      layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
      initializer_range=hf_config.get("initializer_range", 0.02))
  for field, value in hf_config.get("sentence_transformers", {}).items():
    if config[field] != value:
      logging.info("model.%s: %r -> %r, as the checkpoint's sentence-transformers description says", field,
                   config[field], value)
      config[field] = value
  return config


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                       "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """Tensors of one safetensors file, memory-mapped: an 8-byte header length, a JSON header, the data."""
  import ml_dtypes  # Gives numpy a bfloat16.
  data = np.memmap(path, dtype=np.uint8, mode="r")
  header_length = int(data[:8].view("<u8")[0])
  header = json.loads(bytes(data[8:8 + header_length]))
  header.pop("__metadata__", None)
  base = 8 + header_length
  tensors = {}
  for name, entry in header.items():
    dtype_name = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype_name is None:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    start, end = entry["data_offsets"]
    tensors[name] = data[base + start:base + end].view(dtype).reshape(entry["shape"])
  return tensors


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of ``model.safetensors`` or its shards, as (memory-mapped) numpy arrays."""
  paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if not paths:
    if glob.glob(os.path.join(directory, "pytorch_model*.bin")):
      raise FileNotFoundError(
          f"{directory}: only pytorch_model.bin, which cannot be read without torch. Convert it once where "
          "torch is installed: AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)")
    raise FileNotFoundError(f"{directory}: no *.safetensors file")
  tensors = {}
  for path in paths:
    tensors.update(_read_safetensors_file(path))
  return tensors


def _strip_prefix(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  """Drops the head model's prefix (``bert.``, ``roberta.``, ...) and legacy LayerNorm names."""
  anchor = "embeddings.word_embeddings.weight"
  prefixes = [name[:-len(anchor)] for name in tensors if name.endswith(anchor)]
  if len(prefixes) != 1:
    raise ValueError(f"expected one '{anchor}' tensor, found {len(prefixes)}: not a BERT/XLM-R encoder")
  prefix = prefixes[0]
  stripped = {}
  for name, value in tensors.items():
    if name.startswith(prefix):
      name = name[len(prefix):]
      for old, new in _LEGACY_NAMES.items():
        name = name.replace(old, new)
    stripped[name] = value
  return stripped, prefix


def hf_to_flax(tensors: dict[str, np.ndarray], model_config) -> dict:
  """The ``transformer`` subtree of the Flax ``Encoder`` from HF tensors; reports unused and missing."""
  tensors, _ = _strip_prefix(tensors)
  tree: dict = {}
  missing = []
  for hf_name, path, transposed in name_table(model_config.num_layers, model_config.type_vocab_size):
    if hf_name not in tensors:
      missing.append(hf_name)
      continue
    value = np.asarray(tensors.pop(hf_name), dtype=np.float32)
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.T if transposed else value
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensors the encoder needs: {missing[:10]}")
  if tensors:
    logging.info("Unused checkpoint tensors (heads and buffers the encoder does not have): %s", sorted(tensors))
  return tree


def check_shapes(loaded, expected, where: str = "") -> None:
  """Fails on the first tensor whose shape differs from the module's, naming it."""
  if isinstance(expected, dict):
    for key in expected:
      check_shapes(loaded[key], expected[key], f"{where}/{key}" if where else key)
    return
  if tuple(loaded.shape) != tuple(expected.shape):
    raise ValueError(f"tensor {where}: checkpoint shape {tuple(loaded.shape)} != encoder shape {tuple(expected.shape)}")


def load_encoder(name_or_path: str, model_config):
  """``(model_config, params)`` of a ``BiEncoder`` whose towers start from the HF checkpoint.

  The architecture comes from the checkpoint, and so do pooling and normalisation where it has a
  sentence-transformers description; projection and tying stay as configured (the rest too, without a
  description). A projection head, if configured, keeps its random initialisation.
  """
  import jax
  from axl_jax import encoder
  directory = resolve(name_or_path)
  config = model_config_from_hf(read_hf_config(directory), model_config)
  transformer = hf_to_flax(read_safetensors(directory), config)
  # Shapes only: initialising a base-size model just to overwrite it would double the load time.
  expected = jax.eval_shape(functools.partial(encoder.init_params, config), jax.random.key(0))
  params = {}
  for tower in expected:
    check_shapes(transformer, expected[tower]["transformer"])
    params[tower] = {"transformer": transformer}
  if config.projection_dim:  # A head the checkpoint does not have: freshly initialised.
    initialised = encoder.init_params(config, jax.random.key(0))
    for tower in params:
      params[tower]["projection"] = jax.tree.map(np.asarray, initialised[tower]["projection"])
  return config, params


def flax_to_hf(transformer: dict, model_config) -> dict[str, np.ndarray]:
  tensors = {}
  for hf_name, path, transposed in name_table(model_config.num_layers, model_config.type_vocab_size):
    value = transformer
    for key in path:
      value = value[key]
    value = np.asarray(value, dtype=np.float32)
    tensors[hf_name] = np.ascontiguousarray(value.T if transposed else value)
  return tensors


def hf_config_from_model_config(model_config, family: str) -> dict:
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
  pad_token_id = model_config.position_offset - 1 if family != "bert" else 0
  return {
      "architectures": [FAMILIES[family]], "model_type": family,
      "vocab_size": model_config.vocab_size, "hidden_size": model_config.hidden_size,
      "num_hidden_layers": model_config.num_layers, "num_attention_heads": model_config.num_heads,
      "intermediate_size": model_config.intermediate_size, "hidden_act": "gelu",
      "hidden_dropout_prob": model_config.hidden_dropout,
      "attention_probs_dropout_prob": model_config.attention_dropout,
      "max_position_embeddings": model_config.max_position_embeddings,
      # HF always has a token type table; a model without one exports a single all-zero row.
      "type_vocab_size": max(1, model_config.type_vocab_size),
      "initializer_range": model_config.initializer_range, "layer_norm_eps": model_config.layer_norm_eps,
      "pad_token_id": pad_token_id, "position_embedding_type": "absolute",
  }


def export_encoder(params_tower: dict, model_config, tokenizer, directory: str, *, max_seq_length: int) -> None:
  """Writes one tower as a HF model directory with a sentence-transformers description, atomically.

  ``max_seq_length`` goes to ``sentence_bert_config.json``: sentence-transformers truncates every input
  to it, so it must be the passage length the model was trained with (``data.passage_max_length``),
  not the size of the position table, which the model never saw filled.
  """
  from safetensors.numpy import save_file
  longest = model_config.max_position_embeddings - model_config.position_offset
  if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer)) or \
      not 0 < max_seq_length <= longest:
    raise ValueError(f"export_encoder: max_seq_length {max_seq_length!r} must be an integer in 1..{longest} "
                     f"(model.max_position_embeddings {model_config.max_position_embeddings} - "
                     f"model.position_offset {model_config.position_offset})")
  # Position offset 0 is BERT's convention; any other is RoBERTa's (pad_token_id + 1).
  family = "bert" if model_config.position_offset == 0 else "xlm-roberta"
  tensors = flax_to_hf(params_tower["transformer"], model_config)
  if model_config.type_vocab_size == 0:
    tensors["embeddings.token_type_embeddings.weight"] = np.zeros((1, model_config.hidden_size), np.float32)
  partial = directory.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  save_file(tensors, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as file:
    json.dump(hf_config_from_model_config(model_config, family), file, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(partial)
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  os.makedirs(os.path.join(partial, "1_Pooling"))
  with open(os.path.join(partial, "1_Pooling", "config.json"), "w", encoding="utf-8") as file:
    json.dump({"word_embedding_dimension": model_config.hidden_size,
               "pooling_mode_cls_token": model_config.pooling == "cls",
               "pooling_mode_mean_tokens": model_config.pooling == "mean",
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, file, indent=2)
  if model_config.projection_dim:
    projection = params_tower["projection"]
    os.makedirs(os.path.join(partial, "2_Dense"))
    save_file({"linear.weight": np.ascontiguousarray(np.asarray(projection["kernel"], np.float32).T),
               "linear.bias": np.asarray(projection["bias"], np.float32)},
              os.path.join(partial, "2_Dense", "model.safetensors"))
    with open(os.path.join(partial, "2_Dense", "config.json"), "w", encoding="utf-8") as file:
      json.dump({"in_features": model_config.hidden_size, "out_features": model_config.projection_dim,
                 "bias": True, "activation_function": "torch.nn.modules.linear.Identity"}, file, indent=2)
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": "2_Dense",
                    "type": "sentence_transformers.models.Dense"})
  if model_config.normalize:
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    os.makedirs(os.path.join(partial, modules[-1]["path"]))
  with open(os.path.join(partial, "modules.json"), "w", encoding="utf-8") as file:
    json.dump(modules, file, indent=2)
  with open(os.path.join(partial, "sentence_bert_config.json"), "w", encoding="utf-8") as file:
    json.dump({"max_seq_length": int(max_seq_length), "do_lower_case": False}, file, indent=2)
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(partial, directory)
