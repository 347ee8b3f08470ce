"""Retrieval metrics computed by trec_eval's own code (pytrec_eval), TREC run files, Markdown tables.

One provider computes every measure, so ``evaluate_run(qrels, run)`` equals
``trec_eval -c -M 100 -m recip_rank -m recall.100 -m ndcg_cut.10`` on the file ``write_trec_run`` writes
from ``run``: scores are written so that they parse back to the same doubles, and each query's lines
are in the order trec_eval ranks them. No measure is reimplemented here, and no qrels file is read.
"""
from __future__ import annotations

import math

import numpy as np
import pytrec_eval

from axl_jax import significance
from axl_jax.io import atomic_open

MEASURES = ("MRR@100", "Recall@100", "nDCG@10")

# trec_eval's recip_rank has no cutoff. Times success.100 (a relevant doc in trec_eval's own top 100) it
# is RR@100 over trec_eval's ranking, what `trec_eval -M 100` computes, without re-sorting anything here.
_TREC_MEASURES = ("recip_rank", "success.100", "recall.100", "ndcg_cut.10")


def trec_order(hits: dict[str, float]) -> list[tuple[str, float]]:
  """``(docid, score)`` in the order trec_eval ranks them: it ignores a run file's rank column.

  trec_eval sorts by score descending, then by docno *descending* in strcmp order (``comp_sim_docno`` in
  form_res_rels.c). Release 9.0.8, the one pytrec_eval compiles in, keeps each score as a C float
  (``TEXT_RESULTS.sim`` in trec_format.h), so scores equal in float32 tie; FAISS scores are float32
  already. Python orders str by code point, which is the byte order of their UTF-8.
  """
  return sorted(hits.items(), key=lambda item: (np.float32(item[1]), item[0]), reverse=True)


