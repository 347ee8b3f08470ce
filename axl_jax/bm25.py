"""BM25 baseline on the same corpus and queries (bm25s, Lucene scoring, k1=0.9, b=0.4: Anserini's).

Text becomes unique-per-query character 3-grams of NFKC + casefold + collapsed white space: one setup
for all 11 scripts with no tokenizer (ja and th have no spaces), as the tydi-mini negatives were mined.

bm25s indexes in memory, which suits small corpora only (``bm25s_feasible``). For larger ones the BM25
row comes from a TREC run file made elsewhere (Pyserini's published Mr.TyDi BM25 runs, say), read by
``read_run_file``. Not here: parsing run files (``metrics.read_trec_run``) or scoring them.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np

from axl_jax import metrics

# bm25s holds every passage's character-trigram list as Python objects while it indexes: bm25_run peaked at
# ~72 KB per 650-character passage (5K to 40K synthetic passages, linear), ~0.65 ms each on one core. 500K
# passages is ~36 GB and ~6 minutes. Of Mr.TyDi's corpora bn (304K) and sw (137K) fit, te and th (~550K)
# just miss, and en (33M) would need ~2.3 TB.
BM25S_MAX_PASSAGES = 500_000


def char_ngrams(text: str, n: int = 3) -> list[str]:
  text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
  if len(text) < n:
    return [text] if text else []
  return [text[i:i + n] for i in range(len(text) - n + 1)]


def bm25_run(passage_ids: list[str], passage_texts: list[str], query_ids: list[str], queries: list[str],
             depth: int = 100, k1: float = 0.9, b: float = 0.4) -> dict[str, dict[str, float]]:
  import bm25s  # here, not at the top: importing it runs a JAX op, which opens the devices
  retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
  retriever.index([char_ngrams(text) for text in passage_texts], show_progress=False)
  query_grams = [list(dict.fromkeys(char_ngrams(query))) or ["<empty>"] for query in queries]
  positions, scores = retriever.retrieve(query_grams, k=min(depth, len(passage_ids)), show_progress=False)
  ids = np.asarray(passage_ids, dtype=object)
  return {qid: {ids[p]: float(s) for p, s in zip(row_positions, row_scores) if s > 0}
          for qid, row_positions, row_scores in zip(query_ids, positions, scores)}


def bm25s_feasible(passages: int, max_passages: int = BM25S_MAX_PASSAGES) -> bool:
  """Whether ``bm25_run`` may index a corpus of ``passages`` in memory (see ``BM25S_MAX_PASSAGES``)."""
  return passages <= max_passages


def read_run_file(path: str, query_ids: list[str], depth: int) -> dict[str, dict[str, float]]:
  """``{qid: {docid: score}}`` of the TREC run file at ``path`` for ``query_ids``, top ``depth`` of each.

  Each query keeps its first ``depth`` hits in trec_eval's order (``metrics.trec_order``), the order it is
  evaluated in; queries the file does not list are left out and count as zero. A file that lists none
  of ``query_ids`` is an error: it is another language's or split's run.
  """
  if depth < 1:
    raise ValueError(f"{path}: depth must be at least 1, got {depth}")
  run = metrics.read_trec_run(path)
  hits = {qid: dict(metrics.trec_order(run[qid])[:depth]) for qid in query_ids if qid in run}
  if not hits:
    listed = ", ".join(repr(qid) for qid in list(run)[:3]) or "none"
    raise ValueError(f"{path}: lists none of the {len(query_ids)} queries (first: "
                     f"{', '.join(repr(q) for q in query_ids[:3])}); it lists queries {listed}: "
                     f"is it the run of another language or split?")
  return hits
