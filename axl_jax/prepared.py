"""Prepared data: each corpus, training set and query set written once as a TFDS ArrayRecord dataset.

Stages never hold a corpus in memory. They read passages and training rows *by index* from datasets
that ``prepare`` wrote once from the source files (JSON Lines, plain or gzip, local or downloaded from the
hub): a ``tensorflow-datasets`` builder per kind (``axl_corpus``, ``axl_train``, ``axl_queries``) with one
config per language, in the ArrayRecord format, opened with ``builder_from_directory(...).as_data_source()``.

Layout under the store's root (``data.prepared_dir``; default ``<workdir>/prepared``)::

  <kind>-<language>-<key>/
    axl_<kind>/<language>/1.0.0/   the TFDS dataset (``*.array_record-*`` shards, ``dataset_info.json``)
    docids.npy                     corpus only: sorted 64-bit hashes of the docids ([n, 2]: hash, record index)
    manifest.json                  source spec and files, row counts, skipped rows, sha256 of every file written

``key`` hashes the source files' *content* identity (``data.spec_identity``) and ``FORMAT``, so changed
source files are prepared again instead of being read stale, and a moved data root still matches.
A dataset is written in a ``.partial-<pid>`` directory and renamed when complete: an interrupted prepare
leaves nothing that a reader would take for finished. Ids are per language; docid lookups go through the
hash table (``Corpus.index_of``), never through a dict of the corpus.

Bad rows fail the prepare with ``data.DataError`` naming the file, the line and the field.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io as io_
import json
import os
import shutil
import socket
import threading
from typing import Iterable, Iterator

import numpy as np
from absl import logging

from axl_jax import data, hub, io
from axl_jax.data import Passage, Query, TrainExample

# Bump when the features or the layout change: every prepared dataset is then prepared again.
FORMAT = 1
_VERSION = "1.0.0"


def _tfds():
  import tensorflow_datasets as tfds  # Imported on use: a run that only plans pays nothing for it.
  tfds.disable_progress_bar()
  return tfds


def docid_hash(docids: Iterable[str]) -> np.ndarray:
  """Stable 64-bit hashes (blake2b) of docids, as uint64."""
  return np.fromiter((int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8).digest(), "little")
                      for d in docids), dtype=np.uint64)


def _features(kind: str):
  tfds = _tfds()
  text = tfds.features.Text()
  passage = tfds.features.FeaturesDict({"docid": text, "title": text, "text": text})
  if kind == "corpus":
    return passage
  if kind == "train":
    return tfds.features.FeaturesDict({
        "query_id": text, "query": text, "positives": tfds.features.Sequence(passage),
        "negatives": tfds.features.Sequence(passage), "answers": tfds.features.Sequence(text)})
  if kind == "queries":
    return tfds.features.FeaturesDict({"query_id": text, "query": text,
                                       "positive_docids": tfds.features.Sequence(text)})
  raise ValueError(f"unknown prepared data kind {kind!r}")


def _builder(kind: str, language: str, data_dir: str, examples: Iterator | None = None):
  """The TFDS builder of one kind and language; ``examples`` yields ``(key, features)`` when preparing."""
  tfds = _tfds()

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(_VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in [*data.LANGUAGE_NAMES, "all"]]

    def _info(self):
      # Records keep the source order: record i is the i-th kept row, which the docid table relies on.
      return tfds.core.DatasetInfo(builder=self, features=_features(kind), disable_shuffling=True,
                                   description=f"axl-jax prepared {kind} ({language or 'all'})")

    def _split_generators(self, dl_manager):
      return {"train": examples}

    def _generate_examples(self):  # Unused: the split's generator is given above.
      raise NotImplementedError

  Builder.name = f"axl_{kind}"
  return Builder(data_dir=data_dir, config=language or "all", file_format="array_record")


def _passage_features(passage: Passage) -> dict:
  return {"docid": passage.docid, "title": passage.title, "text": passage.text}


def _decode(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _passages(group: dict) -> tuple[Passage, ...]:
  return tuple(Passage(_decode(d), _decode(t), _decode(x))
               for d, t, x in zip(group["docid"], group["title"], group["text"]))


class Dataset:
  """A prepared dataset opened for reading by index (safe to share between threads)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest = io.read_json(os.path.join(directory, "manifest.json"))
    self.kind, self.language = self.manifest["kind"], self.manifest["language"]
    builder_dir = os.path.join(directory, f"axl_{self.kind}", self.language or "all", _VERSION)
    self._source = _tfds().builder_from_directory(builder_dir).as_data_source(split="train")
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._source)

  def records(self, indices) -> list[dict]:
    indices = [int(i) for i in indices]
    if not indices:
      return []
    with self._lock:
      return self._source.__getitems__(indices)


