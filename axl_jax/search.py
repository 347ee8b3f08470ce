"""FAISS search over exported embedding shards: exact inner product by default, IVF-PQ or HNSW on demand.

Each shard is indexed and searched on its own and the per-shard top-k lists are merged, so a corpus
larger than memory (or GPU memory) is searched one shard at a time; only one shard is ever converted to
float32, never the whole corpus. Shards may be float16 or float32 arrays.

Exact search (``kind="flat"``) is the default for evaluation. On GPUs it is a flat index stored and
computed in float16 (``GpuMultipleClonerOptions.useFloat16``) and split over every GPU
(``shard=True``); on a CPU it is ``IndexFlatIP`` in float32. The GPU code runs only when
``faiss.get_num_gpus() > 0``, so this module imports and its tests run on faiss-cpu.

Approximate search (``kind="ivf"``: ``IVF{lists},PQ{m}x8``, or ``IVF{lists},Flat`` with m = 0;
``kind="hnsw"``: HNSW over float32 vectors) builds one index per shard. With ``index_dir`` each index
is trained once, written there with ``faiss.write_index`` (atomically), and read back on later calls;
the file name holds the shard's position, a digest of its ids and the index parameters, so other
settings or another sharding never reuse it. Give each checkpoint its own ``index_dir``: the file
name cannot tell two checkpoints' embeddings of the same ids apart. Search-time options (nprobe,
efSearch) are not in the name: one saved index serves them all. IVF is searched on the GPUs when there
are any (cloned from the saved CPU index, float16 lookup tables, split over all GPUs) and its k-means
runs there; HNSW is CPU-only. A shard under ``EXACT_BELOW_PASSAGES`` passages is searched exactly
whatever the kind: its exact search is cheap, and PQ's k-means wants 39 x 256 training points.

GPU memory, JAX and FAISS in one process. JAX preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of every
GPU (0.75 unless set) when it first touches one, and keeps it while the encoder lives. FAISS allocates
with cudaMalloc outside that pool, so it has the remaining ``1 - fraction`` minus the CUDA context
(~0.5 GiB). main.py sets the variable from the config's ``jax_memory_fraction`` before JAX starts. FAISS
needs, per GPU, about ``faiss_gpu_bytes_per_device``: the shard's passages over the GPUs in float16
(``passages x dim x 2 / gpus``: 1.5 GiB for 1M x 768 on one GPU) plus the temporary memory reserved by
``StandardGpuResources.setTempMemory`` (``GPU_TEMP_MEMORY_BYTES``; FAISS never reserves more than
1.5 GiB), through which queries and results are paged. IVF-PQ needs less: ``m`` bytes plus an 8-byte
id per passage. ``search_shards_with_recall`` holds the exact and the approximate index of a shard at
once. The resources are made once per process (``gpu_resources``) and reused by every
search: each ``StandardGpuResources`` holds its streams, cuBLAS handle and temporary memory.

Not here: encoding, reading shards from disk (``embeddings.load_shards``) and choosing the kind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import faiss
import numpy as np
from tqdm import tqdm

from axl_jax.io import atomic_open

KINDS = ("flat", "ivf", "hnsw")

# Below this many passages a shard is searched exactly whatever the kind (see the module docstring).
EXACT_BELOW_PASSAGES = 10_000
# IVF training samples at most this many points per list (FAISS's own k-means cap), with a fixed seed:
# the same shard always gives the same index, and at most lists x 256 rows are converted to float32.
TRAINING_POINTS_PER_LIST = 256
TRAINING_SEED = 0
# Temporary GPU memory per device for FAISS; 1.5 GiB is FAISS's own default and upper bound.
GPU_TEMP_MEMORY_BYTES = 1536 * 2**20
# Rows converted from float16 to float32 at a time when adding to a CPU index: 192 MiB at dim 768.
ADD_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """Parameters of the approximate indexes; the build-time ones name the saved index file."""
  ivf_lists: int = 4096            # IVF lists; a shard gets at most one per 39 passages
  pq_subquantizers: int = 64       # PQ bytes per passage, must divide dim; 0 stores vectors flat (IVF,Flat)
  nprobe: int = 64                 # IVF lists visited per query (search time)
  hnsw_neighbors: int = 32         # HNSW M: links per node
  hnsw_ef_construction: int = 80   # HNSW candidates while building
  hnsw_ef_search: int = 256        # HNSW candidates while searching (search time; at least depth is used)

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value, least = getattr(self, field.name), 0 if field.name == "pq_subquantizers" else 1
      if not isinstance(value, int) or value < least:
        raise ValueError(f"search: {field.name} must be an integer >= {least}, got {value!r}")

  def file_tag(self, kind: str) -> str:
    """The build-time parameters of ``kind``, as they appear in the index file name."""
    if kind == "ivf":
      storage = f"pq{self.pq_subquantizers}x8" if self.pq_subquantizers else "flat"
      return f"ivf{self.ivf_lists}-{storage}"
    if kind == "hnsw":
      return f"hnsw{self.hnsw_neighbors}-efc{self.hnsw_ef_construction}"
    raise ValueError(f"search: only ivf and hnsw indexes are saved, got {kind!r}")


_gpu_resources: list = []
_gpu_temp_memory_bytes: int | None = None


def gpu_resources(temp_memory_bytes: int | None = None) -> list:
  """One ``faiss.StandardGpuResources`` per GPU, made on the first call and reused for the process.

  Empty without GPUs. The first call fixes the temporary memory per GPU (``GPU_TEMP_MEMORY_BYTES`` when
  None): call this with another size before the first search to change it. Asking later for another
  size is an error rather than a second set of reservations.
  """
  global _gpu_temp_memory_bytes
  if faiss.get_num_gpus() == 0:
    return []
  if not _gpu_resources:
    _gpu_temp_memory_bytes = GPU_TEMP_MEMORY_BYTES if temp_memory_bytes is None else temp_memory_bytes
    for _ in range(faiss.get_num_gpus()):
      resources = faiss.StandardGpuResources()
      resources.setTempMemory(_gpu_temp_memory_bytes)
      _gpu_resources.append(resources)
  elif temp_memory_bytes is not None and temp_memory_bytes != _gpu_temp_memory_bytes:
    raise ValueError(f"search: FAISS GPU resources already reserve {_gpu_temp_memory_bytes} bytes of temporary "
                     f"memory per GPU; cannot change it to {temp_memory_bytes} in the same process")
  return _gpu_resources


def faiss_gpu_bytes_per_device(passages_per_shard: int, dim: int, gpus: int,
                               temp_memory_bytes: int = GPU_TEMP_MEMORY_BYTES) -> int:
  """GPU memory exact search needs on each GPU: a float16 shard split over ``gpus``, plus temp memory.

  Compare with ``(1 - jax_memory_fraction) x GPU memory`` less ~0.5 GiB of CUDA context.
  """
  return math.ceil(passages_per_shard / gpus) * dim * 2 + temp_memory_bytes


def _cloner_options():
  options = faiss.GpuMultipleClonerOptions()
  options.useFloat16 = True  # flat: float16 storage and GEMM; IVF-PQ: float16 lookup tables
  options.shard = True       # each GPU holds 1/n of the shard, rather than a copy of all of it
  return options


def _to_gpus(index):
  return faiss.index_cpu_to_gpu_multiple_py(gpu_resources(), index, _cloner_options())


def _float32(embeddings: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(embeddings, dtype=np.float32)


def exact_index(embeddings: np.ndarray):
  """An exact inner-product index over ``embeddings`` (float16 or float32): float16 on all GPUs, else CPU."""
  if faiss.get_num_gpus() > 0:
    index = _to_gpus(faiss.IndexFlatIP(embeddings.shape[1]))
    # A sharded GPU index takes one add() only (IndexShards with successive ids); FAISS pages it to the GPUs.
    index.add(_float32(embeddings))
    return index
  index = faiss.IndexFlatIP(embeddings.shape[1])
  for start in range(0, len(embeddings), ADD_ROWS):
    index.add(_float32(embeddings[start:start + ADD_ROWS]))
  return index


def training_sample(embeddings: np.ndarray, lists: int) -> np.ndarray:
  """At most ``lists x TRAINING_POINTS_PER_LIST`` rows of ``embeddings`` as float32, the same each time."""
  size = min(len(embeddings), lists * TRAINING_POINTS_PER_LIST)
  if size == len(embeddings):
    return _float32(embeddings)
  rows = np.sort(np.random.default_rng(TRAINING_SEED).choice(len(embeddings), size=size, replace=False))
  return _float32(embeddings[rows])


def build_approximate_index(embeddings: np.ndarray, kind: str, options: IndexOptions):
  """A CPU ``ivf`` or ``hnsw`` index over ``embeddings``, trained and filled (k-means on GPU 0 if any)."""
  passages, dim = embeddings.shape
  if kind == "ivf":
    if options.pq_subquantizers and dim % options.pq_subquantizers:
      raise ValueError(f"search: pq_subquantizers={options.pq_subquantizers} must divide the embedding "
                       f"dimension {dim}")
    # Fewer than ~39 points per list makes k-means complain; small shards get fewer lists.
    lists = max(1, min(options.ivf_lists, passages // 39))
    # "np": no polysemous training, which takes minutes and serves only Hamming-filtered search we never use.
    storage = f"PQ{options.pq_subquantizers}x8np" if options.pq_subquantizers else "Flat"
    index = faiss.index_factory(dim, f"IVF{lists},{storage}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    gpu_quantizer = None
    if faiss.get_num_gpus() > 0:
      # k-means assigns with this index instead of the CPU quantizer; the trained index stays on the CPU.
      gpu_quantizer = faiss.index_cpu_to_gpu(gpu_resources()[0], 0, faiss.IndexFlat(dim, faiss.METRIC_INNER_PRODUCT))
      ivf.clustering_index = gpu_quantizer
    index.train(training_sample(embeddings, lists))
    ivf.clustering_index = None  # it would dangle once gpu_quantizer is freed
  elif kind == "hnsw":
    index = faiss.IndexHNSWFlat(dim, options.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = options.hnsw_ef_construction
  else:
    raise ValueError(f"search: an approximate index is ivf or hnsw, got {kind!r}")
  for start in range(0, passages, ADD_ROWS):
    index.add(_float32(embeddings[start:start + ADD_ROWS]))
  return index


def shard_stem(position: int, ids: list[str]) -> str:
  """``shard00003-<digest of the ids>``: a re-exported corpus with other shard bounds gets other names."""
  digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:12]
  return f"shard{position:05d}-{digest}"


def index_path(index_dir: str, stem: str, kind: str, options: IndexOptions) -> str:
  """Where the index of kind ``kind`` over the shard ``stem`` is saved: ``<dir>/<stem>.<params>.faiss``."""
  return os.path.join(index_dir, f"{stem}.{options.file_tag(kind)}.faiss")


def write_index(index, path: str) -> None:
  """``faiss.write_index`` to ``path`` atomically: readers see the old file or the whole new one."""
  with atomic_open(path, "wb") as file:
    faiss.write_index(index, faiss.PyCallbackIOWriter(file.write))


def saved_approximate_index(embeddings: np.ndarray | None, ids: list[str], kind: str, options: IndexOptions,
                            path: str | None):
  """The index at ``path`` if it is there, else one built now (and written to ``path`` when given)."""
  if path is not None and os.path.exists(path):
    index = faiss.read_index(path)
    if index.ntotal != len(ids):
      raise ValueError(f"{path}: the saved index holds {index.ntotal} passages but its shard has {len(ids)}; "
                       f"delete the file to rebuild it")
    return index
  if embeddings is None:
    raise ValueError(f"{path or 'search'}: no saved {kind} index, and the shard came without embeddings to build one")
  if len(embeddings) != len(ids):
    raise ValueError(f"search: a shard has {len(ids)} ids but {len(embeddings)} embeddings")
  index = build_approximate_index(embeddings, kind, options)
  if path is not None:
    write_index(index, path)
  return index


def _prepare_for_search(index, kind: str, options: IndexOptions, depth: int):
  """``index`` with its search-time options set, moved to the GPUs when it is IVF and there are any."""
  if kind == "ivf":
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(options.nprobe, ivf.nlist)  # set before cloning: the GPU copies take it with them
    if faiss.get_num_gpus() > 0:
      index = _to_gpus(index)
  elif kind == "hnsw":
    index.hnsw.efSearch = max(options.hnsw_ef_search, depth)
  return index


class _TopK:
  """The best ``depth`` (score, docid) per query over the shards seen so far."""

  def __init__(self, queries: int, depth: int):
    self.depth = depth
    self.scores = np.full((queries, 0), -np.inf, np.float32)
    self.ids = np.empty((queries, 0), dtype=object)

  def add(self, scores: np.ndarray, positions: np.ndarray, shard_ids: np.ndarray) -> None:
    found = np.where(positions >= 0, shard_ids[np.maximum(positions, 0)], None)
    self.add_hits(np.where(positions >= 0, scores, -np.inf), found)

  def add_hits(self, scores: np.ndarray, found: np.ndarray) -> None:
    """Hits as ``[Q, k]`` scores and docids (None and -inf where there is no hit)."""
    merged_scores = np.concatenate([self.scores, scores], axis=1)
    merged_ids = np.concatenate([self.ids, found], axis=1)
    # Stable: an earlier shard's passage wins a tie, as one exact search over the corpus in order would.
    order = np.argsort(-merged_scores, axis=1, kind="stable")[:, :self.depth]
    self.scores = np.take_along_axis(merged_scores, order, axis=1)
    self.ids = np.take_along_axis(merged_ids, order, axis=1)

  def result(self) -> tuple[np.ndarray, list[list[str]]]:
    return self.scores, [[d for d in row if d is not None] for row in self.ids]


def _search(queries, shards, depth: int, kind: str, index_dir: str | None, options: IndexOptions,
            recall_rows: np.ndarray | None):
  if kind not in KINDS:
    raise ValueError(f"evaluate.index must be flat, ivf or hnsw, got {kind!r}")
  queries = _float32(queries)
  found = _TopK(len(queries), depth)
  exact = _TopK(len(recall_rows), depth) if recall_rows is not None else None
  for position, (ids, embeddings) in enumerate(tqdm(shards, desc="search", unit="shard", leave=False)):
    k = min(depth, len(ids))
    if k == 0:
      continue
    shard_ids = np.asarray(ids, dtype=object)
    exact_shard = None
    if kind == "flat" or len(ids) < EXACT_BELOW_PASSAGES or exact is not None:
      if embeddings is None:
        raise ValueError(f"search: shard {position} came without embeddings, which exact search needs")
      exact_shard = exact_index(embeddings)
    if kind == "flat" or len(ids) < EXACT_BELOW_PASSAGES:
      index = exact_shard
    else:
      path = index_path(index_dir, shard_stem(position, ids), kind, options) if index_dir else None
      index = _prepare_for_search(saved_approximate_index(embeddings, ids, kind, options, path), kind, options, k)
    found.add(*index.search(queries, k), shard_ids)
    if exact is not None:
      exact.add(*exact_shard.search(queries[recall_rows], k), shard_ids)
    # Free this shard (host and GPU) before the iterator loads the next: one shard in memory, not two.
    del ids, embeddings, shard_ids, exact_shard, index
  return found.result(), exact.result() if exact is not None else None


def merge_top_k(parts: list[tuple[np.ndarray, list[list[str]]]], depth: int) -> tuple[np.ndarray, list[list[str]]]:
  """The top ``depth`` over ``search_shards`` results of consecutive blocks of shards, given in shard order
  (so an earlier block wins a tie, as in one search over all the shards): a multi-process search's merge."""
  top = _TopK(len(parts[0][0]), depth)
  for scores, docids in parts:
    found = np.full(np.shape(scores), None, dtype=object)
    for row, ids in enumerate(docids):
      found[row, :len(ids)] = ids
    top.add_hits(np.where(found != None, np.asarray(scores, np.float32), -np.inf), found)  # noqa: E711
  return top.result()


