"""Encode texts with a trained encoder (jitted, batched) and keep embeddings as numpy shards.

A shard is ``<name>.<index>.npy`` (``[n, dim]``; corpus float16 by default, queries float32) beside ``<name>.<index>.ids.txt`` (one id per
line); ``<name>.manifest.json`` names the checkpoint, its content digest, the model config and every
shard. Shards are written atomically and an interrupted export resumes at the first missing shard.
Load with ``load_shards`` or plain ``numpy.load``.

Shards are keyed by what decides them: the checkpoint's *content* (``checkpoints.digest``), the
tokenizer, the lengths, the data files and the shard size. ``language_embeddings`` keeps one set per
key under ``<workdir>/embeddings/``, so evaluation, the rounds' dev evaluation and export encode a
corpus once per checkpoint, and a stage retrained in place (same path, new parameters) is re-encoded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import numpy as np
from tqdm import tqdm

from axl_jax import checkpoints, data, distributed, io, prepared, tokenization
from axl_jax.batching import bucket_length, pad, passage_buckets, query_buckets
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
  """Float32 embeddings ``[len(texts), dim]`` of ``texts`` through the ``query`` or ``passage`` tower
  (``encode_tokens`` of their token ids). ``progress`` (a tqdm bar) advances by one per text."""
  return encode_tokens(params, model_config, tokenize(tokenizer, texts, max_length), tower, buckets, batch_size,
                       progress)


def encode_tokens(params, model_config, tokens: list[np.ndarray], tower: str, buckets: tuple[int, ...],
                  batch_size: int, progress: tqdm | None = None) -> np.ndarray:
  """Float32 embeddings of token id sequences. Sorted by length so each batch pads to a small bucket; every
  batch has the same row count (the last is padded with empty rows) so each bucket compiles once; the next
  batch is dispatched before the last one's embeddings are fetched, so the devices never wait for the host."""
  encode = _encode_fn(json.dumps(model_config.to_dict(), sort_keys=True), tower)
  # This process's devices only: in a multi-process run every process encodes texts of its own.
  num_devices = jax.local_device_count()
  batch_size = max(num_devices, batch_size - batch_size % num_devices)
  sharding = jax.sharding.NamedSharding(local_mesh(), jax.sharding.PartitionSpec("batch"))
  order = np.argsort([len(t) for t in tokens], kind="stable")
  output, pending = None, None

  def collect(rows, embeddings):
    nonlocal output
    embeddings = np.asarray(embeddings)  # waits for that batch only
    if output is None:
      output = np.zeros((len(tokens), embeddings.shape[1]), np.float32)
    output[rows] = embeddings[:len(rows)]
    if progress is not None:
      progress.update(len(rows))

  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    batch = [tokens[i] for i in rows]
    batch += [np.zeros((1,), np.int32)] * (batch_size - len(batch))
    ids, lengths = pad(batch, bucket_length(max(len(t) for t in batch), buckets))
    dispatched = (rows, encode(params, jax.device_put(ids, sharding), jax.device_put(lengths, sharding)))
    if pending is not None:
      collect(*pending)
    pending = dispatched
  if pending is not None:
    collect(*pending)
  return output if output is not None else np.zeros((0, 0), np.float32)


def local_mesh() -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))


def to_local_devices(params):
  """Parameters replicated over the global mesh, replicated over this process's devices instead."""
  if jax.process_count() == 1:
    return params
  sharding = jax.sharding.NamedSharding(local_mesh(), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda leaf: jax.device_put(np.asarray(leaf.addressable_data(0)), sharding), params)


class Encoder:
  """A checkpoint's query and passage towers, restored once, with the run's tokenizer and lengths."""

  def __init__(self, checkpoint: str, config, tokenizer):
    self.checkpoint, self.config, self.tokenizer = checkpoint, config, tokenizer
    params, self.model_config = checkpoints.restore_params(checkpoint, config.model)
    self.params = to_local_devices(params)
    self.digest = checkpoints.digest(checkpoint)

  def encode(self, texts: list[str], tower: str, batch_size: int | None = None, progress=None) -> np.ndarray:
    data_config = self.config.data
    if tower == "query":
      max_length, buckets = data_config.query_max_length, query_buckets(self.config)
    else:
      max_length, buckets = data_config.passage_max_length, passage_buckets(self.config)
    return encode_texts(self.params, self.model_config, self.tokenizer, texts, tower, max_length, buckets,
                        batch_size or self.config.evaluate.encode_batch_size, progress)

  @functools.cached_property
  def key(self) -> str:
    """Names this encoder's embeddings: checkpoint content, tokenizer and every setting of the encoding
    (computed once: fingerprinting a 250K-piece tokenizer takes about a second)."""
    data_config = self.config.data
    settings = [self.digest, self.model_config.to_dict(), tokenization.fingerprint(self.tokenizer),
                data_config.query_max_length,
                data_config.passage_max_length, query_buckets(self.config), passage_buckets(self.config),
                data_config.title_separator]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]