class Corpus(Dataset):
  """A language's passages: ``passages(indices)``, ``chunks(size)`` and docid lookups."""

  @functools.cached_property
  def _table(self) -> np.ndarray:
    return np.load(os.path.join(self.directory, "docids.npy"), mmap_mode="r")

  def passages(self, indices) -> list[Passage]:
    return [Passage(_decode(r["docid"]), _decode(r["title"]), _decode(r["text"])) for r in self.records(indices)]

  def chunks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, list[Passage]]]:
    """``(first index, passages)`` of consecutive records ``start:stop``, ``size`` at a time."""
    stop = len(self) if stop is None else stop
    for begin in range(start, stop, size):
      yield begin, self.passages(range(begin, min(begin + size, stop)))

  def index_of(self, docids: list[str]) -> np.ndarray:
    """Record index of each docid, -1 where the corpus has none."""
    hashes = docid_hash(docids)
    keys = self._table[:, 0]
    if not len(keys):
      return np.full(len(docids), -1, np.int64)
    positions = np.minimum(np.searchsorted(keys, hashes), max(len(keys) - 1, 0))
    found = (keys[positions] == hashes) if len(keys) else np.zeros(len(hashes), bool)
    indices = np.where(found, self._table[positions, 1].astype(np.int64), -1)
    # A 64-bit hash match is checked against the record: an absent docid must never alias a present one.
    candidates = np.flatnonzero(indices >= 0)
    for slot, passage in zip(candidates, self.passages(indices[candidates])):
      if passage.docid != docids[slot]:
        indices[slot] = -1
    return indices


class Rows(Dataset):
  """A language's training rows as ``TrainExample``s, by index."""

  def examples(self, indices) -> list[TrainExample]:
    return [TrainExample(_decode(r["query_id"]), _decode(r["query"]), _passages(r["positives"]),
                         _passages(r["negatives"]), self.language, tuple(_decode(a) for a in r["answers"]))
            for r in self.records(indices)]


class ConcatRows:
  """Training rows of several languages as one index space (language by language, in the given order)."""

  def __init__(self, parts: list[Rows]):
    self.parts = parts
    self.offsets = np.cumsum([0] + [len(part) for part in parts])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def examples(self, indices) -> list[TrainExample]:
    indices = np.asarray(list(indices), np.int64)
    owners = np.searchsorted(self.offsets, indices, side="right") - 1
    result: list = [None] * len(indices)
    for owner in np.unique(owners):
      slots = np.flatnonzero(owners == owner)
      for slot, example in zip(slots, self.parts[owner].examples(indices[slots] - self.offsets[owner])):
        result[slot] = example
    return result



def example_chunks(rows, size: int = 4096) -> Iterator[list[TrainExample]]:
  """Consecutive training rows ``size`` at a time, from anything with ``len()`` and ``examples(indices)``."""
  for start in range(0, len(rows), size):
    yield rows.examples(range(start, min(start + size, len(rows))))


def read_query_set(dataset: Dataset) -> list[Query]:
  """All queries of a prepared query set (dev/test sets are small)."""
  return [Query(_decode(r["query_id"]), _decode(r["query"]), tuple(_decode(d) for d in r["positive_docids"]))
          for start in range(0, len(dataset), 4096)
          for r in dataset.records(range(start, min(start + 4096, len(dataset))))]


def dataset_key(kind: str, spec: str, language: str) -> str:
  identity = [FORMAT, kind, language, data.spec_identity(spec)]
  return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


class Store:
  """Prepared datasets under ``root``, prepared from their source spec on first use."""

  def __init__(self, root: str):
    if not root:
      raise ValueError("prepared data needs a directory (data.prepared_dir, or the run's workdir)")
    self.root = root

  def directory(self, kind: str, spec: str, language: str) -> str:
    return os.path.join(self.root, f"{kind}-{language or 'all'}-{dataset_key(kind, spec, language)}")

  def prepared(self, kind: str, spec: str, language: str) -> str:
    """The directory of the prepared dataset, preparing it when missing."""
    directory = self.directory(kind, spec, language)
    if not os.path.exists(os.path.join(directory, "manifest.json")):
      prepare(kind, spec, language, directory)
    return directory

  def corpus(self, spec: str, language: str) -> Corpus:
    return Corpus(self.prepared("corpus", spec, language))

  def rows(self, spec: str, language: str) -> Rows:
    return Rows(self.prepared("train", spec, language))

  def queries(self, spec: str, language: str) -> list[Query]:
    return read_query_set(Dataset(self.prepared("queries", spec, language)))


def store(config, workdir_root: str) -> Store:
  return Store(config.data.prepared_dir or os.path.join(workdir_root, "prepared"))


