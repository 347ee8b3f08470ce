"""Batches are a pure function of (seed, step), split cleanly across hosts, and rotate negatives."""
import numpy as np
import pytest

from axl_jax import batching, trainer
from axl_jax.data import Passage, TrainExample


class CharTokenizer:
  """Stands in for a HF tokenizer: one id per character, [CLS]=2 first, [SEP]=3 last."""

  def __call__(self, texts, truncation, max_length, add_special_tokens):
    return {"input_ids": [([2] + [5 + ord(c) % 90 for c in t] + [3])[:max_length] for t in texts]}


def _examples(n=10, negatives=5):
  return [TrainExample(f"q{i}", f"query {i}", (Passage(f"p{i}", "", f"positive {i}"),),
                       tuple(Passage(f"n{i}-{j}", "", f"negative {i} {j}") for j in range(negatives)))
          for i in range(n)]


def _batches(shape, examples=None, seed=0):
  return batching.SupervisedBatches(examples or _examples(), CharTokenizer(), shape, seed, 16, 24, " ")


def test_each_epoch_is_a_permutation_and_steps_are_reproducible():
  positions = [p for step in range(5) for p in batching.example_positions(7, step, 4, 10)]
  assert sorted(i for e, i in positions if e == 0) == list(range(10))
  assert positions == [p for step in range(5) for p in batching.example_positions(7, step, 4, 10)]
  assert positions != [p for step in range(5) for p in batching.example_positions(8, step, 4, 10)]


class Exchange:
  """``distributed.global_max`` between threads that stand in for hosts."""

  def __init__(self, hosts):
    import threading
    self.hosts, self.values, self.ready = hosts, {}, threading.Condition()

  def global_max(self, key, values):
    with self.ready:
      self.values.setdefault(key, []).append(values)
      self.ready.notify_all()
      assert self.ready.wait_for(lambda: len(self.values[key]) == self.hosts, timeout=30)
      return [max(column) for column in zip(*self.values[key])]


def _per_host(make, step, hosts=2, exchange=None):
  """Each host's ``batch(step)``, built in its own thread, and the texts each host tokenized; without an
  exchange each host pads to its own rows (what hosts that did not agree would do)."""
  from concurrent.futures import ThreadPoolExecutor
  global_max = exchange.global_max if exchange else lambda key, values: values
  tokenized = [[] for _ in range(hosts)]

  def host(index):
    batches = make(batching.BatchShape(4, 3 if make is not _ict_host else 1, (8, 16), (16, 24), index, hosts,
                                       global_max=global_max))
    tokenizer = batches.tokenizer

    def counting(texts, **kwargs):
      tokenized[index].extend(texts)
      return tokenizer(texts, **kwargs)
    batches.tokenizer = counting
    return batches.batch(step)
  with ThreadPoolExecutor(hosts) as pool:
    return list(pool.map(host, range(hosts))), tokenized


def _supervised_host(shape):
  # Short and long queries and passages: the hosts' own rows fall into different length buckets.
  examples = [TrainExample(f"q{i}", f"a long query number {i}" if i % 4 == 0 else f"q{i}",
                           (Passage(f"p{i}", "", f"a longer positive passage {i}" if i % 3 == 0 else f"p{i}"),),
                           tuple(Passage(f"n{i}-{j}", "", f"n{i}{j}") for j in range(3))) for i in range(10)]
  return _batches(shape, examples)


def _ict_host(shape):
  corpus = batching.PassageList(
      Passage(f"d{i}", "", f"Sentence {i} is a long first sentence here. Short {i}." if i % 3 == 0
              else f"Short {i}. Then {i}.") for i in range(12))
  return batching.ICTBatches([("en", corpus)], CharTokenizer(), shape, 0, 16, 24, " ", 1.0, 5)


@pytest.mark.parametrize("make", [_supervised_host, _ict_host], ids=["supervised", "ict"])
def test_hosts_split_the_global_batch_and_tokenize_only_their_rows(make):
  shape = lambda: batching.BatchShape(4, 3 if make is not _ict_host else 1, (8, 16), (16, 24))
  # A step at which the hosts' own rows pad to different lengths...
  step = next(step for step in range(50) if len({tuple(p[name].shape for name in ("query_ids", "passage_ids"))
                                                 for p in _per_host(make, step)[0]}) > 1)
  whole = make(shape()).batch(step)
  parts, tokenized = _per_host(make, step, exchange=Exchange(2))
  for name in whole:  # ...still gives the rows of the global batch, padded to the lengths that fit all of it
    np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
  group = 3 if make is not _ict_host else 1
  assert [len(texts) for texts in tokenized] == [2 + 2 * group] * 2  # each host: its 2 queries and their groups
  assert not set(tokenized[0]) & set(tokenized[1])


def test_static_shapes_from_buckets_and_positive_first():
  batch = _batches(batching.BatchShape(4, 3, (8, 16), (16, 24))).batch(0)
  assert batch["query_ids"].shape == (4, 16) and batch["passage_ids"].shape == (12, 16)
  assert batch["passage_lengths"].max() <= 16
  for row in range(4):  # each group starts with a positive passage ("positive ...")
    assert batch["passage_ids"][row * 3, 1] == 5 + ord("p") % 90