def export_shards(directory: str, name: str, count: int, read, encode, shard_size: int, manifest: dict,
                  description: str = "", dtype: str = "float32", chunk_size: int = 65536) -> dict:
  """Writes the embeddings of items ``0..count-1`` shard by shard; returns (and writes) the manifest.

  ``read(start, stop)`` gives ``(ids, texts)`` of those items and ``encode(texts, progress)`` their vectors:
  a shard is read and encoded ``chunk_size`` items at a time into a memory-mapped ``dtype`` file, so memory
  holds one chunk. ``manifest["key"]`` says what the shards are made from; shards on disk from an
  interrupted run with the same key are kept (the run resumes at the first missing shard), others removed.
  """
  os.makedirs(directory, exist_ok=True)
  key = [manifest["key"], shard_size, count]
  progress_path = os.path.join(directory, f"{name}.progress.json")
  finished = _finished(directory, name, manifest["key"], shard_size)
  if finished is not None and finished["count"] == count:
    return finished
  process, processes = jax.process_index(), jax.process_count()
  if process == 0:
    if os.path.exists(progress_path) and io.read_json(progress_path).get("key") != key:
      for stale in os.listdir(directory):  # Another checkpoint's or another setting's shards: never mix them.
        if stale.startswith(name + "."):
          os.remove(os.path.join(directory, stale))
    io.write_json(progress_path, {"key": key})
  distributed.barrier(f"{directory}/{name} cleared")
  shards = []
  progress = tqdm(total=count, desc=description or name, unit="text", leave=False)
  for index, start in enumerate(range(0, max(count, 1), shard_size)):
    stop = min(start + shard_size, count)
    stem = os.path.join(directory, f"{name}.{index:05d}")
    # Shards are dealt out to the processes in turn; each writes its own, and resumes them on its own.
    if index % processes == process and not (os.path.exists(stem + ".npy") and os.path.exists(stem + ".ids.txt")):
      _write_shard(stem, start, stop, read, encode, np.dtype(dtype), chunk_size, progress)
    else:
      progress.update(stop - start)
    shards.append({"embeddings": os.path.basename(stem) + ".npy", "ids": os.path.basename(stem) + ".ids.txt",
                   "count": stop - start})
  progress.close()
  manifest = dict(manifest, name=name, count=count, dtype=dtype, shards=shards)
  distributed.barrier(f"{directory}/{name} encoded")  # every process's shards are on disk
  if process == 0:
    io.write_json(shards_manifest_path(directory, name), manifest)
  distributed.barrier(f"{directory}/{name} listed")
  return manifest



def _write_shard(stem: str, start: int, stop: int, read, encode, dtype: np.dtype, chunk_size: int, progress):
  """Items ``start:stop`` into ``<stem>.npy`` (written in place under a temporary name, then renamed)."""
  partial = f"{stem}.npy.partial-{os.getpid()}"
  ids, array = [], None
  for begin in range(start, stop, chunk_size):
    chunk_ids, texts = read(begin, min(begin + chunk_size, stop))
    vectors = encode(texts, progress)
    if array is None:
      array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(stop - start, vectors.shape[1]))
    array[begin - start:begin - start + len(vectors)] = vectors
    ids += chunk_ids
  if array is None:  # An empty set still gets its (empty) shard, so readers need no special case.
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(0, 0))
  array.flush()
  del array
  with open(partial, "rb+") as file:
    os.fsync(file.fileno())
  os.replace(partial, stem + ".npy")
  io.write_lines(stem + ".ids.txt", ids)