def search_shards(queries: np.ndarray, shards, depth: int, kind: str = "flat", index_dir: str | None = None,
                  **index_options) -> tuple[np.ndarray, list[list[str]]]:
  """Top-``depth`` ``(scores [Q, depth], docids [Q][<= depth])`` of ``queries`` over ``(ids, embeddings)`` shards.

  ``kind`` is flat, ivf or hnsw; ``index_options`` are ``IndexOptions`` fields. With ``index_dir``, approximate
  indexes are saved there and reused, and a shard whose index is saved may come with ``embeddings=None``.
  Scores of missing hits (a corpus smaller than ``depth``) are -inf.
  """
  (scores, docids), _ = _search(queries, shards, depth, kind, index_dir, IndexOptions(**index_options), None)
  return scores, docids


def recall_rows(queries: int, recall_queries: int) -> np.ndarray:
  """``recall_queries`` query rows spread evenly over ``queries`` (all of them when there are fewer)."""
  return np.unique(np.linspace(0, queries - 1, min(queries, recall_queries)).round().astype(np.int64))


def search_shards_with_recall(queries: np.ndarray, shards, depth: int, kind: str, index_dir: str | None = None,
                              recall_queries: int = 1000, **index_options
                              ) -> tuple[np.ndarray, list[list[str]], float | None]:
  """``search_shards`` plus the Recall@``depth`` of its hits against exact search over the same shards.

  The shards are read once: each is searched with ``kind`` for all queries and exactly for
  ``recall_queries`` of them (``recall_rows``). Recall is None for flat, which is the exact search.
  """
  rows = recall_rows(len(queries), recall_queries) if kind != "flat" else None
  (scores, docids), exact = _search(queries, shards, depth, kind, index_dir, IndexOptions(**index_options), rows)
  if exact is None:
    return scores, docids, None
  return scores, docids, recall_at_k(exact[1], [docids[row] for row in rows], depth)


def recall_at_k(exact_docids: list[list[str]], approximate_docids: list[list[str]], k: int) -> float:
  """Share of each query's exact top-``k`` docids that the approximate top-``k`` also found, averaged.

  Queries whose exact list is empty (an empty corpus) are left out; with none left it is 1.0.
  """
  if len(exact_docids) != len(approximate_docids):
    raise ValueError(f"recall: {len(exact_docids)} exact rankings but {len(approximate_docids)} approximate ones")
  shares = [len(set(exact[:k]) & set(approximate[:k])) / len(exact[:k])
            for exact, approximate in zip(exact_docids, approximate_docids) if exact[:k]]
  return float(np.mean(shares)) if shares else 1.0


def to_run(query_ids: list[str], scores: np.ndarray, docids: list[list[str]]) -> dict[str, dict[str, float]]:
  """``{qid: {docid: score}}`` of the hits; each float32 score becomes the double of the same value."""
  return {qid: {d: float(s) for d, s in zip(row_ids, row_scores)}
          for qid, row_ids, row_scores in zip(query_ids, docids, scores)}
