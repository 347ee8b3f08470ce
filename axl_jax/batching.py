"""Deterministic, static-shape contrastive batches.

Which examples a step sees is a pure function of ``(seed, step)``: example ``k`` of the run is the
``k mod N``-th entry of epoch ``k // N``'s permutation, so a resumed run sees exactly the batches an
uninterrupted run would. Hard negatives rotate across epochs. Every host computes the same global batch
plan (O(batch) arithmetic) and reads and tokenizes only the rows of its own devices (``process_index``).

Padding goes on the right up to the smallest length bucket that fits the longest sequence of the
*global* batch: every host and device must agree on shapes, so the hosts exchange their longest lengths
(``distributed.global_max``, off the devices). The examples never depend on buckets.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from axl_jax import distributed, ict
from axl_jax.data import Passage, TrainExample, passage_text
from axl_jax.tokenization import tokenize

# Which examples a step sees, as a version: checkpoints record it, and a resume across a change is refused.
BATCH_ORDER = 2
# Salts keep the random streams of different uses apart for the same (seed, epoch).
_ORDER_SALT, _NEGATIVE_SALT, _ICT_SALT, _ICT_PROBE_SALT, _FILL_SALT = 1, 2, 3, 4, 5
_FEISTEL_ROUNDS = 6
_U64 = np.uint64


def _mix(values: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a cheap 64-bit hash, element-wise (uint64 arithmetic wraps)."""
  values = (values ^ (values >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  values = (values ^ (values >> _U64(27))) * _U64(0x94D049BB133111EB)
  return values ^ (values >> _U64(31))


def permute(key: list[int], positions, size: int) -> np.ndarray:
  """Where ``positions`` land in a permutation of ``range(size)`` keyed by ``key`` (e.g. seed, salt, epoch).

  A balanced Feistel network over the smallest even-bit domain that holds ``size``, with cycle walking
  back into ``range(size)``: a bijection computed per index, so a step costs O(batch), never O(size).
  """
  positions = np.asarray(positions, np.int64)
  if size <= 0 or (positions.size and (positions.min() < 0 or positions.max() >= size)):
    raise ValueError(f"positions must lie in range({size})")
  bits = max(2, int(size - 1).bit_length())
  half = (bits + 1) // 2
  mask = _U64((1 << half) - 1)
  keys = np.random.default_rng(key).integers(0, 1 << 63, size=_FEISTEL_ROUNDS, dtype=np.uint64)
  values = positions.astype(np.uint64)
  result = np.empty_like(values)
  pending = np.arange(len(values))
  with np.errstate(over="ignore"):
    while pending.size:  # Cycle walking: at most a few passes, since the domain is under 4 * size.
      left, right = values[pending] >> _U64(half), values[pending] & mask
      for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
      values[pending] = (left << _U64(half)) | right
      inside = values[pending] < _U64(size)
      result[pending[inside]] = values[pending[inside]]
      pending = pending[~inside]
  return result.astype(np.int64)


def example_positions(seed: int, step: int, batch_size: int, num_examples: int) -> list[tuple[int, int]]:
  """``(epoch, example_index)`` of each of the global batch's rows at ``step`` (O(batch_size) work)."""
  ranks = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(ranks, num_examples)
  indices = np.empty_like(ranks)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    indices[rows] = permute([seed, _ORDER_SALT, int(epoch)], offsets[rows], num_examples)
  return [(int(e), int(i)) for e, i in zip(epochs, indices)]


def bucket_length(longest: int, buckets: tuple[int, ...]) -> int:
  for bucket in sorted(buckets):
    if longest <= bucket:
      return bucket
  return max(buckets)


def pad(sequences: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ``[N, length]`` int32 ids (pad id 0 is never attended to) and their lengths."""
  ids = np.zeros((len(sequences), length), np.int32)
  lengths = np.zeros((len(sequences),), np.int32)
  for row, sequence in enumerate(sequences):
    sequence = sequence[:length]
    ids[row, :len(sequence)] = sequence
    lengths[row] = len(sequence)
  return ids, lengths


@dataclasses.dataclass
class BatchShape:
  batch_size: int                   # global queries per step
  group_size: int                   # passages per query
  query_buckets: tuple[int, ...]
  passage_buckets: tuple[int, ...]
  process_index: int = 0
  process_count: int = 1
  name: str = "batches"             # keys the hosts' length exchange: one name per stage of a run
  # The largest of every host's value for a key: ``distributed.global_max`` (tests pass their own).
  global_max: Callable[[str, list[int]], list[int]] = distributed.global_max

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {self.batch_size} must divide evenly over {self.process_count} hosts")

  def host_rows(self) -> slice:
    per_host = self.batch_size // self.process_count
    return slice(self.process_index * per_host, (self.process_index + 1) * per_host)

  def assemble(self, step: int, queries: list[np.ndarray], passages: list[np.ndarray]) -> dict[str, np.ndarray]:
    """This host's rows (``host_rows`` of the global batch), padded to the buckets that fit the whole
    global batch at ``step``."""
    longest = [max(len(q) for q in queries), max(len(p) for p in passages)]
    if self.process_count > 1:
      longest = self.global_max(f"{self.name}/{step}", longest)
      # Hosts stay within a few steps of each other (every step is a collective), so this is long read.
      distributed.forget(f"{self.name}/{step - 1024}")
    query_length = bucket_length(longest[0], self.query_buckets)
    passage_length = bucket_length(longest[1], self.passage_buckets)
    query_ids, query_lengths = pad(queries, query_length)
    passage_ids, passage_lengths = pad(passages, passage_length)
    return {"query_ids": query_ids, "query_lengths": query_lengths,
            "passage_ids": passage_ids, "passage_lengths": passage_lengths}


def query_buckets(config) -> tuple[int, ...]:
  """Query lengths a batch may be padded to: a quarter, half and all of ``data.query_max_length``."""
  longest = config.data.query_max_length
  return tuple(sorted({max(8, longest // 4), max(8, longest // 2), longest}))


def passage_buckets(config) -> tuple[int, ...]:
  """``data.passage_length_buckets`` below ``data.passage_max_length``, and the maximum itself."""
  buckets = [int(b) for b in config.data.passage_length_buckets.split(",") if b.strip()]
  return tuple(sorted({b for b in buckets if b < config.data.passage_max_length}
                      | {config.data.passage_max_length}))


def batch_shape(config, stage_config, process_index: int = 0, process_count: int = 1,
                name: str = "batches") -> BatchShape:
  return BatchShape(stage_config.batch_size, stage_config.group_size, query_buckets(config),
                    passage_buckets(config), process_index, process_count, name)


def _rotate(items: list, epoch: int, count: int) -> list:
  """``count`` items starting at an epoch-dependent offset, so every item gets its turn."""
  if not items or count <= 0:
    return []
  start = (epoch * count) % len(items)
  return [items[(start + i) % len(items)] for i in range(min(count, len(items)))]


class SupervisedBatches:
  """Groups of 1 positive + (group_size - 1) hard negatives per query, read from training rows by index.

  ``rows`` has ``len()`` and ``examples(indices)`` (``prepared.ConcatRows``, or ``data.ExampleList`` for rows
  in memory): a step reads and tokenizes only its own batch. Passages are keyed by ``(language, docid)``:
  Mr.TyDi reuses ids such as ``"25267#12"`` in every language. With ``adversarial`` negatives
  (``(language, query_id)`` -> passages), each group takes up to ``adversarial_per_group`` of them first, then
  up to ``mined_per_group`` of the ``mined`` ones (the model's own top-ranked non-positives), and fills the
  rest with the row's own (BM25) negatives; a row short of negatives borrows other rows' positives.
  """

  def __init__(self, rows, tokenizer, shape: BatchShape, seed: int, query_max_length: int,
               passage_max_length: int, title_separator: str,
               adversarial: dict[tuple[str, str], tuple[Passage, ...]] | None = None,
               adversarial_per_group: int = 0,
               mined: dict[tuple[str, str], tuple[Passage, ...]] | None = None, mined_per_group: int = 0):
    self.rows = rows if hasattr(rows, "examples") else ExampleList(rows)
    if not len(self.rows):
      raise ValueError("no training rows")
    self.tokenizer, self.shape, self.seed = tokenizer, shape, seed
    self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
    self.title_separator = title_separator
    self.adversarial, self.adversarial_per_group = adversarial or {}, adversarial_per_group
    self.mined, self.mined_per_group = mined or {}, mined_per_group

  def group(self, epoch: int, index: int, example: TrainExample | None = None) -> list[Passage]:
    """The passages of one query's group: its positive first, then rotating hard negatives."""
    example = example or self.rows.examples([index])[0]
    positive = example.positives[epoch % len(example.positives)]
    wanted = self.shape.group_size - 1
    chosen = _rotate(list(self.adversarial.get(example.key, ())), epoch, min(self.adversarial_per_group, wanted))
    chosen += _rotate(list(self.mined.get(example.key, ())), epoch, min(self.mined_per_group, wanted - len(chosen)))
    # A mined passage may also be one of the row's BM25 negatives: not twice in one group.
    taken = {p.docid for p in chosen}
    chosen += _rotate([p for p in example.negatives if p.docid not in taken], epoch, wanted - len(chosen))
    positives = {p.docid for p in example.positives}
    rng = np.random.default_rng([self.seed, _FILL_SALT, epoch, index])
    attempts = 0
    while len(chosen) < wanted:  # Too few hard negatives: another row's positive (rarely, this row's own).
      other = self.rows.examples([int(rng.integers(len(self.rows)))])[0]
      candidate = other.positives[0]
      attempts += 1
      if other.language != example.language or candidate.docid not in positives or attempts > 16:
        chosen.append(candidate)
    return [positive] + chosen

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of the global batch at ``step``."""
    positions = example_positions(self.seed, step, self.shape.batch_size, len(self.rows))[self.shape.host_rows()]
    examples = self.rows.examples([index for _, index in positions])
    groups = [self.group(epoch, index, example) for (epoch, index), example in zip(positions, examples)]
    queries = tokenize(self.tokenizer, [e.query for e in examples], self.query_max_length)
    passages = tokenize(self.tokenizer, [passage_text(p, self.title_separator) for g in groups for p in g],
                        self.passage_max_length)
    return self.shape.assemble(step, queries, passages)


class ExampleList(list):
  """Training rows held in memory, with the ``examples(indices)`` of prepared rows (tests, small data)."""

  def examples(self, indices) -> list[TrainExample]:
    return [self[int(i)] for i in indices]


class PassageList(list):
  """Passages held in memory, with the ``passages(indices)`` of a prepared corpus (tests, small data)."""

  def passages(self, indices) -> list[Passage]:
    return [self[int(i)] for i in indices]


class ICTBatches:
  """ICT pseudo pairs made lazily from corpus passages read by index; in-batch negatives only (group_size 1).

  ``corpora`` is ``[(language, corpus)]`` with ``len(corpus)`` and ``corpus.passages(indices)`` (a prepared
  ``Corpus`` or a ``PassageList``), taken as one index space. A passage of fewer than two sentences gives no
  pair: the row probes a deterministic sequence of other passages (``_MAX_PROBES`` at most) instead.
  """

  _MAX_PROBES = 64

  def __init__(self, corpora: list[tuple[str, object]], tokenizer, shape: BatchShape, seed: int,
               query_max_length: int, passage_max_length: int, title_separator: str,
               remove_prob: float, min_sentence_chars: int):
    if shape.group_size != 1:
      raise ValueError(f"ict.group_size must be 1 (ICT uses in-batch negatives only), got {shape.group_size}")
    self.corpora = [(language, corpus) for language, corpus in corpora if len(corpus)]
    self.offsets = np.cumsum([0] + [len(corpus) for _, corpus in self.corpora])
    if not self.offsets[-1]:
      raise ValueError("ICT: the corpus is empty")
    self.tokenizer, self.shape, self.seed = tokenizer, shape, seed
    self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
    self.title_separator, self.remove_prob, self.min_chars = title_separator, remove_prob, min_sentence_chars

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def _read(self, indices: np.ndarray) -> list[tuple[str, Passage]]:
    """``(language, passage)`` of global indices, one read per language."""
    owners = np.searchsorted(self.offsets, indices, side="right") - 1
    result: list = [None] * len(indices)
    for owner in np.unique(owners):
      slots = np.flatnonzero(owners == owner)
      language, corpus = self.corpora[owner]
      for slot, passage in zip(slots, corpus.passages(indices[slots] - self.offsets[owner])):
        result[slot] = (language, passage)
    return result

  def pairs(self, positions: list[tuple[int, int]]) -> list[tuple[str, str]]:
    """``(pseudo query, context passage text)`` for each ``(epoch, index)``."""
    indices = np.asarray([index for _, index in positions], np.int64)
    pairs: list = [None] * len(positions)
    missing = list(range(len(positions)))
    for probe in range(self._MAX_PROBES):
      if not missing:
        return pairs
      if probe:  # The next choice of each unpaired row: a permutation of its own (epoch, probe).
        for slot in missing:
          epoch, index = positions[slot]
          indices[slot] = permute([self.seed, _ICT_PROBE_SALT, epoch, probe], [index], len(self))[0]
      read = self._read(indices[missing])
      still = []
      for slot, (language, passage) in zip(missing, read):
        epoch, index = positions[slot]
        rng = np.random.default_rng([self.seed, _ICT_SALT, epoch, index, probe])
        pair = ict.make_pair(passage, language, rng, self.remove_prob, self.min_chars)
        if pair is None:
          still.append(slot)
        else:
          pairs[slot] = (pair[0], passage_text(pair[1], self.title_separator))
      missing = still
    raise ValueError(f"ICT: {self._MAX_PROBES} passages in a row had fewer than two sentences of "
                     f"{self.min_chars}+ characters; does the corpus have sentence punctuation?")

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This host's rows of the global batch at ``step``."""
    positions = example_positions(self.seed, step, self.shape.batch_size, len(self))[self.shape.host_rows()]
    pairs = self.pairs(positions)
    queries = tokenize(self.tokenizer, [q for q, _ in pairs], self.query_max_length)
    passages = tokenize(self.tokenizer, [p for _, p in pairs], self.passage_max_length)
    return self.shape.assemble(step, queries, passages)
