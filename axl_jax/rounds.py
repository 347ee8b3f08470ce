"""The AXL rounds (stages ``round_1`` .. ``round_N``): generate -> filter -> train -> evaluate on dev.

Each round starts from the previous training stage's final parameters and
1. generates candidates for the training queries in the negatives subprocess (torch-free; a killed
   round reuses its finished shards; the seed changes per round so later rounds see new candidates);
2. scores every candidate that passed the generator's checks with the current retriever,
   s(q, pos), s(q, neg) and the best BM25 negative's score, and keeps the hardest fraction per language
   behind the false-negative guard (``adversarial.filter_decisions``); every decision goes to
   ``decisions.jsonl`` so a user can audit what was trained on;
3. trains on groups of the positive, kept adversarial negatives and BM25 negatives;
4. evaluates on dev and keeps the round's statistics in its manifest and TensorBoard files.

Only the generated negatives are scored: the corpus is never re-indexed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from absl import logging

from axl_jax import adversarial, batching, checkpoints, data, stages, trainer
from axl_jax.negatives.records import read_records


def _generate(ctx: stages.Context, number: int, stage_dir: str) -> list[dict]:
  config = ctx.config.copy_and_resolve_references()
  config.generator.seed = ctx.config.generator.seed + number
  # The round trains on finetune's rows, so it generates for exactly those.
  config.generator.languages = ctx.config.finetune.languages
  config.generator.train_data = ""
  config_path = os.path.join(stage_dir, "generator_config.json")
  checkpoints.write_json_atomic(config_path, json.loads(config.to_json_best_effort()))
  output = os.path.join(stage_dir, "negatives")
  command = [sys.executable, "-m", "axl_jax.negatives.generate", f"--config_json={config_path}", f"--output={output}"]
  logging.info("round_%d: generating negatives: %s", number, " ".join(command))
  subprocess.run(command, check=True)
  return read_records(output)


def _score(ctx: stages.Context, checkpoint: str, records: list[dict], examples: dict[str, data.TrainExample]):
  """s(q, pos), s(q, neg) and the best BM25 negative's score for every record."""
  config = ctx.config
  encode = stages.encoder_for(ctx, checkpoint)
  query_ids = sorted({r["query_id"] for r in records})
  query_vectors = dict(zip(query_ids, encode([examples[q].query for q in query_ids], "query", None)))
  passages = {}
  for query_id in query_ids:
    for passage in examples[query_id].positives + examples[query_id].negatives:
      passages.setdefault(passage.docid, data.passage_text(passage, config.data.title_separator))
  passage_ids = sorted(passages)
  passage_vectors = dict(zip(passage_ids, encode([passages[d] for d in passage_ids], "passage", None)))
  titles = {p.docid: p.title for e in examples.values() for p in e.positives}
  negative_texts = [data.passage_text(data.Passage("", titles.get(r["source_docid"], ""), r["text"]),
                                      config.data.title_separator) for r in records]
  negative_vectors = encode(negative_texts, "passage", None) if records else np.zeros((0, 1))
  positive, negative, bm25_best = [], [], []
  for record, vector in zip(records, negative_vectors):
    query = query_vectors[record["query_id"]]
    positive.append(float(query @ passage_vectors[record["source_docid"]]))
    negative.append(float(query @ vector))
    bm25 = [float(query @ passage_vectors[p.docid]) for p in examples[record["query_id"]].negatives]
    bm25_best.append(max(bm25) if bm25 else None)
  return np.asarray(positive), np.asarray(negative), bm25_best


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


def round_stage(ctx: stages.Context, number: int) -> stages.StageResult:
  config, name = ctx.config, f"round_{number}"
  stage_dir = ctx.stage_dir(name)
  os.makedirs(stage_dir, exist_ok=True)
  checkpoint = ctx.last_trained_checkpoint(before=name)
  if not checkpoint:
    raise FileNotFoundError(f"{name}: no completed training stage before it in {ctx.workdir}")
  languages = data.parse_languages(config.finetune.languages, "finetune.languages") or [""]
  train_examples = [e for language in languages
                    for e in data.read_train(ctx.spec(config.finetune.train_data, language, "train"))]
  by_query = {e.query_id: e for e in train_examples}

  records_all = _generate(ctx, number, stage_dir)
  records = [r for r in records_all if r["accepted"]]
  decisions_path = os.path.join(stage_dir, "decisions.jsonl")
  if os.path.exists(decisions_path):  # A resumed round reuses its decisions: scoring is not repeated.
    with open(decisions_path, encoding="utf-8") as file:
      decisions = [json.loads(line) for line in file]
  else:
    positive, negative, bm25_best = _score(ctx, checkpoint, records, by_query)
    decisions = adversarial.filter_decisions(
        positive, negative, [r["language"] for r in records], keep_fraction=config.adversarial.keep_fraction,
        selection=config.adversarial.selection, guard=config.adversarial.guard,
        guard_margin=config.adversarial.guard_margin, seed=config.seed + number)
    for decision, record, pos, neg, bm25 in zip(decisions, records, positive, negative, bm25_best):
      decision.update(query_id=record["query_id"], technique=record["technique"], language=record["language"],
                      source_docid=record["source_docid"], score_positive=float(pos), score_negative=float(neg),
                      score_best_bm25=bm25, text=record["text"])
    with open(decisions_path + ".partial", "w", encoding="utf-8") as file:
      file.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in decisions))
    os.replace(decisions_path + ".partial", decisions_path)

  kept: dict[str, list[data.Passage]] = {}
  for index, (decision, record) in enumerate(zip(decisions, records)):
    if decision["kept"]:
      title = next((p.title for p in by_query[record["query_id"]].positives if p.docid == record["source_docid"]), "")
      kept.setdefault(record["query_id"], []).append(data.Passage(f"{name}-adv-{index}", title, record["text"]))
  stage_config = config.adversarial.train
  batches = batching.SupervisedBatches(
      train_examples, ctx.tokenizer, stages.batch_shape(ctx, stage_config), config.seed + number,
      config.data.query_max_length, config.data.passage_max_length, config.data.title_separator,
      adversarial={q: tuple(p) for q, p in kept.items()},
      adversarial_per_group=config.adversarial.adversarial_per_group)
  result = stages.train_from_batches(ctx, name, batches, stage_config)

  dev = stages.retrieval_results(ctx, {name: result.checkpoint}, "dev", stage_dir, with_bm25=False)[name]
  stats = _statistics(records_all, records, decisions)
  for measure in ("MRR@100", "Recall@100"):
    stats.update({f"dev/{language}/{measure}": dev[language][measure] for language in dev})
    stats[f"dev/avg/{measure}"] = float(np.mean([dev[language][measure] for language in dev]))
  writer = trainer.create_writer(config, os.path.join(stage_dir, "round_stats"))
  writer.write_scalars(number, {k: v for k, v in stats.items() if isinstance(v, (int, float))})
  writer.flush()
  checkpoints.write_json_atomic(os.path.join(stage_dir, "round_stats.json"), stats)
  logging.info("%s: %d candidates, %d passed the checks, %d kept; dev MRR@100 %.3f", name, stats["candidates"],
               stats["accepted_by_checks"], stats["kept"], stats["dev/avg/MRR@100"])
  return stages.StageResult({**result.metrics, **stats}, result.checkpoint)
