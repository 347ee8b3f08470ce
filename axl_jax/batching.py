"""Deterministic, static-shape contrastive batches.

Which examples a step sees is a pure function of ``(seed, step)``: example ``k`` of the run is the
``k mod N``-th entry of epoch ``k // N``'s permutation, so a resumed run sees exactly the batches an
uninterrupted run would. Hard negatives rotate across epochs. Each host builds the same global batch
plan and keeps the rows of its own devices (``process_index``), so the code runs unchanged on a pod.

Padding goes on the right up to the smallest length bucket that fits the longest sequence of the
*global* batch (every host and device must agree on shapes); the examples never depend on buckets.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from axl_jax import ict
from axl_jax.data import Passage, TrainExample, passage_text
from axl_jax.tokenization import tokenize

# Salts keep the random streams of different uses apart for the same (seed, epoch).
_ORDER_SALT, _NEGATIVE_SALT, _ICT_SALT = 1, 2, 3


def example_positions(seed: int, step: int, batch_size: int, num_examples: int) -> list[tuple[int, int]]:
  """``(epoch, example_index)`` of each of the global batch's rows at ``step``."""
  positions, permutations = [], {}
  for k in range(step * batch_size, (step + 1) * batch_size):
    epoch, offset = divmod(k, num_examples)
    if epoch not in permutations:
      permutations[epoch] = np.random.default_rng([seed, _ORDER_SALT, epoch]).permutation(num_examples)
    positions.append((epoch, int(permutations[epoch][offset])))
  return positions


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

  def __post_init__(self):
    if self.batch_size % self.process_count:
      raise ValueError(f"batch_size {self.batch_size} must divide evenly over {self.process_count} hosts")

  def host_rows(self) -> slice:
    per_host = self.batch_size // self.process_count
    return slice(self.process_index * per_host, (self.process_index + 1) * per_host)

  def assemble(self, queries: list[np.ndarray], passages: list[np.ndarray]) -> dict[str, np.ndarray]:
    """This host's rows, padded to the buckets that fit the whole global batch."""
    query_length = bucket_length(max(len(q) for q in queries), self.query_buckets)
    passage_length = bucket_length(max(len(p) for p in passages), self.passage_buckets)
    rows = self.host_rows()
    passage_rows = slice(rows.start * self.group_size, rows.stop * self.group_size)
    query_ids, query_lengths = pad(queries[rows], query_length)
    passage_ids, passage_lengths = pad(passages[passage_rows], passage_length)
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


def batch_shape(config, stage_config, process_index: int = 0, process_count: int = 1) -> BatchShape:
  return BatchShape(stage_config.batch_size, stage_config.group_size, query_buckets(config),
                    passage_buckets(config), process_index, process_count)


def _rotate(items: list, epoch: int, count: int) -> list:
  """``count`` items starting at an epoch-dependent offset, so every item gets its turn."""
  if not items or count <= 0:
    return []
  start = (epoch * count) % len(items)
  return [items[(start + i) % len(items)] for i in range(min(count, len(items)))]


