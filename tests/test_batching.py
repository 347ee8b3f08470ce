"""Batches are a pure function of (seed, step), split cleanly across hosts, and rotate negatives."""
import numpy as np

from axl_jax import batching
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


def test_hosts_split_the_global_batch():
  whole = _batches(batching.BatchShape(4, 3, (8, 16), (16, 24))).batch(3)
  parts = [_batches(batching.BatchShape(4, 3, (8, 16), (16, 24), process_index=h, process_count=2)).batch(3)
           for h in range(2)]
  for name in whole:
    np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))


def test_static_shapes_from_buckets_and_positive_first():
  batch = _batches(batching.BatchShape(4, 3, (8, 16), (16, 24))).batch(0)
  assert batch["query_ids"].shape == (4, 16) and batch["passage_ids"].shape == (12, 16)
  assert batch["passage_lengths"].max() <= 16
  for row in range(4):  # each group starts with a positive passage ("positive ...")
    assert batch["passage_ids"][row * 3, 1] == 5 + ord("p") % 90


def _docids(sampler):
  """Token row -> docid (the tests use one language, so the (language, docid) keys differ by docid only)."""
  return {index: docid for (_, docid), index in sampler.passage_index.items()}


def test_hard_negatives_rotate_across_epochs():
  sampler = _batches(batching.BatchShape(2, 3, (8, 16), (16, 24)))
  docids, seen = _docids(sampler), set()
  for epoch in range(3):
    group = sampler.group(epoch, 0)
    seen.update(docids[g] for g in group[1:])
  assert seen == {f"n0-{j}" for j in range(5)}


def test_missing_negatives_are_filled_from_the_pool():
  examples = _examples(n=6, negatives=0)
  sampler = _batches(batching.BatchShape(2, 3, (8, 16), (16, 24)), examples)
  group, docids = sampler.group(0, 0), _docids(sampler)
  assert len(group) == 3 and docids[group[0]] == "p0" and "p0" not in [docids[g] for g in group[1:]]


def test_adversarial_negatives_come_first_then_bm25():
  examples = _examples(n=4, negatives=3)
  adversarial = {("", "q0"): tuple(Passage(f"adv{j}", "", f"adversarial {j}") for j in range(2))}
  sampler = batching.SupervisedBatches(examples, CharTokenizer(), batching.BatchShape(2, 3, (8, 16), (16, 24)), 0,
                                       16, 24, " ", adversarial=adversarial, adversarial_per_group=1)
  docid = _docids(sampler)
  for epoch in range(2):  # one adversarial negative per group, rotating, then BM25 ones
    group = [docid[g] for g in sampler.group(epoch, 0)]
    assert group[0] == "p0" and group[1] == f"adv{epoch}" and group[2].startswith("n0-")
  # Queries without adversarial negatives keep their BM25 ones.
  assert all(docid[g].startswith("n1-") for g in sampler.group(0, 1)[1:])