def training_rows(config, stage_config, store_: Store) -> ConcatRows:
  """The prepared training rows of a supervised stage (``train_data`` per ``languages``)."""
  return ConcatRows([store_.rows(spec, language) for language, spec in data.training_specs(config, stage_config)])


def corpus_spec(config, language: str) -> str:
  return data.expand_spec(config.data.corpus, config.data.root, language)


# --- Writing -----------------------------------------------------------------------------------------------


def _corpus_examples(spec: str, docid_log: "_DocidLog", skipped: data.SkipCounter):
  index = 0
  for source, line, row in data.iter_rows(spec):
    where = f"{source}:{line}"
    passage = data.parse_passage_row(row, where)
    if not passage.text:
      skipped.skip("an empty 'text'", where)
      docid_log.skipped.append(passage.docid)  # still a docid: it may not appear again
      continue
    docid_log.append(passage.docid)
    yield index, _passage_features(passage)
    index += 1


def _train_examples(spec: str, language: str, skipped: data.SkipCounter):
  index = 0
  for source, line, row in data.iter_rows(spec):
    example = data.parse_train_row(row, f"{source}:{line}", language, skipped)
    if example is None:
      continue
    yield index, {"query_id": example.query_id, "query": example.query,
                  "positives": [_passage_features(p) for p in example.positives],
                  "negatives": [_passage_features(p) for p in example.negatives], "answers": list(example.answers)}
    index += 1


def _query_examples(spec: str):
  for index, (source, line, row) in enumerate(data.iter_rows(spec)):
    query = data.parse_query_row(row, f"{source}:{line}")
    yield index, {"query_id": query.query_id, "query": query.query, "positive_docids": list(query.positive_docids)}


class _DocidLog:
  """Docid hashes of the kept corpus rows in record order (8 bytes a passage), hashed in blocks."""

  def __init__(self):
    self.hashes: list[np.ndarray] = []
    self.skipped: list[str] = []  # docids of rows skipped for an empty text
    self._pending: list[str] = []

  def append(self, docid: str):
    self._pending.append(docid)
    if len(self._pending) >= 65536:
      self.flush()

  def flush(self):
    if self._pending:
      self.hashes.append(docid_hash(self._pending))
      self._pending = []


def _docid_table(docid_log: _DocidLog, spec: str, corpus: Corpus) -> np.ndarray:
  """``[n, 2]`` uint64 (hash, record index) sorted by hash; a docid read twice is a ``DataError``."""
  docid_log.flush()
  hashes = np.concatenate(docid_log.hashes) if docid_log.hashes else np.zeros(0, np.uint64)
  order = np.argsort(hashes, kind="stable")
  table = np.stack([hashes[order], order.astype(np.uint64)], axis=1)
  repeats = np.flatnonzero(table[1:, 0] == table[:-1, 0])
  for repeat in repeats:
    first, second = corpus.passages([int(table[repeat, 1]), int(table[repeat + 1, 1])])
    if first.docid == second.docid:
      where = _where_of(spec, second.docid, occurrence=2)
      raise data.DataError(f"{where}: field 'docid': {second.docid!r} appears twice in the corpus")
  seen_skipped = set()
  kept = np.isin(docid_hash(docid_log.skipped), table[:, 0]) if docid_log.skipped else []
  for docid, also_kept in zip(docid_log.skipped, kept):
    if also_kept or docid in seen_skipped:
      raise data.DataError(f"{_where_of(spec, docid, occurrence=2)}: field 'docid': {docid!r} appears twice in the corpus")
    seen_skipped.add(docid)
  if len(repeats):  # Distinct docids with one 64-bit hash: never seen in practice, but never silently wrong.
    raise data.DataError(f"corpus {spec!r}: docids {len(repeats)} hash collisions; report this as a bug")
  return table


def _where_of(spec: str, docid: str, occurrence: int) -> str:
  """``file:line`` of the ``occurrence``-th row with ``docid`` (found again only to report an error)."""
  seen = 0
  for source, line, row in data.iter_rows(spec):
    if str(row.get("docid")) == docid:
      seen += 1
      if seen == occurrence:
        return f"{source}:{line}"
  return spec


def _file_checksums(directory: str) -> dict[str, dict]:
  checksums = {}
  for path in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      sha = hashlib.sha256()
      with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
          sha.update(block)
      checksums[os.path.relpath(path, directory)] = {"bytes": os.path.getsize(path), "sha256": sha.hexdigest()}
  return checksums


