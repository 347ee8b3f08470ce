"""The AXL rounds (stages ``round_1`` .. ``round_N``): generate -> filter -> train -> evaluate on dev.

Each round starts from the previous training stage's final parameters (``round_1`` from
``adversarial.train.init_checkpoint`` when set) and
1. generates candidates for ``finetune``'s training rows in the negatives subprocess (torch-free; a
   killed round reuses its finished shards; the seed changes per round so later rounds see new candidates).
   The candidates do not depend on the retriever, so the pipeline runs this step (``offline``) for every
   round before the run's JAX process opens the accelerators: the generator owns them (a TPU opens to
   one process), each host generating its share of the shards;
2. scores every candidate that passed the generator's checks with the current retriever (each process a
   block of them), s(q, pos), s(q, neg) and the best BM25 negative's score, and keeps the hardest fraction
   per language behind the false-negative guard (``adversarial.filter_decisions``); every decision goes to
   ``decisions.jsonl`` so a user can audit what was trained on;
3. trains on groups of the positive, kept adversarial negatives and BM25 negatives;
4. evaluates on dev and keeps the round's statistics in its manifest and TensorBoard files.

Only the generated negatives are scored: the corpus is never re-indexed. Queries, passages and
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

from axl_jax import adversarial, data, distributed, embeddings, io, prepared, trainer
from axl_jax.negatives import prompts
from axl_jax.negatives.records import read_records
from axl_jax.stages import StageResult, evaluate, training

EXPENSIVE = True
# Generator fields that decide its output (shard_size too: a round resumes the generator's shards).
# Bumped when decisions.jsonl gains fields: decisions of an older format are made again.
_DECISIONS_FORMAT = 2
_GENERATOR_FIELDS = ("backend", "checkpoint", "dtype", "batch_size", "max_new_tokens", "temperature", "top_p",
                     "seed", "techniques", "max_queries_per_language", "shard_size")


def number(name: str) -> int:
  return int(name.split("_")[1])


def _init_checkpoint(config, name: str) -> str:
  # Only the first round may start elsewhere; later rounds continue from the round before.
  return config.adversarial.train.init_checkpoint if number(name) == 1 else ""


def inputs(config, name, available):
  found = training.inputs(config, name, available, _init_checkpoint(config, name))
  if not found and not _init_checkpoint(config, name):
    raise FileNotFoundError(f"{name}: no training stage before it is configured or complete; the rounds start "
                            "from one (or round_1 from --config.adversarial.train.init_checkpoint=PATH)")
  return found


def fingerprint_fields(config, name):
  adversarial_config = {k: v for k, v in config.adversarial.to_dict().items()
                        if k not in ("rounds", "train", "score_batch_size")}
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
  config = ctx.config.copy_and_resolve_references()
  config.generator.seed = ctx.config.generator.seed + number(ctx.name)
  # The round trains on finetune's rows, so it generates for exactly those.
  config.generator.languages = ctx.config.finetune.languages
  config.generator.train_data = ""
  config.data.prepared_dir = prepared.store(ctx.config, ctx.workdir.root).root  # the run's prepared corpora
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
  """s(q, pos), s(q, neg), the best BM25 negative's score and the positive's title for every record.

  The training rows are read a chunk at a time (only those with candidates are encoded), so memory holds
  one chunk's texts and vectors, never the whole training set.
  """
  encode = lambda texts, tower: encoder.encode(texts, tower, batch_size)
  slots: dict[tuple[str, str], list[int]] = {}
  for slot, record in enumerate(records):
    slots.setdefault((record["language"], record["query_id"]), []).append(slot)
  positive, negative = np.zeros(len(records)), np.zeros(len(records))
  bm25_best: list = [None] * len(records)
  titles = [""] * len(records)
  for chunk in prepared.example_chunks(rows):
    examples = [e for e in chunk if e.key in slots]
    if not examples:
      continue
    query_vectors = dict(zip([e.key for e in examples], encode([e.query for e in examples], "query")))
    passages = {(e.language, p.docid): p for e in examples for p in e.positives + e.negatives}
    passage_vectors = dict(zip(passages, encode([data.passage_text(p, title_separator) for p in passages.values()],
                                                "passage")))
    mine = [(example, slot) for example in examples for slot in slots[example.key]]
    for example, slot in mine:
      titles[slot] = next((p.title for p in example.positives if p.docid == records[slot]["source_docid"]), "")
    candidates = encode([data.passage_text(data.Passage("", titles[slot], records[slot]["text"]), title_separator)
                         for _, slot in mine], "passage")
    for (example, slot), vector in zip(mine, candidates):
      query = query_vectors[example.key]
      positive[slot] = float(query @ passage_vectors[(example.language, records[slot]["source_docid"])])
      negative[slot] = float(query @ vector)
      bm25 = [float(query @ passage_vectors[(example.language, p.docid)]) for p in example.negatives]
      bm25_best[slot] = max(bm25) if bm25 else None
  return positive, negative, bm25_best, titles


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
  filter_fields = {k: config.adversarial[k] for k in ("keep_fraction", "selection", "guard", "guard_margin")}
  key = hashlib.sha256(json.dumps([_DECISIONS_FORMAT, filter_fields, config.seed + number(ctx.name), encoder.key,
                                   [[r["language"], r["query_id"], r["technique"], r["text"]] for r in records]],
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
  decisions = adversarial.filter_decisions(
      np.asarray(positive, np.float64), np.asarray(negative, np.float64), [r["language"] for r in records],
      keep_fraction=config.adversarial.keep_fraction, selection=config.adversarial.selection,
      guard=config.adversarial.guard, guard_margin=config.adversarial.guard_margin, seed=config.seed + number(ctx.name))
  for decision, record, pos, neg, bm25, title in zip(decisions, records, positive, negative, bm25_best, titles):
    decision.update(query_id=record["query_id"], technique=record["technique"], language=record["language"],
                    source_docid=record["source_docid"], score_positive=float(pos), score_negative=float(neg),
                    score_best_bm25=bm25, title=title, text=record["text"])
  if distributed.process_index() == 0:
    io.write_jsonl(path, decisions)
    io.write_json(key_path, {"key": key, "filter": filter_fields, "scored_with": encoder.checkpoint,
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

  records_all = read_records(_negatives_dir(ctx))  # made by ``offline`` before the run's stages started
  records = [r for r in records_all if r["accepted"]]
  decisions = _decisions(ctx, embeddings.Encoder(start, config, ctx.tokenizer), records, rows)

  kept: dict[tuple[str, str], list[data.Passage]] = {}
  for index, (decision, record) in enumerate(zip(decisions, records)):
    if decision["kept"]:
      key = (record["language"], record["query_id"])
      kept.setdefault(key, []).append(data.Passage(f"{ctx.name}-adv-{index}", decision["title"], record["text"]))
  stage_config = config.adversarial.train
  batches = training.supervised_batches(ctx, stage_config, rows, config.seed + number(ctx.name),
                                        adversarial={k: tuple(p) for k, p in kept.items()},
                                        adversarial_per_group=config.adversarial.adversarial_per_group)
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
