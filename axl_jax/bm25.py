"""BM25 baseline on the same corpus and queries (bm25s, Lucene scoring, k1=0.9, b=0.4: Anserini's).

Text becomes unique-per-query character 3-grams of NFKC + casefold + collapsed white space: one setup
for all 11 scripts with no tokenizer (ja and th have no spaces), as the tydi-mini negatives were mined.
"""
from __future__ import annotations

import re
import unicodedata

import bm25s
import numpy as np


def char_ngrams(text: str, n: int = 3) -> list[str]:
  text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
  if len(text) < n:
    return [text] if text else []
  return [text[i:i + n] for i in range(len(text) - n + 1)]


def bm25_run(passage_ids: list[str], passage_texts: list[str], query_ids: list[str], queries: list[str],
             depth: int = 100, k1: float = 0.9, b: float = 0.4) -> dict[str, dict[str, float]]:
  retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
  retriever.index([char_ngrams(text) for text in passage_texts], show_progress=False)
  query_grams = [list(dict.fromkeys(char_ngrams(query))) or ["<empty>"] for query in queries]
  positions, scores = retriever.retrieve(query_grams, k=min(depth, len(passage_ids)), show_progress=False)
  ids = np.asarray(passage_ids, dtype=object)
  return {qid: {ids[p]: float(s) for p, s in zip(row_positions, row_scores) if s > 0}
          for qid, row_positions, row_scores in zip(query_ids, positions, scores)}