def per_query(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
  """``{qid: {measure: value}}`` for every query of ``qrels``, in its order: the values ``evaluate_run``
  averages, and the paired samples of a significance test. A judged query missing from the run, or with
  no hits (or no judgements), scores zero (trec_eval -c)."""
  # pytrec_eval takes exact int and float objects only; trec_eval reads past an empty judgment list.
  judged = {qid: {doc: int(rel) for doc, rel in judgments.items()} for qid, judgments in qrels.items() if judgments}
  hits = {qid: {doc: float(score) for doc, score in run[qid].items()} for qid in qrels if run.get(qid)}
  evaluated = {}
  if judged and hits:
    evaluated = pytrec_eval.RelevanceEvaluator(judged, set(_TREC_MEASURES)).evaluate(hits)
  values = {}
  for qid in qrels:
    found = evaluated.get(qid)
    values[qid] = dict.fromkeys(MEASURES, 0.0) if found is None else {
        "MRR@100": found["recip_rank"] * found["success_100"], "Recall@100": found["recall_100"],
        "nDCG@10": found["ndcg_cut_10"]}
  return values


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict[str, float]:
  """MRR@100, Recall@100 and nDCG@10 averaged over the judged queries, plus the query counts.

  A judged query missing from the run, or with no hits, counts as zero (trec_eval -c), so a retriever
  cannot gain by returning nothing for hard queries.
  """
  values = per_query(qrels, run)
  count = max(1, len(qrels))
  missing = sum(1 for qid in qrels if not run.get(qid))
  return ({name: sum(v[name] for v in values.values()) / count for name in MEASURES}
          | {"queries": len(qrels), "queries_without_hits": missing})


def _check_field(value: str, what: str) -> None:
  # trec_eval splits lines on ASCII whitespace and skips lines that start with '#'.
  if value.encode("utf-8").split() != [value.encode("utf-8")] or (what == "query id" and value.startswith("#")):
    raise ValueError(f"a {what} in a TREC run file must be one token without whitespace, got {value!r}")


def write_trec_run(path: str, run: dict[str, dict[str, float]], tag: str) -> None:
  """Writes ``run`` as a TREC run file that trec_eval reads back as exactly ``run``.

  Each score is ``repr`` of its double, the shortest decimal that parses (strtod, atof, ``float``) to
  that same double; each query's lines are in ``trec_order``, ranked from 1.
  """
  _check_field(tag, "run tag")
  for qid, hits in run.items():
    _check_field(qid, "query id")
    for docid, score in hits.items():
      _check_field(docid, "document id")
      if math.isnan(score):
        raise ValueError(f"query {qid!r} scores document {docid!r} NaN, which no evaluator can rank")
  with atomic_open(path) as file:
    for qid, hits in run.items():
      for rank, (docid, score) in enumerate(trec_order(hits), start=1):
        file.write(f"{qid} Q0 {docid} {rank} {float(score)!r} {tag}\n")


def read_trec_run(path: str) -> dict[str, dict[str, float]]:
  """``{qid: {docid: score}}`` from a TREC run file, read as trec_eval reads one.

  The rank column is ignored, blank lines and lines starting with '#' are skipped, and a document
  listed twice for a query is an error.
  """
  run: dict[str, dict[str, float]] = {}
  with open(path, "rb") as file:
    for number, line in enumerate(file, start=1):
      fields = line.split()  # Bytes split on ASCII whitespace only, as trec_eval does.
      if not fields or fields[0].startswith(b"#"):
        continue
      if len(fields) < 6:
        raise ValueError(f"{path}:{number}: expected 'qid iter docid rank score tag', got {line!r}")
      try:
        qid, docid = fields[0].decode("utf-8"), fields[2].decode("utf-8")
        score = float(fields[4])
      except UnicodeDecodeError:
        raise ValueError(f"{path}:{number}: field 1 (qid) or 3 (docid) is not UTF-8") from None
      except ValueError:
        raise ValueError(f"{path}:{number}: field 5 (score) must be a number, "
                         f"got {fields[4].decode(errors='replace')!r}") from None
      hits = run.setdefault(qid, {})
      if docid in hits:
        raise ValueError(f"{path}:{number}: query {qid!r} lists document {docid!r} twice")
      hits[docid] = score
  return run


def evaluate_run_file(qrels: dict[str, dict[str, int]], path: str) -> dict[str, float]:
  """``evaluate_run`` of the run file at ``path``: what trec_eval reports for the file."""
  return evaluate_run(qrels, read_trec_run(path))


def format_table(results: dict[str, dict[str, dict[str, float]]], languages: list[str], metric: str,
                 marks: dict[str, dict[str, str]] | None = None, baseline: str = "") -> str:
  """A Markdown table: one row per system, one column per language plus the macro average.

  A system without some languages (BM25 where no run file and no in-memory index was possible) shows "-"
  there and no average, which would not be comparable with the others'. ``marks[system][language or
  "avg"]`` is appended to a cell (significance against the ``baseline`` row, which the table names).
  """
  marks = marks or {}
  header = f"| {metric} | " + " | ".join(languages) + " | avg |"
  lines = [header, "|" + "---|" * (len(languages) + 2)]
  for system, per_language in results.items():
    values = [per_language[lang][metric] if lang in per_language else None for lang in languages]
    mark = lambda column: marks.get(system, {}).get(column, "")
    cells = " | ".join("-" if v is None else f"{v:.3f}{mark(lang)}" for v, lang in zip(values, languages))
    average = "-" if None in values else f"{sum(values) / len(values):.3f}{mark('avg')}"
    name = f"{system} (baseline)" if system == baseline else system
    lines.append(f"| {name} | {cells} | {average} |")
  return "\n".join(lines)


def format_differences(tests: dict[str, dict[str, dict[str, float]]], languages: list[str], metric: str,
                       baseline: str) -> str:
  """A Markdown table of each system's difference from ``baseline``: ``+0.012 [-0.004, +0.027]`` per
  language (95% interval), and for the macro average also the p-value; ``*`` where p < 0.05."""
  header = f"| {metric}: system - {baseline} | " + " | ".join(languages) + " | avg | p (avg) |"
  lines = [header, "|" + "---|" * (len(languages) + 3)]
  for system, per_language in tests.items():
    def cell(column):
      test = per_language[column]
      return (f"{test['diff']:+.3f}{significance.mark(test['p'])} "
              f"[{test['ci_low']:+.3f}, {test['ci_high']:+.3f}]")
    p = per_language["avg"]["p"]
    lines.append(f"| {system} | " + " | ".join(cell(l) for l in languages) + f" | {cell('avg')} | {p:.3g} |")
  return "\n".join(lines)
