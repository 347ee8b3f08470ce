"""FAISS search over exported embedding shards: exact inner product by default, IVF or HNSW on demand.

Each shard is indexed and searched on its own and the per-shard top-k lists are merged, so a corpus
larger than memory (or GPU memory) is searched one shard at a time. FAISS uses every GPU it sees.
"""
from __future__ import annotations

import faiss
import numpy as np
from tqdm import tqdm


def build_index(embeddings: np.ndarray, kind: str = "flat", ivf_lists: int = 4096, hnsw_neighbors: int = 32):
  dim = embeddings.shape[1]
  if kind == "flat":
    index = faiss.IndexFlatIP(dim)
  elif kind == "ivf":
    # Fewer lists than ~39 points each makes k-means complain; small shards get fewer lists.
    lists = max(1, min(ivf_lists, embeddings.shape[0] // 39))
    index = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(embeddings)
    index.nprobe = max(1, lists // 16)
  elif kind == "hnsw":
    index = faiss.IndexHNSWFlat(dim, hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
  else:
    raise ValueError(f"evaluate.index must be flat, ivf or hnsw, got {kind!r}")
  if kind != "hnsw" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
    index = faiss.index_cpu_to_all_gpus(index)
  index.add(embeddings)
  return index


def search_shards(queries: np.ndarray, shards, depth: int, kind: str = "flat", **index_options):
  """Top-``depth`` ``(scores [Q, k], docids [Q][k])`` of ``queries`` over ``(ids, embeddings)`` shards."""
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  best_scores = np.full((len(queries), 0), -np.inf, np.float32)
  best_ids = np.empty((len(queries), 0), dtype=object)
  for ids, embeddings in tqdm(shards, desc="search", unit="shard", leave=False):
    k = min(depth, len(ids))
    if k == 0:
      continue
    index = build_index(np.ascontiguousarray(embeddings, dtype=np.float32), kind, **index_options)
    scores, positions = index.search(queries, k)
    shard_ids = np.asarray(ids, dtype=object)
    found = np.where(positions >= 0, shard_ids[np.maximum(positions, 0)], None)
    scores = np.where(positions >= 0, scores, -np.inf)
    best_scores = np.concatenate([best_scores, scores], axis=1)
    best_ids = np.concatenate([best_ids, found], axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")[:, :depth]
    best_scores = np.take_along_axis(best_scores, order, axis=1)
    best_ids = np.take_along_axis(best_ids, order, axis=1)
  docids = [[d for d in row if d is not None] for row in best_ids]
  return best_scores, docids


def to_run(query_ids: list[str], scores: np.ndarray, docids: list[list[str]]) -> dict[str, dict[str, float]]:
  """``{qid: {docid: score}}`` of the hits; each float32 score becomes the double of the same value."""
  return {qid: {d: float(s) for d, s in zip(row_ids, row_scores)}
          for qid, row_ids, row_scores in zip(query_ids, docids, scores)}
