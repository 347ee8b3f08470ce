"""Metrics against hand-worked values and trec_eval's code on the run files written, the evaluation table
against a hand count. Search and BM25 are tested in test_search.py."""
import numpy as np
import pytest
import pytrec_eval

from axl_jax import metrics


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
  # The per-query values (the paired samples of the significance tests), in the qrels' order.
  per_query = metrics.per_query(qrels, run)
  assert list(per_query) == ["q1", "q2", "q3"]
  assert [v["MRR@100"] for v in per_query.values()] == pytest.approx([0.5, 1.0, 0.0])
  assert [v["Recall@100"] for v in per_query.values()] == pytest.approx([1.0, 0.5, 0.0])


def test_trec_run_file(tmp_path):
  path = str(tmp_path / "run.trec")
  tenth = float(np.float32(0.1))  # 0.100000001490116...: six decimals would lose it.
  metrics.write_trec_run(path, {"q1": {"a": 1.0, "b": 2.0, "c": tenth}}, "tag")
  assert open(path).read().splitlines() == ["q1 Q0 b 1 2.0 tag", "q1 Q0 a 2 1.0 tag",
                                            "q1 Q0 c 3 0.10000000149011612 tag"]
  assert metrics.read_trec_run(path) == {"q1": {"a": 1.0, "b": 2.0, "c": tenth}}
  with pytest.raises(ValueError, match="whitespace"):
    metrics.write_trec_run(path, {"q1": {"a b": 1.0}}, "tag")


def trec_eval_rank(run: dict[str, float], docid: str) -> int:
  """The rank trec_eval gives ``docid`` in ``run``: 1 / its reciprocal rank when it alone is relevant."""
  values = pytrec_eval.RelevanceEvaluator({"q": {docid: 1}}, {"recip_rank"}).evaluate({"q": run})
  return round(1 / values["q"]["recip_rank"])


def test_file_ranks_are_trec_evals_ranks(tmp_path):
  # Ties, float32 neighbours (they differ in the 8th significant digit) and docids of several scripts.
  step = np.nextafter(np.float32(0.7), np.float32(1))
  dense = {"a": 0.7, "B": 0.7, "z": 0.7, "é": 0.7, "東": 0.7, "d10": step, "d9": step, "d1": 0.5, "d2": 0.5}
  # Doubles (BM25) that differ past float32 precision tie in trec_eval 9.0.8, which keeps C floats.
  run = {"dense": {docid: float(np.float32(score)) for docid, score in dense.items()},
         "bm25": {"x": 0.3 + 1e-12, "y": 0.3, "w": 0.2}}
  path = str(tmp_path / "ties.trec")
  metrics.write_trec_run(path, run, "tag")
  lines = [line.split() for line in open(path, encoding="utf-8")]
  # Score descending, then docid descending: d9 > d10, 東 > é > z > a > B, y > x.
  assert [fields[2] for fields in lines] == ["d9", "d10", "東", "é", "z", "a", "B", "d2", "d1", "y", "x", "w"]
  for qid, _, docid, rank, _, _ in lines:
    assert int(rank) == trec_eval_rank(run[qid], docid)


def test_mrr_counts_only_trec_evals_top_100():
  run = {f"d{i:03d}": float(200 - i) for i in range(99)} | {"a": 0.0, "b": 0.0, "z": 0.0}
  # trec_eval ranks the three tied docs z, b, a: z is 100th, b 101st.
  assert metrics.evaluate_run({"q": {"z": 1}}, {"q": run})["MRR@100"] == pytest.approx(1 / 100)
  assert metrics.evaluate_run({"q": {"b": 1}}, {"q": run})["MRR@100"] == 0.0
  assert metrics.evaluate_run({"q": {"b": 1}}, {"q": run})["Recall@100"] == 0.0


def reference_metrics(qrels, path):
  """The three averages pytrec_eval computes from a run file, parsed here on its own; MRR@100 from the lines
  the file ranks 1 to 100, which are trec_eval's top 100 (test_file_ranks_are_trec_evals_ranks)."""
  full, top = {}, {}
  for line in open(path, encoding="utf-8"):
    qid, _, docid, rank, score, _ = line.split()
    full.setdefault(qid, {})[docid] = float(score)
    if int(rank) <= 100:
      top.setdefault(qid, {})[docid] = float(score)
  judged = {qid: rels for qid, rels in qrels.items() if rels}
  on_full = pytrec_eval.RelevanceEvaluator(judged, {"recall.100", "ndcg_cut.10"}).evaluate(full)
  on_top = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top)
  return {"MRR@100": sum(v["recip_rank"] for v in on_top.values()) / len(qrels),
          "Recall@100": sum(v["recall_100"] for v in on_full.values()) / len(qrels),
          "nDCG@10": sum(v["ndcg_cut_10"] for v in on_full.values()) / len(qrels)}


def test_metrics_of_the_dict_equal_trec_eval_on_the_file(tmp_path):
  rng = np.random.default_rng(7)
  # Few distinct float32 scores, each with neighbours one or two ulps away: many ties, many near-ties.
  levels = rng.normal(size=12).astype(np.float32)
  levels = np.concatenate([levels, np.nextafter(levels, np.float32(np.inf)),
                           np.nextafter(np.nextafter(levels, np.float32(-np.inf)), np.float32(-np.inf))])
  qrels, run = {}, {}
  for q in range(300):
    qid = f"q{q}"
    docs = [f"d{i}" for i in rng.choice(400, size=rng.integers(80, 160), replace=False)]
    judged = rng.choice(docs + ["d_unretrieved"], size=rng.integers(1, 6), replace=False)
    qrels[qid] = {str(d): int(rng.integers(0, 3)) for d in judged}
    if q % 25 == 0:
      continue  # Judged, not retrieved: counts as zero.
    run[qid] = {d: float(rng.choice(levels)) for d in docs} if q % 25 != 1 else {}
  run["not_judged"] = {"d1": 1.0}
  path = str(tmp_path / "random.trec")
  metrics.write_trec_run(path, run, "tag")
  from_dict = metrics.evaluate_run(qrels, run)
  assert metrics.evaluate_run_file(qrels, path) == from_dict
  reference = reference_metrics(qrels, path)
  for name in metrics.MEASURES:
    assert from_dict[name] == pytest.approx(reference[name], abs=1e-9, rel=0)
  assert from_dict["queries"] == 300 and from_dict["queries_without_hits"] == 24


def test_format_table_against_a_hand_count():
  results = {"BM25": {"en": {"MRR@100": 0.5}, "ja": {"MRR@100": 0.25}},
             "dense": {"en": {"MRR@100": 0.875}, "ja": {"MRR@100": 0.625}}}
  # Averages by hand: (0.5 + 0.25) / 2 = 0.375; (0.875 + 0.625) / 2 = 0.75.
  assert metrics.format_table(results, ["en", "ja"], "MRR@100") == (
      "| MRR@100 | en | ja | avg |\n"
      "|---|---|---|---|\n"
      "| BM25 | 0.500 | 0.250 | 0.375 |\n"
      "| dense | 0.875 | 0.625 | 0.750 |")


def test_a_system_without_some_languages_shows_a_dash_and_no_average():
  results = {"dense": {"bn": {"MRR@100": 0.5}, "th": {"MRR@100": 0.25}}, "BM25": {"bn": {"MRR@100": 0.75}}}
  table = metrics.format_table(results, ["bn", "th"], "MRR@100")
  assert "| dense | 0.500 | 0.250 | 0.375 |" in table and "| BM25 | 0.750 | - | - |" in table