def test_hard_negatives_rotate_across_epochs():
  sampler = _batches(batching.BatchShape(2, 3, (8, 16), (16, 24)))
  seen = set()
  for epoch in range(3):
    seen.update(p.docid for p in sampler.group(epoch, 0)[1:])
  assert seen == {f"n0-{j}" for j in range(5)}


def test_missing_negatives_are_other_rows_positives():
  examples = _examples(n=6, negatives=0)
  sampler = _batches(batching.BatchShape(2, 3, (8, 16), (16, 24)), examples)
  group = [p.docid for p in sampler.group(0, 0)]
  assert len(group) == 3 and group[0] == "p0" and "p0" not in group[1:]
  assert all(docid.startswith("p") for docid in group[1:])


def test_adversarial_negatives_come_first_then_bm25():
  examples = _examples(n=4, negatives=3)
  adversarial = {("", "q0"): tuple(Passage(f"adv{j}", "", f"adversarial {j}") for j in range(2))}
  sampler = batching.SupervisedBatches(examples, CharTokenizer(), batching.BatchShape(2, 3, (8, 16), (16, 24)), 0,
                                       16, 24, " ", adversarial=adversarial, adversarial_per_group=1)
  for epoch in range(2):  # one adversarial negative per group, rotating, then BM25 ones
    group = [p.docid for p in sampler.group(epoch, 0)]
    assert group[0] == "p0" and group[1] == f"adv{epoch}" and group[2].startswith("n0-")
  # Queries without adversarial negatives keep their BM25 ones.
  assert all(p.docid.startswith("n1-") for p in sampler.group(0, 1)[1:])


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4099])
def test_permutation_is_a_bijection_keyed_by_seed_and_epoch(size):
  positions = np.arange(size)
  permuted = batching.permute([3, 1, 0], positions, size)
  assert sorted(permuted.tolist()) == list(range(size))
  np.testing.assert_array_equal(permuted, batching.permute([3, 1, 0], positions, size))
  if size >= 64:
    assert not np.array_equal(permuted, batching.permute([3, 1, 1], positions, size))
    assert not np.array_equal(permuted, positions)
  # Computed per index: any subset of positions lands where the whole permutation puts it.
  subset = positions[::3]
  np.testing.assert_array_equal(batching.permute([3, 1, 0], subset, size), permuted[::3])


def test_batch_positions_cost_the_batch_not_the_data_set():
  # 58.7 billion examples: a permutation materialised per step would not fit in memory.
  positions = batching.example_positions(0, 10**6, 256, 58_700_000_000)
  assert len(positions) == 256 and len({index for _, index in positions}) == 256
  assert all(0 <= index < 58_700_000_000 and epoch == 0 for epoch, index in positions)
  # An epoch boundary inside a batch: the first rows finish epoch 0, the others start epoch 1.
  epochs = [epoch for epoch, _ in batching.example_positions(0, 2, 4, 10)]
  assert epochs == [0, 0, 1, 1]


def _ict(passages, batch_size=4, seed=0):
  corpus = batching.PassageList(passages)
  return batching.ICTBatches([("en", corpus)], CharTokenizer(), batching.BatchShape(batch_size, 1, (16,), (40,)),
                             seed, 16, 40, " ", remove_prob=1.0, min_sentence_chars=3)


def test_ict_pairs_skip_single_sentence_passages_deterministically():
  passages = [Passage(f"d{i}", "", f"Alpha {i}. Beta {i}." if i % 3 == 0 else f"Single {i}") for i in range(30)]
  sampler = _ict(passages)
  for step in range(10):
    positions = batching.example_positions(0, step, 4, 30)
    pairs = sampler.pairs(positions)
    assert pairs == _ict(passages).pairs(positions)
    for query, context in pairs:  # every pair comes from a two-sentence passage, its query removed
      assert query.startswith(("Alpha", "Beta")) and query not in context


def test_ict_rows_read_only_their_own_passages():
  class Counting(batching.PassageList):
    reads = 0

    def passages(self, indices):
      Counting.reads += len(indices)
      return super().passages(indices)

  passages = Counting(Passage(f"d{i}", "", f"One {i}. Two {i}.") for i in range(1000))
  sampler = batching.ICTBatches([("en", passages)], CharTokenizer(), batching.BatchShape(8, 1, (16,), (40,)), 0,
                                16, 40, " ", remove_prob=0.9, min_sentence_chars=3)
  sampler.batch(5)
  assert Counting.reads == 8


def test_threaded_prefetch_gives_the_sequential_batches():
  sampler = _batches(batching.BatchShape(4, 3, (8, 16), (16, 24)))
  threaded = list(trainer._prefetch(sampler.batch, range(2, 9), workers=3))
  assert [step for step, _ in threaded] == list(range(2, 9))
  for step, batch in threaded:
    for name, value in sampler.batch(step).items():
      np.testing.assert_array_equal(batch[name], value)
