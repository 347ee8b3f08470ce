"""Retrieval metrics with trec_eval semantics (through ir-measures / pytrec_eval), run files, tables."""
from __future__ import annotations

import ir_measures
from ir_measures import R, RR, nDCG

MEASURES = {"MRR@100": RR @ 100, "Recall@100": R @ 100, "nDCG@10": nDCG @ 10}


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
  """MRR@100, Recall@100 and nDCG@10 averaged over the judged queries.

  A judged query missing from the run counts as zero (trec_eval -c), so a retriever cannot gain by
  returning nothing for hard queries.
  """
  run = {qid: run.get(qid, {}) for qid in qrels}
  empty = [qid for qid, hits in run.items() if not hits]
  filled = {qid: hits for qid, hits in run.items() if hits}
  values = ir_measures.calc_aggregate(list(MEASURES.values()), qrels, filled) if filled else {}
  scale = len(filled) / max(1, len(qrels))
  return {name: float(values.get(measure, 0.0)) * scale for name, measure in MEASURES.items()} | {
      "queries": len(qrels), "queries_without_hits": len(empty)}


def write_trec_run(path: str, run: dict[str, dict[str, float]], tag: str):
  import os
  with open(path + ".partial", "w", encoding="utf-8") as file:
    for qid, hits in run.items():
      ranked = sorted(hits.items(), key=lambda item: (-item[1], item[0]))
      for rank, (docid, score) in enumerate(ranked, start=1):
        file.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")
  os.replace(path + ".partial", path)


def format_table(results: dict[str, dict[str, dict[str, float]]], languages: list[str], metric: str) -> str:
  """A Markdown table: one row per system, one column per language plus the macro average."""
  header = f"| {metric} | " + " | ".join(languages) + " | avg |"
  lines = [header, "|" + "---|" * (len(languages) + 2)]
  for system, per_language in results.items():
    values = [per_language[lang][metric] for lang in languages]
    lines.append(f"| {system} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} |")
  return "\n".join(lines)
