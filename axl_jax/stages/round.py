"""The AXL rounds (stages ``round_1`` .. ``round_N``): generate -> filter -> train -> evaluate on dev.

Each round starts from the previous training stage's final parameters (``round_1`` from
``adversarial.train.init_checkpoint`` when set) and
1. generates candidates for ``finetune``'s training rows in the negatives subprocess (torch-free; a
   killed round reuses its finished shards; the seed changes per round so later rounds see new candidates).
   The candidates do not depend on the retriever, so the pipeline runs this step (``offline``) for every
   round before the run's JAX process opens the accelerators: the generator owns them (a TPU opens to
   one process), each host generating its share of the shards;
2. scores every candidate that passed the generator's checks with the current retriever (each process a
   block of them), s(q, pos), s(q, neg) and the best BM25 negative's score (a mined passage's scores come
   with it from ``mine``, read from the corpus embeddings it was found in), and keeps the hardest fraction
   per language behind the false-negative guard (``adversarial.filter_decisions``); every decision goes to
   ``decisions.jsonl`` so a user can audit what was trained on;
   With ``adversarial.sources`` including ``mined``, the round also takes the current retriever's own
   top-ranked passages for each training query that are not judged relevant (ANCE; Tevatron's hard-negative
   mining), skipping the first ``mine_skip`` of them (likely unjudged positives), from the corpus embeddings
   of the checkpoint the round starts from: the previous round's dev evaluation (or ``evaluate``'s) encodes
   that corpus anyway, once per checkpoint. They pass the same false-negative guard, then keep their own
   ``mined_keep_fraction``;
3. trains on groups of the positive, kept generated (``adversarial_per_group``) and mined
   (``mined_per_group``) negatives, filled up with BM25 negatives;
4. evaluates on dev and keeps the round's statistics in its manifest and TensorBoard files.

The corpus is never re-indexed for a round: each checkpoint's corpus embeddings are made once. Queries, passages and
candidates are keyed by ``(language, id)``. The dev evaluation is reported, not trained on, so its
data is not part of the round's fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
from absl import logging

from axl_jax import adversarial, data, distributed, embeddings, io, prepared, search, trainer
from axl_jax.negatives import prompts
from axl_jax.negatives.records import read_records
from axl_jax.stages import StageResult, evaluate, training

EXPENSIVE = True
# Generator fields that decide its output (shard_size too: a round resumes the generator's shards).
# Bumped when decisions.jsonl gains fields or its scores are made another way (3: mined passages scored from
# the corpus shards): decisions of an older format are made again.
_DECISIONS_FORMAT = 3
_GENERATOR_FIELDS = ("backend", "checkpoint", "dtype", "batch_size", "max_new_tokens", "temperature", "top_p",
                     "seed", "techniques", "max_queries_per_language", "shard_size")


def number(name: str) -> int:
  return int(name.split("_")[1])


def round_seed(config, name: str) -> int:
  """The seed of a round's batches and filter: ``adversarial.seed`` varies the rounds alone (several seeds
  of the rounds on one supervised baseline) where ``seed`` would change every stage."""
  return config.seed + number(name) + 1000 * config.adversarial.seed


def _init_checkpoint(config, name: str) -> str:
  # Only the first round may start elsewhere; later rounds continue from the round before.
  return config.adversarial.train.init_checkpoint if number(name) == 1 else ""


def inputs(config, name, available):
  found = training.inputs(config, name, available, _init_checkpoint(config, name))
  if not found and not _init_checkpoint(config, name):
    raise FileNotFoundError(f"{name}: no training stage before it is configured or complete; the rounds start "
                            "from one (or round_1 from --config.adversarial.train.init_checkpoint=PATH)")
  return found


SOURCES = ("generated", "mined")
# Bumped when mined.jsonl gains fields (3: the passage's, its positive's and best BM25 negative's scores
# from the corpus shards).
_MINED_FORMAT = 3
_MINING_FIELDS = ("mine_skip", "mine_depth", "mined_keep_fraction", "mined_per_group")


def sources(config) -> list[str]:
  """``adversarial.sources`` as a list: generated, mined or both."""
  names = [s.strip() for s in config.adversarial.sources.split(",") if s.strip()]
  if not names or any(name not in SOURCES for name in names):
    raise ValueError(f"config field adversarial.sources must name one or both of {','.join(SOURCES)}, "
                     f"got {config.adversarial.sources!r}")
  return names


def fingerprint_fields(config, name):
  adversarial_config = {k: v for k, v in config.adversarial.to_dict().items()
                        if k not in ("rounds", "train", "score_batch_size")}
  # Generated-only rounds without a round seed keep the fingerprints they had before these fields existed
  # (rounds from before the window edits, prompt version v1, are stale anyway: their candidates differ).
  if sources(config) == ["generated"]:
    for field in ("sources",) + _MINING_FIELDS:
      adversarial_config.pop(field, None)
  if adversarial_config.get("seed") == 0:
    del adversarial_config["seed"]
  return {"round": number(name),
          "adversarial": adversarial_config,
          **training.stage_fields("adversarial.train", config.adversarial.train, _init_checkpoint(config, name)),
          "generator": {k: config.generator[k] for k in _GENERATOR_FIELDS},
          "generator.prompt_version": prompts.PROMPT_VERSION,
          **training.rows_fields(config, "finetune", config.finetune),
          # The rules backend draws replacement titles from the corpus.
          "corpus": [[language, data.spec_identity(data.expand_spec(config.data.corpus, config.data.root, language))]
                     for language, _ in data.training_specs(config, config.finetune)]
          if config.generator.backend == "rules" else []}


def check_config(config, name):
  training.check_stage(config, "adversarial.train", config.adversarial.train)
  sources(config)
  adversarial_config = config.adversarial
  if not 0 <= adversarial_config.mine_skip < adversarial_config.mine_depth:
    raise ValueError("config: adversarial.mine_skip must be >= 0 and below adversarial.mine_depth")
  if not 0.0 < adversarial_config.mined_keep_fraction <= 1.0:
    raise ValueError("config: adversarial.mined_keep_fraction must be in (0, 1]")
  if config.adversarial.selection not in adversarial.SELECTIONS:
    raise ValueError(f"config: adversarial.selection must be one of {','.join(adversarial.SELECTIONS)}")
  if config.generator.backend not in ("qwen", "rules"):
    raise ValueError("config: generator.backend must be qwen or rules")
  generator_env(config)
  if not data.parse_languages(config.finetune.languages, "finetune.languages"):
    raise ValueError("config: the rounds generate for finetune's rows per language: set finetune.languages")
  dev = []
  for language in data.parse_languages(config.data.languages):  # the round's dev evaluation
    dev.append(data.expand_spec(config.data.queries, config.data.root, language, "dev"))
    if config.data.qrels:
      dev.append(data.expand_spec(config.data.qrels, config.data.root, language, "dev"))
  return training.rows_specs(config, config.finetune) + dev


def generator_env(config) -> dict[str, str]:
  """``generator.env`` ("NAME=value NAME=value") as a dict."""
  env = {}
  for setting in config.generator.env.split():
    name, equals, value = setting.partition("=")
    if not equals or not name:
      raise ValueError(f"config field generator.env: {setting!r} is not NAME=value")
    env[name] = value
  return env


def _negatives_dir(ctx) -> str:
  return os.path.join(ctx.stage_dir, "negatives")


def offline(ctx) -> None:
  """Generates this host's share of the round's candidates in the negatives subprocess (before any stage
  runs, while no JAX process of this run holds the accelerators); a killed run resumes at the missing shards."""
  if "generated" not in sources(ctx.config):
    return
  config = ctx.config.copy_and_resolve_references()
  config.generator.seed = ctx.config.generator.seed + number(ctx.name)
  # The round trains on finetune's rows, so it generates for exactly those.
  config.generator.languages = ctx.config.finetune.languages
  config.generator.train_data = ""
  config.data.prepared_dir = prepared.store(ctx.config, ctx.workdir.root).root  # the run's prepared corpora
  # The run's tokenizer: edits go where the retriever reads (negatives/window.py).
  config.tokenizer.name_or_path = ctx.config.tokenizer.name_or_path or os.path.join(ctx.workdir.root, "tokenizer")
  config_path = os.path.join(ctx.stage_dir, "generator_config.json")
  if distributed.process_index() == 0:
    io.write_json(config_path, json.loads(config.to_json_best_effort()))
  distributed.barrier(f"{ctx.name} generator config")
  command = [sys.executable, "-m", "axl_jax.negatives.generate", f"--config_json={config_path}",
             f"--output={_negatives_dir(ctx)}", f"--process_index={distributed.process_index()}",
             f"--process_count={distributed.process_count()}"]
  # The generator runs alone on the accelerators (this process has not opened them): not the share main.py
  # leaves for FAISS beside the retriever. generator.env comes last and may say otherwise.
  env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.9", **generator_env(config))
  logging.info("%s: generating negatives: %s", ctx.name, " ".join(command))
  subprocess.run(command, check=True, env=env)


def _score(encoder: embeddings.Encoder, records: list[dict], rows, title_separator: str, batch_size: int):
  """s(q, pos), s(q, neg), the best BM25 negative's score and the negative's title (None for a mined
  passage: its title is the corpus's) for every record.

  A generated candidate is encoded here in float32, with its query and the positive it rewrites (and the
  query's BM25 negatives), so its guard compares like with like. A mined passage keeps the scores ``mine``
  computed from the corpus shards it was found in (float16 by default), its positive's and BM25 negatives'
  included: like with like too, and no corpus passage is encoded twice for one checkpoint.

  The training rows are read a chunk at a time (only those with generated candidates are encoded), so
  memory holds one chunk's texts and vectors, never the whole training set.
  """
  encode = lambda texts, tower: encoder.encode(texts, tower, batch_size)
  slots: dict[tuple[str, str], list[int]] = {}
  positive, negative = np.zeros(len(records)), np.zeros(len(records))
  bm25_best: list = [None] * len(records)
  titles: list = [None if r["technique"] == "mined" else "" for r in records]  # a mined one's is the corpus's
  for slot, record in enumerate(records):
    if record["technique"] == "mined":
      positive[slot], negative[slot] = record["score_positive"], record["score_negative"]
      bm25_best[slot] = record["score_best_bm25"]
    else:
      slots.setdefault((record["language"], record["query_id"]), []).append(slot)
  for chunk in prepared.example_chunks(rows):
    examples = [e for e in chunk if e.key in slots]
    if not examples:
      continue
    query_vectors = dict(zip([e.key for e in examples], encode([e.query for e in examples], "query")))
    passages = {(e.language, p.docid): p for e in examples for p in e.positives + e.negatives}
    passage_vectors = dict(zip(passages, encode([data.passage_text(p, title_separator) for p in passages.values()],
                                                "passage")))
    generated = [(example, slot) for example in examples for slot in slots[example.key]]
    for example, slot in generated:  # a rewrite of the positive, under its title
      titles[slot] = next((p.title for p in example.positives if p.docid == records[slot]["source_docid"]), "")
    candidates = encode([data.passage_text(data.Passage("", titles[slot], records[slot]["text"]), title_separator)
                         for _, slot in generated], "passage")
    for (example, slot), vector in zip(generated, candidates):
      query = query_vectors[example.key]
      positive[slot] = float(query @ passage_vectors[(example.language, records[slot]["source_docid"])])
      negative[slot] = float(query @ vector)
      bm25 = [float(query @ passage_vectors[(example.language, p.docid)]) for p in example.negatives]
      bm25_best[slot] = max(bm25) if bm25 else None
  return positive, negative, bm25_best, titles


def _write_keyed(path: str, key_path: str, records: list[dict], key: dict) -> None:
  """Writes a cache and then its key; the old key goes first, so a crash between the two never pairs new
  records with the key of the old ones."""
  if os.path.exists(key_path):
    os.remove(key_path)
  io.write_jsonl(path, records)
  io.write_json(key_path, key)


def _corpus_rows(corpus: prepared.Corpus, language: str, docids: list[str], what: str) -> np.ndarray:
  """Row of each docid in ``language``'s prepared corpus (the order of its embedding shards)."""
  indices = corpus.index_of(docids)
  if (indices < 0).any():
    raise KeyError(f"{language}: {what} {docids[int(np.argmax(indices < 0))]!r} is not in the corpus")
  return indices


def _corpus_passages(config, store):
  """``(language, docids) -> passages`` read by index from the prepared corpora."""
  corpora = {}

  def read(language: str, docids: list[str]) -> list[data.Passage]:
    if language not in corpora:
      corpora[language] = store.corpus(prepared.corpus_spec(config, language), language)
    return corpora[language].passages(_corpus_rows(corpora[language], language, docids, "mined passage"))
  return read


def _shard_vectors(corpus: prepared.Corpus, directory: str, docids: list[str],
                   check_order: bool = True) -> dict[str, np.ndarray]:
  """The corpus shards' vectors (as float32) of those ``docids`` the corpus has, read by row from
  ``directory``; a docid the corpus lacks is left out. ``check_order`` reads the shards' ids to confirm
  that they follow the prepared corpus (``index_of`` has already checked each docid against its record)."""
  rows = corpus.index_of(docids)
  present = [docid for docid, row in zip(docids, rows) if row >= 0]
  ids, vectors = embeddings.read_rows(directory, "corpus", rows[rows >= 0], with_ids=check_order)
  if check_order and ids != present:
    raise RuntimeError(f"{directory}: the corpus shards are not in the order of the prepared corpus")
  return dict(zip(present, vectors))


_MINE_CHUNK = 4096  # training queries encoded, and their passages' vectors read, at a time


def _mined_records(language: str, items: list, query_vectors: np.ndarray, scores: np.ndarray, docids: list,
                   skip: int, depth: int, vectors_of, chunk: int = _MINE_CHUNK) -> tuple[list[dict], int]:
  """One language's mined candidate records from its queries' search hits, and how many queries got none
  because their positive is not in the corpus (no guard without its score).

  ``items``: ``(row, query_id, positive docid, judged relevant docids, BM25 negative docids)`` per query, with
  its ``query_vectors`` row and its hits (``scores``, ``docids``, best first). Hits judged relevant are
  removed, then ranks ``skip + 1 .. depth`` of the rest are kept. ``vectors_of(docids, first)`` gives the
  float32 vectors of those docids the corpus has (``first``: the first call), asked for ``chunk`` queries'
  passages at a time; a hit the corpus lacks is left out.
  """
  records, unguarded = [], 0
  for begin in range(0, len(items), chunk):
    part = slice(begin, begin + chunk)
    # The mined passages are scored here too, in float32 from the stored vectors like their positive: the
    # search may have rounded the query (FAISS's float16 GEMM on GPUs); it only ranks them.
    vectors = vectors_of(list(dict.fromkeys(
        docid for (_, _, positive, _, bm25), hits in zip(items[part], docids[part])
        for docid in [positive, *bm25, *hits])), begin == 0)
    for (row, query_id, positive_docid, judged, bm25), query, row_scores, row_docids in zip(
        items[part], query_vectors[part], scores[part], docids[part]):
      if positive_docid not in vectors:
        unguarded += 1
        continue
      hits = [(docid, float(score)) for docid, score in zip(row_docids, row_scores)
              if docid not in judged and docid in vectors]
      score_positive = float(query @ vectors[positive_docid])
      score_bm25 = max((float(query @ vectors[docid]) for docid in bm25 if docid in vectors), default=None)
      # Ids and ranks only: the texts stay in the corpus (1.3M records of 48.7K queries at depth 30).
      for rank, (docid, score) in enumerate(hits[skip:depth], start=skip + 1):
        records.append({"row": row, "query_id": query_id, "source_docid": positive_docid, "language": language,
                        "technique": "mined", "docid": docid, "rank": rank, "search_score": score,
                        "score_negative": float(query @ vectors[docid]),
                        "score_positive": score_positive, "score_best_bm25": score_bm25,
                        "accepted": True, "reject_reason": None})
  return records, unguarded


def mine(ctx, encoder: embeddings.Encoder, rows) -> list[dict]:
  """The retriever's own hard negatives: for each training query, its top passages (by ``encoder``, exact
  search over the corpus embeddings) that are not judged relevant, from the ``mine_skip``-th to the
  ``mine_depth``-th, as candidate records (technique ``mined``: ids, rank and search score, no text). Each
  record also carries the query's scores of the passage, of its positive and of its best BM25 negative,
  computed in float32 from the same stored corpus vectors (float16 by default, read by row): the
  false-negative guard compares like with like, and the round encodes no corpus passage a second time.

  The corpus embeddings are ``encoder``'s, made once per checkpoint (the evaluation of that checkpoint
  reuses them). Each process mines a block of the training rows; every process returns the same list.
  A resumed round reuses the list when it was mined the same way.
  """
  config, adversarial_config = ctx.config, ctx.config.adversarial
  skip, depth = adversarial_config.mine_skip, adversarial_config.mine_depth
  specs = data.training_specs(config, config.finetune)
  # Every process takes part in encoding each language's corpus (once per checkpoint, reused by evaluation).
  directories = {language: embeddings.language_embeddings(ctx.workdir.root, encoder, language, [])
                 for language in dict.fromkeys(language for language, _ in specs)}
  # The corpus shards' keys cover the checkpoint, the corpus and the embedding dtype.
  key = hashlib.sha256(json.dumps([_MINED_FORMAT, skip, depth, training.rows_fields(config, "finetune", config.finetune),
                                   [[language, embeddings.read_shards_manifest(directory, "corpus")["key"]]
                                    for language, directory in directories.items()]]).encode()).hexdigest()[:16]
  path, key_path = os.path.join(ctx.stage_dir, "mined.jsonl"), os.path.join(ctx.stage_dir, "mined.key.json")
  if os.path.exists(path) and os.path.exists(key_path) and io.read_json(key_path).get("key") == key:
    return io.read_jsonl(path)
  block = distributed.block(len(rows))
  # language -> [(row, query_id, positive docid, judged relevant docids, BM25 negative docids)]
  queries: dict[str, list] = {}
  vectors: dict[str, list] = {}
  for start in range(block.start, block.stop, _MINE_CHUNK):
    examples = rows.examples(range(start, min(start + _MINE_CHUNK, block.stop)))
    encoded = encoder.encode([e.query for e in examples], "query", adversarial_config.score_batch_size)
    for row, (example, vector) in enumerate(zip(examples, encoded), start=start):
      queries.setdefault(example.language, []).append(
          (row, example.query_id, example.positives[0].docid, {p.docid for p in example.positives},
           [p.docid for p in example.negatives]))
      vectors.setdefault(example.language, []).append(vector)
  mined = []
  store = prepared.store(config, ctx.workdir.root)
  for language, items in queries.items():
    query_vectors = np.stack(vectors[language])
    most_positives = max(len(judged) for _, _, _, judged, _ in items)
    scores, docids = search.search_shards(query_vectors, embeddings.load_shards(directories[language], "corpus"),
                                          depth + most_positives)
    corpus = store.corpus(prepared.corpus_spec(config, language), language)
    records, unguarded = _mined_records(
        language, items, query_vectors, scores, docids, skip, depth,
        lambda wanted, first: _shard_vectors(corpus, directories[language], wanted, check_order=first))
    mined += records
    if unguarded:
      logging.warning("%s: %s: the positive passage of %d training queries is not in the corpus %s: no mined "
                      "negatives for them", ctx.name, language, unguarded, prepared.corpus_spec(config, language))
  if distributed.process_count() > 1:
    part = os.path.join(ctx.stage_dir, "mined", f"{key}.{{}}.jsonl")
    io.write_jsonl(part.format(distributed.process_index()), mined)
    distributed.barrier(f"{ctx.name} mined")
    mined = [r for process in range(distributed.process_count()) for r in io.read_jsonl(part.format(process))]
  mined.sort(key=lambda record: (record["row"], record["rank"]))  # in row order, whatever the process count
  if distributed.process_index() == 0:
    _write_keyed(path, key_path, mined, {"key": key, "mined_with": encoder.checkpoint})
  logging.info("%s: mined %d negatives (ranks %d-%d of the start checkpoint's retrieval, judged positives "
               "removed)", ctx.name, len(mined), skip + 1, depth)
  return mined


def _statistics(records_all: list[dict], records: list[dict], decisions: list[dict]) -> dict:
  stats: dict = {"candidates": len(records_all), "accepted_by_checks": len(records),
                 "kept": sum(d["kept"] for d in decisions)}
  for key in ("technique", "language"):
    for value in sorted({r[key] for r in records_all}):
      subset = [i for i, r in enumerate(records) if r[key] == value]
      stats[f"{key}/{value}/candidates"] = sum(r[key] == value for r in records_all)
      stats[f"{key}/{value}/accepted"] = len(subset)
      stats[f"{key}/{value}/kept"] = sum(decisions[i]["kept"] for i in subset)
  reasons = {}
  for record in records_all:
    reason = record["reject_reason"] or "accepted"
    reasons[reason] = reasons.get(reason, 0) + 1
  stats.update({f"checks/{reason}": count for reason, count in sorted(reasons.items())})
  for reason in ("kept", "guard", "below_threshold", "not_sampled"):
    stats[f"filter/{reason}"] = sum(d["reason"] == reason for d in decisions)
  stats["acceptance_rate"] = len(records) / max(1, len(records_all))
  stats["retention_rate"] = stats["kept"] / max(1, len(records))
  for name, margins in (("margin_before", [d["margin"] for d in decisions]),
                        ("margin_after", [d["margin"] for d in decisions if d["kept"]])):
    stats.update({f"{name}/{k}": v for k, v in adversarial.margin_summary(margins).items()})
  return stats


def _decisions(ctx, encoder, records, rows) -> list[dict]:
  """Scores and filter decisions of ``records``; reused from an interrupted run only if made the same way.

  Each process scores a block of the records; every process reads all blocks and makes the same decisions
  (they are a pure function of the scores and the seed); process 0 writes them."""
  config = ctx.config
  filter_fields = {k: config.adversarial[k] for k in ("keep_fraction", "selection", "guard", "guard_margin",
                                                      "mined_keep_fraction")}
  key = hashlib.sha256(json.dumps([_DECISIONS_FORMAT, filter_fields, round_seed(config, ctx.name), encoder.key,
                                   [[r["language"], r["query_id"], r["technique"],
                                     # A mined passage by id and the scores mine() read from the shards.
                                     [r["docid"], r["score_positive"], r["score_negative"]]
                                     if r["technique"] == "mined" else r["text"]] for r in records]],
                                  sort_keys=True).encode()).hexdigest()[:16]
  path, key_path = decisions_path(ctx.workdir, ctx.name), os.path.join(ctx.stage_dir, "decisions.key.json")
  if os.path.exists(path) and os.path.exists(key_path) and io.read_json(key_path).get("key") == key:
    return io.read_jsonl(path)  # A resumed round does not score again.
  block = distributed.block(len(records))
  scores = _score(encoder, records[block], rows, config.data.title_separator, config.adversarial.score_batch_size)
  if distributed.process_count() > 1:
    part = os.path.join(ctx.stage_dir, "scores", f"{key}.{{}}.json")
    io.write_json(part.format(distributed.process_index()), [np.asarray(s).tolist() if i < 2 else s
                                                             for i, s in enumerate(scores)])
    distributed.barrier(f"{ctx.name} scored")
    parts = [io.read_json(part.format(process)) for process in range(distributed.process_count())]
    scores = [sum((p[i] for p in parts), []) for i in range(4)]
  positive, negative, bm25_best, titles = scores
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  decisions: list = [None] * len(records)
  # Each source is filtered on its own: mined passages do not crowd generated ones out of the kept share.
  for is_mined, keep_fraction in ((False, config.adversarial.keep_fraction),
                                  (True, config.adversarial.mined_keep_fraction)):
    subset = [i for i, r in enumerate(records) if (r["technique"] == "mined") == is_mined]
    made = adversarial.filter_decisions(
        positive[subset], negative[subset], [records[i]["language"] for i in subset],
        keep_fraction=keep_fraction, selection=config.adversarial.selection,
        guard=config.adversarial.guard, guard_margin=config.adversarial.guard_margin,
        seed=round_seed(config, ctx.name) + 7919 * is_mined)
    for i, decision in zip(subset, made):
      decisions[i] = decision
  for decision, record, pos, neg, bm25, title in zip(decisions, records, positive, negative, bm25_best, titles):
    decision.update(query_id=record["query_id"], technique=record["technique"], language=record["language"],
                    source_docid=record["source_docid"], score_positive=float(pos), score_negative=float(neg),
                    score_best_bm25=bm25, title=title)
    # A mined passage is named by its id (its text is the corpus's); a generated one is its text.
    decision.update({"docid": record["docid"], "rank": record["rank"]} if record["technique"] == "mined"
                    else {"text": record["text"]})
  if distributed.process_index() == 0:
    _write_keyed(path, key_path, decisions, {"key": key, "filter": filter_fields, "scored_with": encoder.checkpoint,
                                             "checkpoint_digest": encoder.digest})
  return decisions


def decisions_path(workdir, name: str) -> str:
  return os.path.join(workdir.stage_dir(name), "decisions.jsonl")


def read_decisions(workdir, name: str) -> list[dict]:
  """Every candidate's scores and filter decision in round ``name``."""
  return io.read_jsonl(decisions_path(workdir, name))


def read_statistics(workdir, name: str) -> dict:
  return io.read_json(os.path.join(workdir.stage_dir(name), "round_stats.json"))


def run(ctx) -> StageResult:
  config = ctx.config
  os.makedirs(ctx.stage_dir, exist_ok=True)
  start = _init_checkpoint(config, ctx.name) or ctx.workdir.checkpoints(ctx.inputs[0])
  rows = prepared.training_rows(config, config.finetune, prepared.store(config, ctx.workdir.root))

  # Generated candidates were made by ``offline`` before the run's stages started.
  records_all = read_records(_negatives_dir(ctx)) if "generated" in sources(config) else []
  encoder = embeddings.Encoder(start, config, ctx.tokenizer)
  mined = mine(ctx, encoder, rows) if "mined" in sources(config) else []
  records_all = records_all + mined
  records = [r for r in records_all if r["accepted"]]
  decisions = _decisions(ctx, encoder, records, rows)

  kept: dict[str, dict[tuple[str, str], list[data.Passage]]] = {"generated": {}, "mined": {}}
  for index, (decision, record) in enumerate(zip(decisions, records)):
    if decision["kept"] and record["technique"] != "mined":
      kept["generated"].setdefault((record["language"], record["query_id"]), []).append(
          data.Passage(f"{ctx.name}-adv-{index}", decision["title"], record["text"]))
  read_passages = _corpus_passages(config, prepared.store(config, ctx.workdir.root))
  for language in dict.fromkeys(r["language"] for r in records if r["technique"] == "mined"):
    chosen = [r for r, d in zip(records, decisions) if d["kept"] and r["technique"] == "mined" and r["language"] == language]
    for record, passage in zip(chosen, read_passages(language, [r["docid"] for r in chosen]) if chosen else []):
      kept["mined"].setdefault((language, record["query_id"]), []).append(passage)
  stage_config = config.adversarial.train
  batches = training.supervised_batches(ctx, stage_config, rows, round_seed(config, ctx.name),
                                        adversarial={k: tuple(p) for k, p in kept["generated"].items()},
                                        adversarial_per_group=config.adversarial.adversarial_per_group,
                                        mined={k: tuple(p) for k, p in kept["mined"].items()},
                                        mined_per_group=config.adversarial.mined_per_group)
  result = training.train(ctx, stage_config, batches, _init_checkpoint(config, ctx.name))

  dev = evaluate.retrieval_results(ctx, {ctx.name: result.checkpoint}, "dev", ctx.stage_dir, with_bm25=False)[ctx.name]
  stats = _statistics(records_all, records, decisions)
  for measure in ("MRR@100", "Recall@100"):
    stats.update({f"dev/{language}/{measure}": dev[language][measure] for language in dev})
    stats[f"dev/avg/{measure}"] = float(np.mean([dev[language][measure] for language in dev]))
  writer = trainer.create_writer(config, os.path.join(ctx.stage_dir, "round_stats"))
  writer.write_scalars(number(ctx.name), {k: v for k, v in stats.items() if isinstance(v, (int, float))})
  writer.flush()
  if distributed.process_index() == 0:
    io.write_json(os.path.join(ctx.stage_dir, "round_stats.json"), stats)
  logging.info("%s: %d candidates, %d passed the checks, %d kept; dev MRR@100 %.3f", ctx.name, stats["candidates"],
               stats["accepted_by_checks"], stats["kept"], stats["dev/avg/MRR@100"])
  return StageResult({**result.metrics, **stats}, result.checkpoint)
