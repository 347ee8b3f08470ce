"""Exact flat search beside IVF-PQ, IVF-Flat and HNSW on one float16 shard, through axl_jax.search.

    python bench/search.py                                  # 200K x 384, 1,000 queries, depth 100
    python bench/search.py --passages=1000000 --dim=768     # one production-sized shard

Random clustered vectors stored as float16, queries drawn the same way: ``--centres`` Gaussian centres,
and around each centre noise of ``--spread`` times their spread in a random ``--latent_dim``-dimensional
subspace plus a tenth of that in every dimension (text embeddings are anisotropic, of low intrinsic
dimension); ``--latent_dim=0`` makes the noise isotropic. Recall depends on this shape: measure both.

Per index: build s (from the float16 shard: flat converts and adds, IVF trains on its sample and adds,
HNSW inserts) and index MB (the ``faiss.write_index`` file); then per search-time setting: search s and
queries/s of ``search.search_shards`` reading the saved index (flat: building it again from the shard,
which is what evaluation does), and Recall@depth against the flat run. Uses every GPU FAISS sees.
A benchmark, never a test: it asserts nothing.
"""
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TQDM_DISABLE", "1")  # search's per-shard progress bar would break the table

import faiss
import numpy as np
from absl import app, flags

from axl_jax import search

flags.DEFINE_integer("passages", 200_000, "Passages in the shard.")
flags.DEFINE_integer("dim", 384, "Embedding dimension.")
flags.DEFINE_integer("queries", 1000, "Queries.")
flags.DEFINE_integer("depth", 100, "Hits per query; recall is Recall@depth.")
flags.DEFINE_integer("centres", 2000, "Cluster centres of the synthetic data.")
flags.DEFINE_float("spread", 1.0, "Noise around a centre, relative to the spread of the centres.")
flags.DEFINE_integer("latent_dim", 64, "Dimensions the noise around a centre spans (0: all, isotropic).")
flags.DEFINE_integer("ivf_lists", 1024, "IVF lists (the evaluation default, 4096, is sized for 1M passages).")
flags.DEFINE_integer("pq_subquantizers", 48, "PQ bytes per passage (384 / 48 = 8 dimensions each).")
flags.DEFINE_list("nprobe", ["16", "64", "128"], "IVF lists visited per query, one row each.")
flags.DEFINE_integer("hnsw_neighbors", 32, "HNSW M.")
flags.DEFINE_integer("hnsw_ef_construction", 80, "HNSW efConstruction.")
flags.DEFINE_list("ef_search", ["128", "256", "512"], "HNSW efSearch, one row each.")
flags.DEFINE_integer("threads", 0, "FAISS OpenMP threads (0: FAISS's default, one per core).")
FLAGS = flags.FLAGS


def synthetic(rng, count, centres, basis):
  labels = rng.integers(0, len(centres), count)
  if basis is None:
    noise = rng.normal(size=(count, FLAGS.dim)).astype(np.float32)
  else:
    noise = rng.normal(size=(count, len(basis))).astype(np.float32) @ basis
    noise += 0.1 * rng.normal(size=(count, FLAGS.dim)).astype(np.float32)
  return (centres[labels] + FLAGS.spread * noise) / np.sqrt(FLAGS.dim)


def timed(fn):
  start = time.perf_counter()
  value = fn()
  return value, time.perf_counter() - start


def main(argv):
  del argv
  if FLAGS.threads:
    faiss.omp_set_num_threads(FLAGS.threads)
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(FLAGS.centres, FLAGS.dim)).astype(np.float32)
  basis = None
  if FLAGS.latent_dim:  # orthonormal rows scaled so that the noise has the norm of isotropic noise
    basis = np.linalg.qr(rng.normal(size=(FLAGS.dim, FLAGS.latent_dim)))[0].T.astype(np.float32)
    basis *= np.sqrt(FLAGS.dim / FLAGS.latent_dim)
  shard = synthetic(rng, FLAGS.passages, centres, basis).astype(np.float16)
  queries = synthetic(rng, FLAGS.queries, centres, basis).astype(np.float16)
  ids = [f"d{i}" for i in range(FLAGS.passages)]
  print(f"{FLAGS.passages} x {FLAGS.dim} float16 passages ({FLAGS.centres} centres, spread {FLAGS.spread}, "
        f"latent_dim {FLAGS.latent_dim}), {FLAGS.queries} queries, depth {FLAGS.depth}, "
        f"FAISS {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {faiss.get_num_gpus()} GPUs\n")
  rows = []
  with tempfile.TemporaryDirectory() as index_dir:
    exact_index, build = timed(lambda: search.exact_index(shard))
    path = os.path.join(index_dir, "flat.faiss")
    search.write_index(exact_index if faiss.get_num_gpus() == 0 else faiss.index_gpu_to_cpu(exact_index), path)
    del exact_index
    (_, exact_ids), seconds = timed(lambda: search.search_shards(queries, [(ids, shard)], FLAGS.depth))
    rows.append(("flat (exact)", "", build, os.path.getsize(path), seconds, 1.0))

    options = dict(ivf_lists=FLAGS.ivf_lists, hnsw_neighbors=FLAGS.hnsw_neighbors,
                   hnsw_ef_construction=FLAGS.hnsw_ef_construction)
    builds = [("ivf", dict(options, pq_subquantizers=FLAGS.pq_subquantizers), "nprobe", FLAGS.nprobe),
              ("ivf", dict(options, pq_subquantizers=0), "nprobe", FLAGS.nprobe),
              ("hnsw", options, "hnsw_ef_search", FLAGS.ef_search)]
    for kind, build_options, setting, values in builds:
      parameters = search.IndexOptions(**build_options)
      index, build = timed(lambda: search.build_approximate_index(shard, kind, parameters))
      path = search.index_path(index_dir, search.shard_stem(0, ids), kind, parameters)
      search.write_index(index, path)
      del index
      for value in values:
        (_, found), seconds = timed(lambda: search.search_shards(
            queries, [(ids, None)], FLAGS.depth, kind, index_dir, **build_options, **{setting: int(value)}))
        name = {"ivf": f"IVF{FLAGS.ivf_lists},PQ{FLAGS.pq_subquantizers}x8" if parameters.pq_subquantizers else
                f"IVF{FLAGS.ivf_lists},Flat", "hnsw": f"HNSW{FLAGS.hnsw_neighbors},Flat"}[kind]
        label = f"{'efSearch' if kind == 'hnsw' else 'nprobe'}={value}"
        recall = search.recall_at_k(exact_ids, found, FLAGS.depth)
        rows.append((name, label, build, os.path.getsize(path), seconds, recall))
  print(f"| index | search setting | build s | index MB | search s | queries/s | Recall@{FLAGS.depth} vs exact |")
  print("|---|---|---|---|---|---|---|")
  for name, setting, build, size, seconds, recall in rows:
    print(f"| {name} | {setting} | {build:.1f} | {size / 2**20:.1f} | {seconds:.2f} | {FLAGS.queries / seconds:.0f} "
          f"| {recall:.3f} |")


if __name__ == "__main__":
  app.run(main)