def export_language(encoder: Encoder, directory: str, language: str, splits: list[str], shard_size: int,
                    store: prepared.Store) -> dict:
  """Corpus and query embedding shards of one language in ``directory``; returns ``{name: manifest}``.

  The prepared corpus (from ``store``) is read by index, a chunk at a time; corpus vectors are stored as ``evaluate.embedding_dtype``, query vectors as float32.
  """
  config = encoder.config
  corpus_spec = data.expand_spec(config.data.corpus, config.data.root, language)
  header = {"checkpoint": encoder.checkpoint, "checkpoint_digest": encoder.digest, "language": language,
            "model": encoder.model_config.to_dict()}
  dtype = config.evaluate.embedding_dtype
  separator = config.data.title_separator
  corpus = store.corpus(corpus_spec, language)

  def read(start, stop):
    passages = corpus.passages(range(start, stop))
    return [p.docid for p in passages], [data.passage_text(p, separator) for p in passages]

  manifests = {"corpus": export_shards(
      directory, "corpus", len(corpus), read, lambda texts, progress: encoder.encode(texts, "passage",
                                                                                    progress=progress),
      shard_size, dict(header, tower="passage", key=_key(encoder.key, data.spec_identity(corpus_spec), dtype)),
      f"{language} corpus", dtype)}
  for split in splits:
    queries_spec = data.expand_spec(config.data.queries, config.data.root, language, split)
    queries = store.queries(queries_spec, language)
    manifests[f"queries-{split}"] = export_shards(
        directory, f"queries-{split}", len(queries),
        lambda start, stop: ([q.query_id for q in queries[start:stop]], [q.query for q in queries[start:stop]]),
        lambda texts, progress: encoder.encode(texts, "query", progress=progress), shard_size,
        dict(header, tower="query", split=split, key=_key(encoder.key, data.spec_identity(queries_spec))),
        f"{language} {split} queries")
  return manifests


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _finished(directory: str, name: str, key: str, shard_size: int) -> dict | None:
  """The manifest of shards finished with ``key`` and ``shard_size``, else None."""
  progress_path = os.path.join(directory, f"{name}.progress.json")
  manifest_path = shards_manifest_path(directory, name)
  if not (os.path.exists(progress_path) and os.path.exists(manifest_path)):
    return None
  manifest = io.read_json(manifest_path)
  if manifest.get("key") != key or io.read_json(progress_path).get("key", [None, None])[:2] != [key, shard_size]:
    return None
  return manifest


def language_embeddings(workdir: str, encoder: Encoder, language: str, splits: list[str]) -> str:
  """The directory of ``encoder``'s corpus and query shards for ``language``, encoding what is missing."""
  config = encoder.config
  directory = os.path.join(workdir, "embeddings", encoder.key, language)
  export_language(encoder, directory, language, splits, config.evaluate.shard_size, prepared.store(config, workdir))
  return directory


def shards_manifest_path(directory: str, name: str) -> str:
  return os.path.join(directory, f"{name}.manifest.json")


def read_shards_manifest(directory: str, name: str) -> dict:
  """What ``export_shards`` wrote: checkpoint, its digest, key, count and the shards' file names."""
  return io.read_json(shards_manifest_path(directory, name))


def read_rows(directory: str, name: str, rows, with_ids: bool = True) -> tuple[list | None, np.ndarray]:
  """``(ids, float32 vectors)`` of items ``rows`` (indices into the whole set, in any order), read from
  memory-mapped shards: only the shards holding them are touched, and of those only the rows asked for.
  ``with_ids=False`` skips reading the shards' id lists (whole files) and gives ``None`` for the ids."""
  manifest = read_shards_manifest(directory, name)
  rows = np.asarray(rows, np.int64)
  starts = np.cumsum([0] + [shard["count"] for shard in manifest["shards"]])
  if len(rows) and (rows.min() < 0 or rows.max() >= starts[-1]):
    raise IndexError(f"{directory}/{name}: rows must be in [0, {starts[-1]}), got {rows.min()}..{rows.max()}")
  owner = np.searchsorted(starts, rows, side="right") - 1
  ids: list | None = [None] * len(rows) if with_ids else None
  vectors = None
  for index in np.unique(owner):
    shard = manifest["shards"][index]
    slots = np.flatnonzero(owner == index)
    array = np.load(os.path.join(directory, shard["embeddings"]), mmap_mode="r")
    if vectors is None:
      vectors = np.zeros((len(rows), array.shape[1]), np.float32)
    vectors[slots] = array[rows[slots] - starts[index]]
    if ids is not None:
      shard_ids = io.read_lines(os.path.join(directory, shard["ids"]))
      for slot in slots:
        ids[slot] = shard_ids[rows[slot] - starts[index]]
  return ids, vectors if vectors is not None else np.zeros((0, 0), np.float32)


def load_shards(directory: str, name: str, with_embeddings: bool = True, shards: slice = slice(None)):
  """Yields ``(ids, embeddings)`` for each shard listed in ``<name>.manifest.json`` (those of ``shards``)."""
  manifest = read_shards_manifest(directory, name)
  for shard in manifest["shards"][shards]:
    ids = io.read_lines(os.path.join(directory, shard["ids"]))
    yield ids, np.load(os.path.join(directory, shard["embeddings"])) if with_embeddings else None
