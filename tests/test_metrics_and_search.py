"""Metrics against hand-worked values, FAISS shard merging against one exact search, BM25 sanity."""
import numpy as np
import pytest

from axl_jax import bm25, metrics, search


def test_metrics_hand_worked():
  qrels = {"q1": {"d1": 1}, "q2": {"d5": 1, "d6": 1}, "q3": {"d9": 1}}
  run = {"q1": {"d2": 3.0, "d1": 2.0, "d3": 1.0},   # relevant at rank 2: RR 1/2
         "q2": {"d5": 5.0, "d7": 4.0},               # one of two relevant, at rank 1
         "q3": {}}                                   # nothing retrieved: counts as zero
  values = metrics.evaluate_run(qrels, run)
  assert values["MRR@100"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
  assert values["Recall@100"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
  # nDCG@10: q1 = (1/log2(3)) / 1; q2 = 1 / (1 + 1/log2(3)); q3 = 0
  expected = (1 / np.log2(3) + 1 / (1 + 1 / np.log2(3))) / 3
  assert values["nDCG@10"] == pytest.approx(expected)
  assert values["queries"] == 3 and values["queries_without_hits"] == 1


def test_shard_merge_equals_one_exact_search():
  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(230, 8)).astype(np.float32)
  queries = rng.normal(size=(5, 8)).astype(np.float32)
  ids = [f"d{i}" for i in range(230)]
  shards = [(ids[i:i + 50], corpus[i:i + 50]) for i in range(0, 230, 50)]
  scores, docids = search.search_shards(queries, iter(shards), depth=20)
  exact = queries @ corpus.T
  for row in range(5):
    order = np.argsort(-exact[row])[:20]
    assert docids[row] == [ids[i] for i in order]
    np.testing.assert_allclose(scores[row], exact[row][order], rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_exact_neighbours_of_corpus_points(kind):
  rng = np.random.default_rng(0)
  corpus = rng.normal(size=(400, 16)).astype(np.float32)
  corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
  ids = [f"d{i}" for i in range(400)]
  _, docids = search.search_shards(corpus[:10], [(ids, corpus)], depth=5, kind=kind, ivf_lists=4)
  assert sum(row[0] == f"d{i}" for i, row in enumerate(docids)) >= 9


def test_bm25_ranks_the_matching_passage_first_in_any_script():
  passages = ["東京は日本の首都です", "大阪はたこ焼きで有名", "Paris is the capital of France"]
  run = bm25.bm25_run(["ja1", "ja2", "fr"], passages, ["q1", "q2"], ["日本の首都はどこ", "capital of France"])
  assert max(run["q1"], key=run["q1"].get) == "ja1"
  assert max(run["q2"], key=run["q2"].get) == "fr"


def test_trec_run_file(tmp_path):
  path = str(tmp_path / "run.trec")
  metrics.write_trec_run(path, {"q1": {"a": 1.0, "b": 2.0}}, "tag")
  assert open(path).read().splitlines() == ["q1 Q0 b 1 2.000000 tag", "q1 Q0 a 2 1.000000 tag"]
