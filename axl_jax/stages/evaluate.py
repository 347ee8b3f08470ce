"""The ``evaluate`` stage: BM25, the stages of ``evaluate.also_checkpoints`` and the final model, per language.

Dense retrieval is FAISS over each checkpoint's embedding shards (encoded once per checkpoint, kept under
``<workdir>/embeddings/``). Writes TREC run files (``runs/<system>.<lang>.<split>.trec``), ``results.json``
(``{system: {language: metrics}}``, equal to trec_eval on those files) and ``results.md``. In a run of several
processes each searches one block of the shards and process 0 merges the hits, writes the files and shares
the metrics with the others.
"""
from __future__ import annotations

import contextlib
import os

import jax
import numpy as np
from absl import logging

from axl_jax import bm25, checkpoints, data, distributed, embeddings, io, metrics, prepared, search, significance
from axl_jax.stages import StageResult, training

EXPENSIVE = False


def final_checkpoint(config, field_value: str, available, field: str) -> list[str]:
  """The training stage whose checkpoint is evaluated or exported (none when ``field_value`` names a path)."""
  if field_value:
    return []
  stage = training.previous_stage(config, None, available)
  if stage is None:
    raise FileNotFoundError(f"{field}: no training stage is configured or complete; "
                            f"set --config.{field}.checkpoint=PATH to a stage's checkpoints directory")
  return [stage]


def _also(config) -> list[str]:
  return [s.strip() for s in config.evaluate.also_checkpoints.split(",") if s.strip()]


def inputs(config, name, available):
  return list(dict.fromkeys(_also(config) + final_checkpoint(config, config.evaluate.checkpoint, available,
                                                             "evaluate")))


def _data_specs(config, language: str, split: str) -> dict:
  specs = {"corpus": data.expand_spec(config.data.corpus, config.data.root, language),
           "queries": data.expand_spec(config.data.queries, config.data.root, language, split)}
  if config.data.qrels:
    specs["qrels"] = data.expand_spec(config.data.qrels, config.data.root, language, split)
  return specs


def fingerprint_fields(config, name):
  evaluate = config.evaluate
  fields = {f"evaluate.{k}": evaluate[k] for k in ("split", "depth", "index", "bm25", "bm25_max_passages", "bm25_run",
                                                   "also_checkpoints", "embedding_dtype", "recall_queries",
                                                   "baseline", "significance_resamples", "checkpoint_name")}
  if evaluate.index != "flat":
    fields["evaluate.index_options"] = _index_options(config)
  if evaluate.checkpoint:
    fields["evaluate.checkpoint"] = checkpoints.digest(evaluate.checkpoint)
  fields["data"] = {language: {kind: data.spec_identity(spec) for kind, spec in
                               _data_specs(config, language, evaluate.split).items()}
                    for language in data.parse_languages(config.data.languages)}
  bm25_runs = {language: _bm25_run_file(config, language, evaluate.split)
               for language in data.parse_languages(config.data.languages)}
  fields["bm25_runs"] = {language: data.spec_identity(path) for language, path in bm25_runs.items() if path}
  return fields


def check_config(config, name):
  if config.evaluate.index not in search.KINDS:
    raise ValueError(f"config: evaluate.index must be one of {', '.join(search.KINDS)}")
  search.IndexOptions(**_index_options(config))  # a bad option value fails at launch
  return [spec for language in data.parse_languages(config.data.languages)
          for spec in _data_specs(config, language, config.evaluate.split).values()]


