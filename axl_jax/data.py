"""Readers for the Mr.TyDi / Tevatron schema, from local JSON Lines (plain or gzip) or the HF hub.

A data *spec* is either a glob of local files (``data/train/{lang}*.jsonl.gz``) or
``hf:NAME:CONFIG:SPLIT`` (``hf:castorini/mr-tydi:arabic:train``, ``hf:Tevatron/msmarco-passage::train``):
Mr.TyDi's and MS MARCO's raw hub files (``axl_jax.hub``), other hub data sets through ``datasets``. ``{root}``, ``{lang}``, ``{lang_name}`` and ``{split}`` expand.

Every row is validated where it is read: a malformed line or a missing field raises ``DataError``
naming the file, the line and the field. Empty passages are skipped and counted. This module does not
tokenize or batch.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import gzip
import hashlib
import io
import json
import os
from typing import Iterator

from absl import logging

from axl_jax import hub

# Mr.TyDi's hub configs are language names, the data's files language codes.
LANGUAGE_NAMES = {
    "ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
    "ja": "japanese", "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu", "th": "thai",
}


class DataError(ValueError):
  """Bad input: the message names the file (or hub data set), the line (or row) and the field."""


@dataclasses.dataclass(frozen=True)
class Passage:
  docid: str
  title: str
  text: str


@dataclasses.dataclass(frozen=True)
class TrainExample:
  query_id: str
  query: str
  positives: tuple[Passage, ...]
  negatives: tuple[Passage, ...]
  language: str = ""              # ids are unique only within a language: key by (language, id)
  answers: tuple[str, ...] = ()   # short answers, when the rows carry them (TyDi QA-style "answers")

  @property
  def key(self) -> tuple[str, str]:
    return self.language, self.query_id


@dataclasses.dataclass(frozen=True)
class Query:
  query_id: str
  query: str
  positive_docids: tuple[str, ...]


def parse_languages(value: str, field: str = "data.languages") -> list[str]:
  """Comma-separated language codes, each checked against the 11 the project knows."""
  languages = [code.strip() for code in value.split(",") if code.strip()]
  for code in languages:
    if code not in LANGUAGE_NAMES:
      raise DataError(f"config field {field}: unknown language code {code!r}; "
                      f"expected some of {','.join(LANGUAGE_NAMES)}")
  return languages


def expand_spec(spec: str, root: str = "", language: str = "", split: str = "") -> str:
  return spec.format(root=root, lang=language, lang_name=LANGUAGE_NAMES.get(language, ""), split=split)


def passage_text(passage: Passage, title_separator: str) -> str:
  """Title + separator + text, as Tevatron formats passages."""
  if passage.title:
    return f"{passage.title}{title_separator}{passage.text}"
  return passage.text


def _open_text(path: str) -> io.TextIOBase:
  if path.endswith(".gz"):
    return gzip.open(path, "rt", encoding="utf-8")
  return open(path, encoding="utf-8")


def iter_rows(spec: str) -> Iterator[tuple[str, int, dict]]:
  """Yields ``(source, line_number, row)`` for every row of a local glob or an ``hf:`` data set."""
  if spec.startswith("hf:"):
    try:
      name, config_name, split = hub.parse(spec)
      path = hub.local_file(spec) if hub.raw_file(spec) else None  # Mr.TyDi, MS MARCO: their raw files.
    except (ValueError, hub.MissingFile) as error:
      raise DataError(str(error)) from None
    if path is not None:
      yield from iter_rows(path)
      return
    import datasets  # Imported here: reading local files should not pay for it.
    try:
      dataset = datasets.load_dataset(name, config_name or None, split=split)
    except Exception as error:  # The hub raises many types; all mean the same to a user.
      raise DataError(
          f"could not load hub data set {name!r} (config {config_name!r}, split {split!r}): {error}. "
          "Without network access, download it elsewhere and point the config at local JSON Lines.") from error
    source = f"hf:{name}:{config_name}:{split}"
    for index, row in enumerate(dataset):
      yield source, index + 1, row
    return
  paths = sorted(glob.glob(spec))
  if not paths:
    raise DataError(f"data spec {spec!r}: no file matches")
  for path in paths:
    with _open_text(path) as lines:
      for line_number, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as error:
          raise DataError(f"{path}:{line_number}: malformed JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
          raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
        yield path, line_number, row


def _field(row: dict, name: str, kind: type, where: str):
  if name not in row:
    raise DataError(f"{where}: field {name!r} is missing")
  value = row[name]
  if not isinstance(value, kind):
    raise DataError(f"{where}: field {name!r} should be {kind.__name__}, got {type(value).__name__}")
  return value


def _passage(row: dict, where: str) -> Passage:
  if not isinstance(row, dict):
    raise DataError(f"{where}: expected a passage object, got {type(row).__name__}")
  title = row.get("title") or ""
  if not isinstance(title, str):
    raise DataError(f"{where}: field 'title' should be str, got {type(title).__name__}")
  return Passage(str(_field(row, "docid", (str, int), where)), title.strip(), _field(row, "text", str, where).strip())


class SkipCounter:
  """Counts skipped rows by reason and logs one line per reason with the first place it happened."""

  def __init__(self, what: str):
    self.what = what
    self.counts = collections.Counter()
    self.first = {}

  def skip(self, reason: str, where: str):
    self.counts[reason] += 1
    self.first.setdefault(reason, where)

  def log(self):
    for reason, count in self.counts.items():
      logging.warning("%s: skipped %d rows with %s (first at %s)", self.what, count, reason, self.first[reason])


def parse_passage_row(row: dict, where: str) -> Passage:
  """A corpus row ``{docid, title, text}`` (``where`` is ``file:line`` for errors)."""
  return _passage(row, where)


def parse_train_row(row: dict, where: str, language: str, skipped: SkipCounter) -> TrainExample | None:
  """One training row, or None when it is skipped (and counted in ``skipped``): see ``read_train``."""
  query_id = str(_field(row, "query_id", (str, int), where))
  query = _field(row, "query", str, where).strip()
  if not query:
    skipped.skip("an empty 'query'", where)
    return None
  groups = []
  for name in ("positive_passages", "negative_passages"):
    items = row.get(name, []) if name == "negative_passages" else _field(row, name, list, where)
    if not isinstance(items, list):
      raise DataError(f"{where}: field {name!r} should be list, got {type(items).__name__}")
    kept = []
    for index, item in enumerate(items):
      passage = _passage(item, f"{where}: field '{name}[{index}]'")
      if passage.text:
        kept.append(passage)
      else:
        skipped.skip(f"an empty passage in '{name}' (the passage only)", where)
    groups.append(tuple(kept))
  if not groups[0]:
    skipped.skip("no non-empty 'positive_passages'", where)
    return None
  answers = row.get("answers") or []
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise DataError(f"{where}: field 'answers' should be a list of strings, got {answers!r:.80}")
  return TrainExample(query_id, query, groups[0], groups[1], language, tuple(answers))


def parse_query_row(row: dict, where: str) -> Query:
  """A dev/test row: ``query_id``, ``query`` and the docids of ``positive_passages``."""
  positives = _field(row, "positive_passages", list, where)
  docids = tuple(str(_field(item, "docid", (str, int), f"{where}: field 'positive_passages[{index}]'"))
                 for index, item in enumerate(positives))
  query = _field(row, "query", str, where).strip()
  if not query:
    raise DataError(f"{where}: field 'query' is empty")
  return Query(str(_field(row, "query_id", (str, int), where)), query, docids)


def read_corpus(spec: str) -> list[Passage]:
  """Corpus rows ``{docid, title, text}``; rows with an empty text are skipped and counted.

  Holds the whole corpus: for small corpora and tests. Stages read corpora through ``axl_jax.prepared``.
  """
  passages, seen = [], set()
  skipped = SkipCounter(f"corpus {spec}")
  for source, line, row in iter_rows(spec):
    where = f"{source}:{line}"
    passage = parse_passage_row(row, where)
    if passage.docid in seen:
      raise DataError(f"{where}: field 'docid': {passage.docid!r} appears twice in the corpus")
    seen.add(passage.docid)
    if not passage.text:
      skipped.skip("an empty 'text'", where)
      continue
    passages.append(passage)
  skipped.log()
  return passages


def read_train(spec: str, language: str = "") -> list[TrainExample]:
  """Training rows ``{query_id, query, positive_passages, negative_passages[, answers]}`` of one language.

  Empty passages are dropped and counted; a row left without a positive is skipped and counted.
  ``answers`` (a list of strings) is optional: Mr.TyDi rows have none, TyDi QA-derived rows may.
  """
  examples = []
  skipped = SkipCounter(f"training data {spec}")
  for source, line, row in iter_rows(spec):
    example = parse_train_row(row, f"{source}:{line}", language, skipped)
    if example is not None:
      examples.append(example)
  skipped.log()
  if not examples:
    raise DataError(f"training data {spec!r}: no usable rows")
  return examples


def read_queries(spec: str) -> list[Query]:
  """Dev/test rows: ``query_id``, ``query`` and the docids of ``positive_passages`` (texts may be empty)."""
  return [parse_query_row(row, f"{source}:{line}") for source, line, row in iter_rows(spec)]


def read_qrels(path: str) -> dict[str, dict[str, int]]:
  """TREC qrels ``qid iteration docid relevance`` (white-space separated)."""
  qrels: dict[str, dict[str, int]] = collections.defaultdict(dict)
  with _open_text(path) as lines:
    for line_number, line in enumerate(lines, start=1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 4:
        raise DataError(f"{path}:{line_number}: expected 4 fields 'qid iter docid relevance', got {len(fields)}")
      try:
        relevance = int(fields[3])
      except ValueError:
        raise DataError(f"{path}:{line_number}: field 'relevance' should be an integer, got {fields[3]!r}") from None
      qrels[fields[0]][fields[2]] = relevance
  return dict(qrels)


def qrels_from_queries(queries: list[Query]) -> dict[str, dict[str, int]]:
  return {query.query_id: {docid: 1 for docid in query.positive_docids} for query in queries}


def check_qrels(qrels: dict[str, dict[str, int]], docids: set[str], source: str, qrels_file: bool):
  """Every judged docid must be in the corpus: a missing one means the wrong corpus or a stale file.

  ``source`` is the qrels file (``qrels_file``) or the query rows the judgements came from; the error
  names its line.
  """
  for query_id, judged in qrels.items():
    for docid in judged:
      if docid not in docids:
        raise DataError(f"{_line_of(source, query_id, docid, qrels_file)}: field "
                        f"'{'docid' if qrels_file else 'positive_passages.docid'}': {docid!r} (query {query_id!r}) "
                        "is not in the corpus")


def _line_of(source: str, query_id: str, docid: str, qrels_file: bool) -> str:
  """``source:line`` of the judgement, found again only when there is an error to report."""
  if source.startswith("hf:"):
    return source
  for path in sorted(glob.glob(source)) or [source]:
    with _open_text(path) as lines:
      for line_number, line in enumerate(lines, start=1):
        if qrels_file:
          fields = line.split()
          if len(fields) == 4 and fields[0] == query_id and fields[2] == docid:
            return f"{path}:{line_number}"
        elif line.strip():
          row = json.loads(line)
          if str(row.get("query_id")) == query_id:
            return f"{path}:{line_number}"
  return source


def training_specs(config, stage_config) -> list[tuple[str, str]]:
  """``(language, file spec)`` of a supervised stage's training rows (``train_data`` per ``languages``).

  The adversarial rounds train on, and generate for, ``config.finetune``'s rows.
  """
  languages = parse_languages(stage_config.languages, "languages of the training rows") or [""]
  return [(language, expand_spec(stage_config.train_data, config.data.root, language, "train"))
          for language in languages]


_FULL_HASH_BYTES, _SAMPLE_BLOCKS = 64 << 20, 16


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  """sha256 of the whole file up to 64 MiB; above that, of its size and 16 evenly spaced 1-MiB blocks."""
  sha = hashlib.sha256()
  with open(path, "rb") as file:
    if size <= _FULL_HASH_BYTES:
      for block in iter(lambda: file.read(1 << 24), b""):
        sha.update(block)
    else:
      sha.update(str(size).encode())
      for index in range(_SAMPLE_BLOCKS):
        file.seek((size - (1 << 20)) * index // (_SAMPLE_BLOCKS - 1))
        sha.update(file.read(1 << 20))
  return sha.hexdigest()[:16]


def spec_identity(spec: str) -> list:
  """What a data spec currently points at, for fingerprints: hub names as they are, local files by content.

  File names are kept without their directories, so a moved data root (or a fresh clone) matches.
  """
  if spec.startswith("hf:"):
    return [spec]
  identity = []
  for path in sorted(glob.glob(spec)):
    stat = os.stat(path)
    identity.append([os.path.basename(path), stat.st_size, _file_digest(path, stat.st_size, stat.st_mtime_ns)])
  return identity
