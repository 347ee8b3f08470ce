"""Encode texts with a trained encoder (jitted, batched) and export embeddings as numpy shards.

A shard is ``<name>.<index>.npy`` (float32 ``[n, dim]``) beside ``<name>.<index>.ids.txt`` (one id per
line); ``manifest.json`` names the checkpoint, the model config and every shard. Shards are written
atomically and an interrupted export resumes at the first missing shard. Load with ``load_shards``
or plain ``numpy.load``.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from tqdm import tqdm

from axl_jax import checkpoints
from axl_jax.batching import bucket_length, pad
from axl_jax.encoder import BiEncoder
from axl_jax.tokenization import tokenize


@functools.lru_cache(maxsize=8)
def _encode_fn(model_config_json: str, tower: str):
  import ml_collections
  model = BiEncoder(ml_collections.ConfigDict(json.loads(model_config_json)))
  method = BiEncoder.encode_queries if tower == "query" else BiEncoder.encode_passages
  return jax.jit(lambda params, ids, lengths: model.apply({"params": params}, ids, lengths, method=method))


def encode_texts(params, model_config, tokenizer, texts: list[str], tower: str, max_length: int,
                 buckets: tuple[int, ...], batch_size: int, progress: tqdm | None = None) -> np.ndarray:
  """Float32 embeddings ``[len(texts), dim]`` of ``texts`` through the ``query`` or ``passage`` tower.

  Texts are sorted by length so each batch pads to a small bucket; every batch has the same row
  count (the last is padded with empty rows) so each bucket compiles once. ``progress`` (a tqdm bar)
  advances by one per text.
  """
  encode = _encode_fn(json.dumps(model_config.to_dict(), sort_keys=True), tower)
  num_devices = jax.device_count()
  batch_size = max(num_devices, batch_size - batch_size % num_devices)
  sharding = jax.sharding.NamedSharding(checkpoints.replicated_sharding().mesh, jax.sharding.PartitionSpec("batch"))
  tokens = tokenize(tokenizer, texts, max_length)
  order = np.argsort([len(t) for t in tokens], kind="stable")
  output = None
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    batch = [tokens[i] for i in rows]
    batch += [np.zeros((1,), np.int32)] * (batch_size - len(batch))
    ids, lengths = pad(batch, bucket_length(max(len(t) for t in batch), buckets))
    embeddings = np.asarray(encode(params, jax.device_put(ids, sharding), jax.device_put(lengths, sharding)))
    if output is None:
      output = np.zeros((len(texts), embeddings.shape[1]), np.float32)
    output[rows] = embeddings[:len(rows)]
    if progress is not None:
      progress.update(len(rows))
  return output if output is not None else np.zeros((0, 0), np.float32)


def _save_npy_atomic(path: str, array: np.ndarray):
  with open(path + ".partial", "wb") as file:
    np.save(file, array)
  os.replace(path + ".partial", path)


def _save_text_atomic(path: str, lines: list[str]):
  with open(path + ".partial", "w", encoding="utf-8") as file:
    file.write("".join(line + "\n" for line in lines))
  os.replace(path + ".partial", path)


def export_shards(directory: str, name: str, ids: list[str], embed_fn, shard_size: int, manifest: dict,
                  description: str = "") -> dict:
  """Writes ``embed_fn(ids[a:b], progress)`` shard by shard; returns (and writes) the manifest.

  Shards already on disk from an interrupted run of the same checkpoint are kept, not recomputed.
  """
  os.makedirs(directory, exist_ok=True)
  manifest_path = os.path.join(directory, f"{name}.manifest.json")
  progress_path = os.path.join(directory, f"{name}.progress.json")
  if os.path.exists(progress_path):
    with open(progress_path, encoding="utf-8") as file:
      if json.load(file).get("checkpoint") != manifest.get("checkpoint"):
        for stale in os.listdir(directory):  # Another checkpoint's shards: never mix them.
          if stale.startswith(name + "."):
            os.remove(os.path.join(directory, stale))
  checkpoints.write_json_atomic(progress_path, {"checkpoint": manifest.get("checkpoint")})
  shards = []
  progress = tqdm(total=len(ids), desc=description or name, unit="text", leave=False)
  for index, start in enumerate(range(0, max(len(ids), 1), shard_size)):
    shard_ids = ids[start:start + shard_size]
    stem = os.path.join(directory, f"{name}.{index:05d}")
    if not (os.path.exists(stem + ".npy") and os.path.exists(stem + ".ids.txt")):
      _save_npy_atomic(stem + ".npy", embed_fn(shard_ids, progress).astype(np.float32))
      _save_text_atomic(stem + ".ids.txt", shard_ids)
    else:
      progress.update(len(shard_ids))
    shards.append({"embeddings": os.path.basename(stem) + ".npy", "ids": os.path.basename(stem) + ".ids.txt",
                   "count": len(shard_ids)})
  progress.close()
  manifest = dict(manifest, name=name, count=len(ids), shards=shards)
  checkpoints.write_json_atomic(manifest_path, manifest)
  return manifest


def load_shards(directory: str, name: str):
  """Yields ``(ids, embeddings)`` for each shard listed in ``<name>.manifest.json``."""
  with open(os.path.join(directory, f"{name}.manifest.json"), encoding="utf-8") as file:
    manifest = json.load(file)
  for shard in manifest["shards"]:
    with open(os.path.join(directory, shard["ids"]), encoding="utf-8") as file:
      ids = [line.rstrip("\n") for line in file]
    yield ids, np.load(os.path.join(directory, shard["embeddings"]))