def retrieval_results(ctx, systems: dict[str, str], split: str, out_dir: str, with_bm25: bool,
                      per_query: dict | None = None) -> dict[str, dict[str, dict]]:
  """``{system: {language: metrics}}`` of dense retrieval (FAISS over embedding shards) and BM25.

  ``systems`` maps a name to a checkpoint. Writes TREC run files under ``out_dir/runs``. Process 0 also
  fills ``per_query`` (when given) with ``{system: {language: {qid: metrics}}}``, the samples of the
  significance tests.
  """
  config = ctx.config
  results: dict[str, dict[str, dict]] = {}
  encoders = {name: embeddings.Encoder(checkpoint, config, ctx.tokenizer) for name, checkpoint in systems.items()}
  store = prepared.store(config, ctx.workdir.root)
  for language in ctx.languages:
    specs = _data_specs(config, language, split)
    queries = store.queries(specs["queries"], language)
    if "qrels" in specs:
      qrels, source = data.read_qrels(specs["qrels"]), specs["qrels"]
    else:
      qrels, source = data.qrels_from_queries(queries), specs["queries"]
    corpus = store.corpus(specs["corpus"], language)
    judged = sorted({docid for judgements in qrels.values() for docid in judgements})
    found = {docid for docid, index in zip(judged, corpus.index_of(judged)) if index >= 0}
    data.check_qrels(qrels, found, source, qrels_file="qrels" in specs)
    query_ids = [q.query_id for q in queries]
    runs, index_recall = {}, {}
    if with_bm25 and jax.process_index() == 0:
      bm25_results = _bm25(config, language, split, corpus, queries)
      if bm25_results is not None:
        runs["BM25"] = bm25_results
    for name, encoder in encoders.items():
      directory = embeddings.language_embeddings(ctx.workdir.root, encoder, language, [split])
      shard_ids, vectors = zip(*embeddings.load_shards(directory, f"queries-{split}"))
      vectors = dict(zip([i for ids in shard_ids for i in ids], np.concatenate(vectors)))
      query_vectors = np.stack([vectors[q] for q in query_ids])
      if jax.process_count() > 1 and config.evaluate.index == "flat":
        scores, docids = _search_by_processes(query_vectors, directory, config.evaluate.depth,
                                              os.path.join(out_dir, "partial", f"{name}.{language}.{split}"))
      elif jax.process_index() == 0:
        # An approximate index is built once per checkpoint and shard, beside the shards it indexes.
        scores, docids, index_recall[name] = search.search_shards_with_recall(
            query_vectors, embeddings.load_shards(directory, "corpus"), config.evaluate.depth,
            config.evaluate.index, _index_dir(directory), config.evaluate.recall_queries,
            **_index_options(config))
      if jax.process_index() == 0:
        runs[name] = search.to_run(query_ids, scores, docids)
    if jax.process_index() > 0:
      continue  # Process 0 writes the run files and computes the metrics; the others read them below.
    for name, run in runs.items():
      metrics.write_trec_run(run_file(out_dir, name, language, split), run, name)
      results.setdefault(name, {})[language] = metrics.evaluate_run(qrels, run)
      if per_query is not None:
        per_query.setdefault(name, {})[language] = metrics.per_query(qrels, run)
      if index_recall.get(name) is not None:
        results[name][language][f"index Recall@{config.evaluate.depth} vs exact"] = index_recall[name]
        logging.info("evaluate: %s %s: the %s index finds %.3f of exact search's top %d", name, language,
                     config.evaluate.index, index_recall[name], config.evaluate.depth)
  if jax.process_count() == 1:
    return results
  shared = os.path.join(out_dir, "partial", f"results.{split}.json")
  if jax.process_index() == 0:
    io.write_json(shared, results)
  distributed.barrier(f"{out_dir} results")
  return io.read_json(shared)


def _index_dir(directory: str) -> str:
  """Approximate indexes of one set of corpus shards: re-encoded shards (another key) get new indexes."""
  return os.path.join(directory, "indexes", embeddings.read_shards_manifest(directory, "corpus")["key"])


def _search_by_processes(query_vectors: np.ndarray, directory: str, depth: int, stem: str):
  """Exact search with the shards split into one consecutive block per process; process 0 merges the blocks'
  top-``depth`` lists in shard order, so the hits equal a single process's. Returns them on process 0."""
  count = len(embeddings.read_shards_manifest(directory, "corpus")["shards"])
  scores, docids = search.search_shards(query_vectors, embeddings.load_shards(
      directory, "corpus", shards=distributed.block(count)), depth)
  io.write_json(f"{stem}.{jax.process_index()}.json", {"scores": scores.tolist(), "docids": docids})
  distributed.barrier(f"{stem} searched")
  if jax.process_index() > 0:
    return None, None
  parts = [io.read_json(f"{stem}.{process}.json") for process in range(jax.process_count())]
  return search.merge_top_k([(np.asarray(p["scores"], np.float32), p["docids"]) for p in parts], depth)


def _bm25(config, language: str, split: str, corpus, queries) -> dict | None:
  """BM25's run: from the ``evaluate.bm25_run`` file where it exists, else bm25s on a corpus small enough."""
  evaluate = config.evaluate
  query_ids = [q.query_id for q in queries]
  path = _bm25_run_file(config, language, split)
  if path and os.path.exists(path):
    return bm25.read_run_file(path, query_ids, evaluate.depth)
  if not bm25.bm25s_feasible(len(corpus), evaluate.bm25_max_passages):
    logging.warning("evaluate: no BM25 row for %s: %d passages exceed evaluate.bm25_max_passages=%d and there "
                    "is no run file %r (evaluate.bm25_run)", language, len(corpus), evaluate.bm25_max_passages, path)
    return None
  docids, texts = [], []
  for _, passages in corpus.chunks(65536):
    docids += [p.docid for p in passages]
    texts += [data.passage_text(p, " ") for p in passages]
  return bm25.bm25_run(docids, texts, query_ids, [q.query for q in queries], evaluate.depth)


