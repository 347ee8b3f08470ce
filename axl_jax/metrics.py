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
  # Averaged here over every judged query, whatever the provider does with queries absent from a run.
  per_query: dict[str, dict] = {qid: {} for qid in qrels}
  hits = {qid: run[qid] for qid in qrels if run.get(qid)}
  if hits:
    for value in ir_measures.iter_calc(list(MEASURES.values()), qrels, hits):
      per_query[value.query_id][value.measure] = value.value
  count = max(1, len(qrels))
  averages = {name: sum(values.get(measure, 0.0) for values in per_query.values()) / count
              for name, measure in MEASURES.items()}
  return averages | {"queries": len(qrels), "queries_without_hits": len(qrels) - len(hits)}


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
