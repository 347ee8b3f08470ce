"""Search over embedding shards against numpy's exact search, saved indexes against a first build, recall
against a hand count, the GPU wiring against a fake GPU faiss; BM25's run-file reader and size limit."""
import os
import types

import faiss
import numpy as np
import pytest

from axl_jax import bm25, search


def clustered(passages: int, queries: int, dim: int = 32, seed: int = 0):
  """Passages and queries around 40 shared centres: the shape of real embeddings, with near-ties."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(40, dim))
  corpus = centres[rng.integers(0, 40, passages)] + 0.5 * rng.normal(size=(passages, dim))
  probes = centres[rng.integers(0, 40, queries)] + 0.5 * rng.normal(size=(queries, dim))
  return corpus.astype(np.float32), probes.astype(np.float32)


def exact_top(queries: np.ndarray, corpus: np.ndarray, ids: list[str], depth: int) -> list[list[str]]:
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  return [[ids[i] for i in np.argsort(-row, kind="stable")[:depth]] for row in scores]


@pytest.fixture(autouse=True)
def one_faiss_thread():
  # FAISS's OpenMP threads spin-wait at each barrier: on a small machine with other work running, two
  # threads train these tiny indexes several times slower than one. Results do not depend on it.
  threads = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(threads)


# Large enough for an approximate index (search.EXACT_BELOW_PASSAGES), small enough to build in a second.
PASSAGES = 12_000
IVF = dict(ivf_lists=16, pq_subquantizers=8, nprobe=4)
HNSW = dict(hnsw_neighbors=8, hnsw_ef_construction=20, hnsw_ef_search=20)


def test_shard_merge_equals_one_exact_search(monkeypatch):
  monkeypatch.setattr(search, "ADD_ROWS", 7)  # shards reach the CPU index in several pieces
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


def test_a_corpus_smaller_than_depth_returns_all_of_it():
  corpus, queries = clustered(30, 3, dim=8)
  ids = [f"d{i}" for i in range(30)]
  scores, docids = search.search_shards(queries, [(ids[:10], corpus[:10]), ([], corpus[:0]), (ids[10:], corpus[10:])],
                                        depth=100)
  assert docids == exact_top(queries, corpus, ids, 100)
  assert scores.shape == (3, 30)


def test_float16_shards_give_the_float32_top_k(monkeypatch):
  monkeypatch.setattr(search, "ADD_ROWS", 500)
  depth = 10
  corpus, queries = clustered(3000, 200, dim=32, seed=1)
  ids = [f"d{i}" for i in range(3000)]
  half = corpus.astype(np.float16)
  # Non-contiguous float16 views, as a caller slicing a memory-mapped array would pass.
  shards = [(ids[i:i + 1000], half[i:i + 1000][:, :]) for i in range(0, 3000, 1000)]
  scores, docids = search.search_shards(queries, shards, depth)
  reference = exact_top(queries, corpus, ids, depth)
  # Rounding to float16 moves each score by at most |q| |x - fp16(x)|: where the gaps between the float32
  # scores of ranks 1..depth+1 are wider than twice that, the rankings must agree.
  error = np.linalg.norm(queries, axis=1) * np.linalg.norm(corpus - half.astype(np.float32), axis=1).max()
  full = np.sort(queries @ corpus.T, axis=1)[:, ::-1][:, :depth + 1]
  separated = np.flatnonzero(np.diff(-full, axis=1).min(axis=1) > 2 * error)
  assert len(separated) >= 50  # the check below is not vacuous (88 of the 200 queries here)
  for row in separated:
    assert docids[row] == reference[row]
  # The scores are those of the float16 vectors, computed in float32.
  by_id = dict(zip(ids, half.astype(np.float32)))
  for row in range(5):
    np.testing.assert_allclose(scores[row], [queries[row] @ by_id[d] for d in docids[row]], rtol=1e-5)


def test_recall_at_k_hand_worked():
  exact = [["a", "b", "c"], ["d", "e"], []]
  approximate = [["a", "c", "x"], ["e", "f"], ["g"]]
  # k=3: q1 finds a, c of a, b, c (2/3); q2 finds e of d, e (1/2); q3 has no exact hits and is left out.
  assert search.recall_at_k(exact, approximate, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
  # k=2: q1's exact top 2 is a, b and its approximate top 2 is a, c (1/2); q2 as before (1/2).
  assert search.recall_at_k(exact, approximate, 2) == pytest.approx(0.5)
  assert search.recall_at_k([[]], [[]], 5) == 1.0
  with pytest.raises(ValueError, match="2 exact rankings but 1 approximate"):
    search.recall_at_k(exact[:2], approximate[:1], 3)


@pytest.mark.parametrize("kind, options", [("ivf", IVF), ("hnsw", HNSW), ("ivf", dict(IVF, pq_subquantizers=0))])
def test_reported_recall_is_a_hand_count_against_exact_search(tmp_path, kind, options):
  depth = 20
  corpus, queries = clustered(PASSAGES + 700, 60)
  ids = [f"d{i}" for i in range(len(corpus))]
  shards = [(ids[:PASSAGES], corpus[:PASSAGES]), (ids[PASSAGES:], corpus[PASSAGES:])]  # approximate + exact
  scores, docids, recall = search.search_shards_with_recall(queries, shards, depth, kind, str(tmp_path),
                                                            recall_queries=25, **options)
  rows = search.recall_rows(len(queries), 25)
  assert len(rows) == 25 and rows[0] == 0 and rows[-1] == len(queries) - 1
  reference = exact_top(queries[rows], corpus, ids, depth)
  found = sum(len(set(reference[i]) & set(docids[row])) for i, row in enumerate(rows))
  assert recall == pytest.approx(found / (25 * depth))
  assert 0.5 < recall  # the index works
  if kind == "ivf" and options["pq_subquantizers"]:
    assert recall < 0.99  # PQ is lossy: the hits are the index's, not an exact search's
  assert len(os.listdir(tmp_path)) == 1  # the small shard was searched exactly, with nothing saved
  # The approximate scores are the index's own, sorted.
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_nprobe_and_ef_search_reach_the_index():
  # IVF,Flat visiting every list is an exact search; one list of 64 is not. HNSW likewise with its beam.
  corpus, queries = clustered(PASSAGES, 30)
  ids = [f"d{i}" for i in range(PASSAGES)]
  exact = exact_top(queries, corpus, ids, 20)
  recall = lambda kind, **options: search.recall_at_k(
      exact, search.search_shards(queries, [(ids, corpus)], 20, kind, **options)[1], 20)
  assert recall("ivf", ivf_lists=64, pq_subquantizers=0, nprobe=64) == 1.0
  assert recall("ivf", ivf_lists=64, pq_subquantizers=0, nprobe=1) < 0.9
  assert recall("hnsw", **dict(HNSW, hnsw_ef_search=20)) < recall("hnsw", **dict(HNSW, hnsw_ef_search=400))


def test_flat_reports_no_recall():
  corpus, queries = clustered(100, 4, dim=8)
  ids = [f"d{i}" for i in range(100)]
  _, docids, recall = search.search_shards_with_recall(queries, [(ids, corpus)], 10, "flat")
  assert recall is None and docids == exact_top(queries, corpus, ids, 10)


@pytest.mark.parametrize("kind, options", [("ivf", IVF), ("hnsw", HNSW)])
def test_a_saved_index_is_written_once_and_reused(tmp_path, monkeypatch, kind, options):
  corpus, queries = clustered(PASSAGES, 20)
  ids = [f"d{i}" for i in range(PASSAGES)]
  first = search.search_shards(queries, [(ids, corpus.astype(np.float16))], 10, kind, str(tmp_path), **options)
  [name] = os.listdir(tmp_path)
  path = tmp_path / name
  assert name == f"{search.shard_stem(0, ids)}.{search.IndexOptions(**options).file_tag(kind)}.faiss"
  before = os.stat(path)

  def no_training(*args, **kwargs):
    raise AssertionError("the saved index was rebuilt")

  monkeypatch.setattr(search, "build_approximate_index", no_training)
  again = search.search_shards(queries, [(ids, corpus.astype(np.float16))], 10, kind, str(tmp_path), **options)
  # A saved index needs no embeddings at all: a caller can skip reading them from disk.
  without = search.search_shards(queries, [(ids, None)], 10, kind, str(tmp_path), **options)
  after = os.stat(path)
  assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
  for result in (again, without):
    np.testing.assert_array_equal(result[0], first[0])
    assert result[1] == first[1]
  assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_index_files_are_named_by_their_build_parameters(tmp_path):
  corpus, queries = clustered(PASSAGES, 5)
  ids = [f"d{i}" for i in range(PASSAGES)]
  for kind, options in [("ivf", IVF), ("ivf", dict(IVF, nprobe=8)), ("ivf", dict(IVF, pq_subquantizers=4)),
                        ("ivf", dict(IVF, pq_subquantizers=0)), ("ivf", dict(IVF, ivf_lists=32)),
                        ("hnsw", HNSW), ("hnsw", dict(HNSW, hnsw_ef_search=40))]:
    search.search_shards(queries, [(ids, corpus)], 5, kind, str(tmp_path), **options)
  stem = search.shard_stem(0, ids)
  # nprobe and efSearch are search-time options: they reuse the file built without them.
  assert sorted(os.listdir(tmp_path)) == sorted(f"{stem}.{tag}.faiss" for tag in [
      "ivf16-pq8x8", "ivf16-pq4x8", "ivf16-flat", "ivf32-pq8x8", "hnsw8-efc20"])
  # Other ids in the same position (a re-exported corpus) get another stem.
  assert search.shard_stem(0, ids[1:] + ids[:1]) != stem and search.shard_stem(1, ids) != stem


def test_a_stale_index_is_refused_with_its_path(tmp_path):
  corpus, _ = clustered(PASSAGES, 1)
  ids = [f"d{i}" for i in range(PASSAGES)]
  options = search.IndexOptions(**HNSW)
  path = str(tmp_path / "stale.faiss")
  search.write_index(faiss.IndexHNSWFlat(32, 8, faiss.METRIC_INNER_PRODUCT), path)
  with pytest.raises(ValueError, match=f"{path}: the saved index holds 0 passages but its shard has {PASSAGES}"):
    search.saved_approximate_index(corpus, ids, "hnsw", options, path)
  with pytest.raises(ValueError, match="came without embeddings"):
    search.saved_approximate_index(None, ids, "hnsw", options, str(tmp_path / "missing.faiss"))


def test_small_shards_are_searched_exactly_whatever_the_kind(tmp_path):
  corpus, queries = clustered(search.EXACT_BELOW_PASSAGES - 1, 5, dim=8)
  ids = [f"d{i}" for i in range(len(corpus))]
  _, docids = search.search_shards(queries, [(ids, corpus)], 10, "ivf", str(tmp_path), **IVF)
  assert docids == exact_top(queries, corpus, ids, 10) and os.listdir(tmp_path) == []


def test_bad_options_name_the_field():
  with pytest.raises(ValueError, match="pq_subquantizers=5 must divide the embedding dimension 32"):
    search.build_approximate_index(np.zeros((100, 32), np.float32), "ivf", search.IndexOptions(pq_subquantizers=5))
  with pytest.raises(ValueError, match="nprobe must be an integer >= 1, got 0"):
    search.IndexOptions(nprobe=0)
  with pytest.raises(TypeError, match="ivf_list"):
    search.search_shards(np.zeros((1, 4), np.float32), [], 10, "ivf", ivf_list=8)
  with pytest.raises(ValueError, match="evaluate.index must be flat, ivf or hnsw, got 'pq'"):
    search.search_shards(np.zeros((1, 4), np.float32), [], 10, "pq")


class FakeGpuFaiss:
  """What the GPU code asks of faiss, recorded; the 'GPU' indexes are the CPU ones."""

  def __init__(self, monkeypatch, gpus: int):
    self.resources, self.clones = [], []
    fake = self

    class StandardGpuResources:
      def __init__(self):
        self.temp_memory = None
        fake.resources.append(self)

      def setTempMemory(self, size):
        self.temp_memory = size

    def index_cpu_to_gpu_multiple_py(resources, index, options):
      nprobe = faiss.extract_index_ivf(index).nprobe if isinstance(index, faiss.IndexIVF) else None
      fake.clones.append((resources, type(index).__name__, options, nprobe))
      return index

    monkeypatch.setattr(search, "_gpu_resources", [])
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus)
    monkeypatch.setattr(faiss, "StandardGpuResources", StandardGpuResources, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", index_cpu_to_gpu_multiple_py, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda resources, device, index: index, raising=False)


def test_gpu_resources_are_made_once_and_indexes_go_to_every_gpu_in_float16(monkeypatch, tmp_path):
  fake = FakeGpuFaiss(monkeypatch, gpus=2)
  corpus, queries = clustered(PASSAGES, 10)
  ids = [f"d{i}" for i in range(PASSAGES)]
  for _ in range(2):
    _, docids = search.search_shards(queries, [(ids[:6000], corpus[:6000]), (ids[6000:], corpus[6000:])], 10)
    assert docids == exact_top(queries, corpus, ids, 10)
  search.search_shards(queries, [(ids, corpus)], 10, "ivf", str(tmp_path), **IVF)
  assert len(fake.resources) == 2  # one per GPU, for the whole process
  assert all(r.temp_memory == search.GPU_TEMP_MEMORY_BYTES for r in fake.resources)
  assert [(name, nprobe) for _, name, _, nprobe in fake.clones] == [("IndexFlatIP", None)] * 4 + [("IndexIVFPQ", 4)]
  for resources, _, options, _ in fake.clones:
    assert resources == fake.resources and options.useFloat16 and options.shard
  assert search.gpu_resources() is search.gpu_resources(search.GPU_TEMP_MEMORY_BYTES)
  with pytest.raises(ValueError, match="cannot change it to 1024"):
    search.gpu_resources(1024)


def test_gpu_temporary_memory_is_set_by_the_first_call(monkeypatch):
  fake = FakeGpuFaiss(monkeypatch, gpus=1)
  search.gpu_resources(2**28)
  corpus, queries = clustered(100, 2, dim=8)
  search.search_shards(queries, [([f"d{i}" for i in range(100)], corpus)], 5)
  assert [r.temp_memory for r in fake.resources] == [2**28]


def test_faiss_gpu_bytes_per_device_by_hand():
  # 1M x 768 float16 on one GPU: 1,536,000,000 bytes; on 3 GPUs each holds ceil(1M / 3) = 333,334 rows.
  assert search.faiss_gpu_bytes_per_device(1_000_000, 768, 1, temp_memory_bytes=0) == 1_536_000_000
  assert search.faiss_gpu_bytes_per_device(1_000_000, 768, 3, temp_memory_bytes=10) == 333_334 * 1536 + 10
  assert search.faiss_gpu_bytes_per_device(1, 8, 1) == 16 + search.GPU_TEMP_MEMORY_BYTES


def test_bm25_ranks_the_matching_passage_first_in_any_script():
  passages = ["東京は日本の首都です", "大阪はたこ焼きで有名", "Paris is the capital of France"]
  run = bm25.bm25_run(["ja1", "ja2", "fr"], passages, ["q1", "q2"], ["日本の首都はどこ", "capital of France"])
  assert max(run["q1"], key=run["q1"].get) == "ja1"
  assert max(run["q2"], key=run["q2"].get) == "fr"


def test_bm25s_is_off_above_its_size_limit():
  assert bm25.bm25s_feasible(bm25.BM25S_MAX_PASSAGES)
  assert not bm25.bm25s_feasible(bm25.BM25S_MAX_PASSAGES + 1)
  assert bm25.bm25s_feasible(10, max_passages=10) and not bm25.bm25s_feasible(11, max_passages=10)


def test_read_run_file_keeps_the_asked_queries_and_depth(tmp_path):
  path = tmp_path / "run.mrtydi.bm25.sw.test.txt"
  # Pyserini's layout; the rank column is ignored (trec_eval does too), ties go to the larger docid.
  path.write_text("1 Q0 25267#12 1 12.500000 Anserini\n"
                  "1 Q0 9#0 2 11.000000 Anserini\n"
                  "1 Q0 8#0 3 11.000000 Anserini\n"
                  "1 Q0 7#1 9 13.000000 Anserini\n"
                  "2 Q0 5#5 1 4.000000 Anserini\n"
                  "other Q0 5#5 1 4.000000 Anserini\n")
  assert bm25.read_run_file(str(path), ["1", "2", "3"], depth=3) == {
      "1": {"7#1": 13.0, "25267#12": 12.5, "9#0": 11.0}, "2": {"5#5": 4.0}}


def test_read_run_file_errors_name_the_file_and_line(tmp_path):
  path = tmp_path / "run.txt"
  path.write_text("1 Q0 a 1 2.0 tag\n1 Q0 b 2\n")
  with pytest.raises(ValueError, match=rf"{path}:2: expected 'qid iter docid rank score tag'"):
    bm25.read_run_file(str(path), ["1"], 10)
  path.write_text("1 Q0 a 1 2.0 tag\n")
  with pytest.raises(ValueError, match=rf"{path}: lists none of the 2 queries \(first: 'x', 'y'\); it lists "
                                       rf"queries '1'"):
    bm25.read_run_file(str(path), ["x", "y"], 10)


def test_read_run_file_names_a_bad_score(tmp_path):
  path = tmp_path / "run.txt"
  path.write_text("1 Q0 a 1 2.0 tag\n1 Q0 b 2 high tag\n")
  with pytest.raises(ValueError, match=rf"{path}:2: .*score"):
    bm25.read_run_file(str(path), ["1"], 10)