def _index_options(config) -> dict:
  evaluate = config.evaluate
  return {k: evaluate[k] for k in ("ivf_lists", "pq_subquantizers", "nprobe", "hnsw_neighbors",
                                   "hnsw_ef_construction", "hnsw_ef_search")}


def _bm25_run_file(config, language: str, split: str) -> str:
  return data.expand_spec(config.evaluate.bm25_run, config.data.root, language, split) if config.evaluate.bm25_run else ""


def run_file(out_dir: str, system: str, language: str, split: str) -> str:
  return os.path.join(out_dir, "runs", f"{system}.{language}.{split}.trec")


def results_path(workdir) -> str:
  return os.path.join(workdir.stage_dir("evaluate"), "results.json")


def read_results(workdir) -> dict | None:
  """``{system: {language: metrics}}`` of the evaluate stage, or None when it has not run."""
  path = results_path(workdir)
  return io.read_json(path) if os.path.exists(path) else None


def read_tables(workdir) -> str | None:
  """The Markdown tables of the evaluate stage (systems in evaluation order), or None when it has not run."""
  path = os.path.join(workdir.stage_dir("evaluate"), "results.md")
  with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as file:
    return file.read()
  return None


def tables(results: dict, languages: list[str], tests: dict | None = None, baseline: str = "") -> str:
  """One table per measure; with ``tests`` (``significance_tests``' output), cells that differ significantly
  from the ``baseline`` row carry ``*`` and a table of differences with their intervals follows each."""
  parts = []
  for measure in metrics.MEASURES:
    marks = {system: {language: significance.mark(test["p"]) for language, test in per_language.items()}
             for system, per_language in (tests or {}).get(measure, {}).items()}
    parts.append(metrics.format_table(results, languages, measure, marks=marks,
                                      baseline=baseline if tests else ""))
    if tests and tests.get(measure):
      parts.append(metrics.format_differences(tests[measure], languages, measure, baseline))
  if tests:
    parts.append(f"`*`: differs from {baseline} with p < 0.05 (paired randomization test over queries, "
                 "two-sided, per cell, uncorrected); intervals: 95% paired bootstrap of the difference; "
                 "avg: the macro average, queries resampled within each language.")
  return "\n\n".join(parts)


def significance_tests(per_query: dict, baseline: str, languages: list[str], resamples: int,
                       seed: int = 0) -> dict:
  """``{measure: {system: {language | "avg": paired_test stats}}}`` of every system against ``baseline``,
  over the languages both cover (systems missing one, like BM25 without a run file, are left out)."""
  tests: dict = {}
  if baseline not in per_query:
    return tests
  base = per_query[baseline]
  for system, per_language in per_query.items():
    if system == baseline or any(language not in per_language for language in languages):
      continue
    for measure in metrics.MEASURES:
      samples = lambda values: {l: np.array([values[l][q][measure] for q in base[l]]) for l in languages}
      tests.setdefault(measure, {})[system] = significance.paired_test(
          samples(per_language), samples(base), resamples=resamples, seed=seed)
  return tests


def run(ctx) -> StageResult:
  config = ctx.config
  split = config.evaluate.split
  systems = {name: ctx.workdir.checkpoints(name) for name in ctx.inputs}
  if config.evaluate.checkpoint:
    systems[config.evaluate.checkpoint_name] = config.evaluate.checkpoint
  per_query: dict = {}
  results = retrieval_results(ctx, systems, split, ctx.stage_dir, config.evaluate.bm25, per_query)
  baseline = config.evaluate.baseline
  if jax.process_index() == 0:
    if baseline and baseline not in results:
      logging.warning("evaluate: the baseline %r is not among the evaluated systems %s: no significance tests "
                      "(evaluate.baseline, evaluate.also_checkpoints)", baseline, sorted(results))
    tests = significance_tests(per_query, baseline, ctx.languages, config.evaluate.significance_resamples)
    text = tables(results, ctx.languages, tests, baseline)
    io.write_json(os.path.join(ctx.stage_dir, "per_query.json"), per_query)
    io.write_json(os.path.join(ctx.stage_dir, "significance.json"), {"baseline": baseline, "tests": tests})
    io.write_json(results_path(ctx.workdir), results)
    io.write_text(os.path.join(ctx.stage_dir, "results.md"), text + "\n")
    print(f"\nRetrieval on {split} ({config.evaluate.index} index, depth {config.evaluate.depth}):\n\n{text}\n",
          flush=True)
  summary = {f"{name}/{m}": float(np.mean([r[l][m] for l in ctx.languages]))
             for name, r in results.items() if all(l in r for l in ctx.languages) for m in metrics.MEASURES}
  return StageResult(summary)