def prepare(kind: str, spec: str, language: str, directory: str) -> dict:
  """Writes the prepared dataset of ``spec`` to ``directory`` (atomically) and returns its manifest."""
  partial = f"{directory}.partial-{socket.gethostname()}-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  skipped = data.SkipCounter(f"{kind} {spec}")
  docid_log = _DocidLog()
  if kind == "corpus":
    examples = _corpus_examples(spec, docid_log, skipped)
  elif kind == "train":
    examples = _train_examples(spec, language, skipped)
  else:
    examples = _query_examples(spec)
  logging.info("preparing %s %s from %s", kind, language or "all", spec)
  try:
    with contextlib.redirect_stdout(io_.StringIO()):  # TFDS prints a banner per dataset; the log says enough.
      try:
        _builder(kind, language, partial, examples).download_and_prepare()
      except AssertionError as error:  # TFDS's word for a split without a single example.
        if "No examples were yielded" not in str(error):
          raise
        reasons = ", ".join(f"{count} with {reason}" for reason, count in skipped.counts.items()) or "no rows"
        raise data.DataError(f"{kind} {spec!r}: no usable rows ({reasons})") from None
    builder_dir = os.path.join(partial, f"axl_{kind}", language or "all", _VERSION)
    count = len(_tfds().builder_from_directory(builder_dir).as_data_source(split="train"))
    manifest = {"kind": kind, "language": language, "format": FORMAT, "spec": spec,
                "source": data.spec_identity(spec), "count": count, "skipped": dict(skipped.counts)}
    if kind == "corpus":
      io.write_json(os.path.join(partial, "manifest.json"), manifest)  # Corpus() reads it for the check.
      np.save(os.path.join(partial, "docids.npy"), _docid_table(docid_log, spec, Corpus(partial)))
    manifest["files"] = _file_checksums(partial)
    io.write_json(os.path.join(partial, "manifest.json"), manifest)
    skipped.log()
    if os.path.exists(os.path.join(directory, "manifest.json")):
      return io.read_json(os.path.join(directory, "manifest.json"))  # Another process finished it first.
    shutil.rmtree(directory, ignore_errors=True)  # A leftover without a manifest (never a finished one).
    try:
      os.replace(partial, directory)
    except OSError:  # Another process renamed its copy in between: as good as ours.
      if not os.path.exists(os.path.join(directory, "manifest.json")):
        raise
    return manifest
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def datasets_of(config, names: list[str]) -> list[tuple[str, str, str]]:
  """``(kind, spec, language)`` of every data set the stages ``names`` of ``config`` read, each once."""
  languages = data.parse_languages(config.data.languages)
  wanted = [("corpus", corpus_spec(config, language), language) for language in languages]
  if "ict" in names and config.ict.corpus:
    wanted += [("corpus", data.expand_spec(config.ict.corpus, config.data.root, language), language)
               for language in languages]
  rounds = any(name.startswith("round_") for name in names)
  for section in ("pretrain", "finetune"):
    if section in names or (section == "finetune" and (rounds or "visualize" in names)):
      wanted += [("train", spec, language) for language, spec in data.training_specs(config, config[section])]
  splits = set()
  if "evaluate" in names:
    splits.add(config.evaluate.split)
  if rounds:
    splits.add("dev")
  if "export" in names:
    splits.update(s.strip() for s in config.export.splits.split(",") if s.strip())
  wanted += [("queries", data.expand_spec(config.data.queries, config.data.root, language, split), language)
             for split in sorted(splits) for language in languages]
  return list(dict.fromkeys(wanted))


def missing_hub_files(wanted: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
  """``(spec, where it belongs)`` of the hub files that are not on this machine (checked without fetching)."""
  missing = []
  download, hub.settings.download = hub.settings.download, False
  try:
    for _, spec, _ in wanted:
      if spec.startswith("hf:") and hub.raw_file(spec):
        try:
          hub.local_file(spec)
        except hub.MissingFile:
          missing.append((spec, hub.destination(*hub.raw_file(spec))))
  finally:
    hub.settings.download = download
  return missing


def prepare_all(config, workdir: str, names: list[str]) -> list[dict]:
  """Prepares (or finds prepared) every data set the stages ``names`` read; returns their manifests."""
  hub.configure(config)
  wanted = datasets_of(config, names)
  if not config.data.download:
    missing = missing_hub_files(wanted)
    if missing:
      lines = "\n".join(f"  {spec}  ->  {path}" for spec, path in missing)
      raise data.DataError(f"{len(missing)} hub files are not on this machine and data.download is off; "
                           f"fetch them and put them at:\n{lines}")
  store_ = store(config, workdir)
  manifests = []
  for kind, spec, language in wanted:
    directory = store_.prepared(kind, spec, language)
    manifest = io.read_json(os.path.join(directory, "manifest.json"))
    manifest["directory"] = directory
    manifests.append(manifest)
  io.write_json(os.path.join(store_.root, "prepared.json"), manifests)
  return manifests