class SupervisedBatches:
  """Groups of 1 positive + (group_size - 1) hard negatives per query, from ``TrainExample`` rows.

  Passages are keyed by ``(language, docid)``: Mr.TyDi reuses ids such as ``"25267#12"`` in every
  language. With ``adversarial`` negatives (``(language, query_id)`` -> passages), each group takes up
  to ``adversarial_per_group`` of them first and fills the rest with the row's own (BM25) negatives.
  """

  def __init__(self, examples: list[TrainExample], tokenizer, shape: BatchShape, seed: int,
               query_max_length: int, passage_max_length: int, title_separator: str,
               adversarial: dict[tuple[str, str], tuple[Passage, ...]] | None = None,
               adversarial_per_group: int = 0):
    self.examples, self.shape, self.seed = examples, shape, seed
    self.adversarial, self.adversarial_per_group = adversarial or {}, adversarial_per_group
    self.query_tokens = tokenize(tokenizer, [e.query for e in examples], query_max_length)
    # Passages are shared between queries (a BM25 negative is often another query's positive), so
    # each distinct passage is tokenized once.
    self.passage_index: dict[tuple[str, str], int] = {}
    texts = []
    own = [((e.language, p.docid), p) for e in examples for p in e.positives + e.negatives]
    generated = [((language, p.docid), p) for (language, _), passages in self.adversarial.items() for p in passages]
    for key, passage in own + generated:
      if key not in self.passage_index:
        self.passage_index[key] = len(texts)
        texts.append(passage_text(passage, title_separator))
    self.passage_tokens = tokenize(tokenizer, texts, passage_max_length)
    # The pool that fills groups short of hard negatives: the rows' own passages, never adversarial ones.
    self.pool = list(dict.fromkeys(key for key, _ in own))

  def group(self, epoch: int, index: int) -> list[int]:
    """Passage token indices for one query: positive first, then rotating hard negatives."""
    example = self.examples[index]
    language = example.language
    rng = np.random.default_rng([self.seed, _NEGATIVE_SALT, epoch, index])
    positive = example.positives[epoch % len(example.positives)]
    wanted = self.shape.group_size - 1
    adversarial = [(language, p.docid) for p in self.adversarial.get(example.key, ())]
    chosen = _rotate(adversarial, epoch, min(self.adversarial_per_group, wanted))
    chosen += _rotate([(language, p.docid) for p in example.negatives], epoch, wanted - len(chosen))
    positives = {(language, p.docid) for p in example.positives}
    while len(chosen) < wanted:  # Too few hard negatives: fill with random passages of the pool.
      key = self.pool[int(rng.integers(len(self.pool)))]
      if key not in positives or len(self.pool) <= len(positives):
        chosen.append(key)
    return [self.passage_index[(language, positive.docid)]] + [self.passage_index[k] for k in chosen]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    positions = example_positions(self.seed, step, self.shape.batch_size, len(self.examples))
    queries = [self.query_tokens[index] for _, index in positions]
    passages = [self.passage_tokens[p] for epoch, index in positions for p in self.group(epoch, index)]
    return self.shape.assemble(queries, passages)


class ICTBatches:
  """ICT pseudo pairs made on the fly from corpus passages; in-batch negatives only (group_size 1)."""

  def __init__(self, passages: list[tuple[str, Passage]], tokenizer, shape: BatchShape, seed: int,
               query_max_length: int, passage_max_length: int, title_separator: str,
               remove_prob: float, min_sentence_chars: int):
    if shape.group_size != 1:
      raise ValueError(f"ict.group_size must be 1 (ICT uses in-batch negatives only), got {shape.group_size}")
    # Only passages of two or more sentences can make a pair.
    self.passages = [(language, passage) for language, passage in passages
                     if len(ict.split_sentences(passage.text, language, min_sentence_chars)) >= 2]
    if not self.passages:
      raise ValueError("ICT: no corpus passage has two sentences")
    self.tokenizer, self.shape, self.seed = tokenizer, shape, seed
    self.query_max_length, self.passage_max_length = query_max_length, passage_max_length
    self.title_separator, self.remove_prob, self.min_chars = title_separator, remove_prob, min_sentence_chars

  def pair(self, epoch: int, index: int) -> tuple[str, str]:
    language, passage = self.passages[index]
    rng = np.random.default_rng([self.seed, _ICT_SALT, epoch, index])
    query, context = ict.make_pair(passage, language, rng, self.remove_prob, self.min_chars)
    return query, passage_text(context, self.title_separator)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    positions = example_positions(self.seed, step, self.shape.batch_size, len(self.passages))
    pairs = [self.pair(epoch, index) for epoch, index in positions]
    queries = tokenize(self.tokenizer, [q for q, _ in pairs], self.query_max_length)
    passages = tokenize(self.tokenizer, [p for _, p in pairs], self.passage_max_length)
    return self.shape.assemble(queries, passages)
