"""A run is a sequence of named stages; each keeps its own directory, manifest and completion marker.

``<workdir>/<stage>/`` holds the stage's orbax checkpoints, TensorBoard files, ``manifest.json`` (its
config, final metrics and final checkpoint) and ``COMPLETE``. Re-running the same command skips
completed stages and resumes an interrupted one from its latest checkpoint. Training stages start
from the last completed training stage before them (or ``<stage>.init_checkpoint``); ``evaluate``
and ``export`` use the last completed training stage (or their ``checkpoint`` field).

Stages are found by name in ``STAGES``: adding one is one function with ``@stage("name")``.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import time
from typing import Callable

import jax
import numpy as np
from absl import logging

from axl_jax import (batching, bm25, checkpoints, data, embeddings, encoder, hf_checkpoint, metrics, search,
                     trainer)
from axl_jax.tokenization import get_tokenizer

TRAIN_STAGES = ("ict", "pretrain", "finetune")
STAGES: dict[str, Callable] = {}


def find_stage(name: str) -> Callable | None:
  """The stage function for ``name``: a registered stage, or ``round_<k>`` (an adversarial round)."""
  if name in STAGES:
    return STAGES[name]
  match = re.fullmatch(r"round_([1-9][0-9]*)", name)
  if match:
    from axl_jax import rounds  # Imported late: rounds builds on this module.
    return functools.partial(rounds.round_stage, number=int(match.group(1)))
  return None


def stage(name: str):
  def register(fn):
    STAGES[name] = fn
    return fn
  return register


@dataclasses.dataclass
class StageResult:
  metrics: dict
  checkpoint: str | None = None     # final checkpoint directory (training stages)


@dataclasses.dataclass
class Context:
  config: object
  workdir: str
  tokenizer: object = None

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def completed_manifest(self, name: str) -> dict | None:
    if not os.path.exists(os.path.join(self.stage_dir(name), "COMPLETE")):
      return None
    with open(os.path.join(self.stage_dir(name), "manifest.json"), encoding="utf-8") as file:
      return json.load(file)

  @property
  def training_order(self) -> tuple[str, ...]:
    """Training stages in order: ICT, supervised, then the adversarial rounds."""
    return TRAIN_STAGES + tuple(f"round_{i}" for i in range(1, self.config.adversarial.rounds + 1))

  def last_trained_checkpoint(self, before: str | None = None) -> str | None:
    """The final checkpoint of the latest completed training stage preceding ``before``."""
    order = self.training_order
    if before in order:
      order = order[:order.index(before)]
    for name in reversed(order):
      manifest = self.completed_manifest(name)
      if manifest and manifest.get("checkpoint"):
        return self.stage_checkpoints(name)
    return None

  def stage_checkpoints(self, name: str) -> str:
    # From the workdir, not the manifest's absolute path, so a moved or copied workdir still works.
    return os.path.abspath(os.path.join(self.stage_dir(name), "checkpoints"))

  @property
  def languages(self) -> list[str]:
    return data.parse_languages(self.config.data.languages)

  def spec(self, template: str, language: str = "", split: str = "") -> str:
    return data.expand_spec(template, self.config.data.root, language, split)

  @functools.lru_cache(maxsize=None)
  def corpus(self, language: str) -> list[data.Passage]:
    return data.read_corpus(self.spec(self.config.data.corpus, language))

  def query_buckets(self) -> tuple[int, ...]:
    longest = self.config.data.query_max_length
    return tuple(sorted({max(8, longest // 4), max(8, longest // 2), longest}))

  def passage_buckets(self) -> tuple[int, ...]:
    buckets = [int(b) for b in self.config.data.passage_length_buckets.split(",") if b.strip()]
    return tuple(sorted({b for b in buckets if b < self.config.data.passage_max_length}
                        | {self.config.data.passage_max_length}))

  def __hash__(self):
    return id(self)


def batch_shape(ctx: Context, stage_config) -> batching.BatchShape:
  return batching.BatchShape(stage_config.batch_size, stage_config.group_size, ctx.query_buckets(),
                             ctx.passage_buckets(), jax.process_index(), jax.process_count())


def _initial_params(ctx: Context, name: str, stage_config):
  """Where a training stage starts: its init_checkpoint, the previous stage, or a fresh init."""
  source = stage_config.init_checkpoint or ctx.last_trained_checkpoint(before=name)
  def initial():
    if source:
      logging.info("%s starts from %s", name, source)
      params, model_config = checkpoints.restore_params(source, ctx.config.model)
      if model_config.to_dict() != ctx.config.model.to_dict():
        logging.warning("%s: %s was trained with another model config; its parameters must still fit", name, source)
      return params
    if ctx.config.model.init_from:
      logging.info("%s starts from the Hugging Face encoder %s", name, ctx.config.model.init_from)
      _, params = hf_checkpoint.load_encoder(ctx.config.model.init_from, ctx.config.model)
      return jax.device_put(params, checkpoints.replicated_sharding())
    logging.info("%s starts from a random initialisation (seed %d)", name, ctx.config.seed)
    return jax.device_put(encoder.init_params(ctx.config.model, jax.random.key(ctx.config.seed)),
                          checkpoints.replicated_sharding())
  return initial, source or ctx.config.model.init_from


def train_from_batches(ctx: Context, name: str, batches, stage_config=None) -> StageResult:
  stage_config = stage_config or getattr(ctx.config, name)
  initial, source = _initial_params(ctx, name, stage_config)
  final_metrics, directory = trainer.train(name, stage_config, ctx.config, ctx.workdir, batches, initial)
  final_metrics["initialised_from"] = source or "random"
  return StageResult(final_metrics, str(directory))


@stage("ict")
def ict_stage(ctx: Context) -> StageResult:
  config = ctx.config
  spec_template = config.ict.corpus or config.data.corpus
  passages = [(language, passage) for language in ctx.languages
              for passage in data.read_corpus(ctx.spec(spec_template, language))]
  batches = batching.ICTBatches(passages, ctx.tokenizer, batch_shape(ctx, config.ict), config.seed,
                                config.data.query_max_length, config.data.passage_max_length,
                                config.data.title_separator, config.ict.remove_sentence_prob,
                                config.ict.min_sentence_chars)
  return train_from_batches(ctx, "ict", batches)


def _supervised_stage(ctx: Context, name: str) -> StageResult:
  config, stage_config = ctx.config, getattr(ctx.config, name)
  languages = data.parse_languages(stage_config.languages, f"{name}.languages") or [""]
  examples = [example for language in languages
              for example in data.read_train(ctx.spec(stage_config.train_data, language, "train"))]
  batches = batching.SupervisedBatches(examples, ctx.tokenizer, batch_shape(ctx, stage_config), config.seed,
                                       config.data.query_max_length, config.data.passage_max_length,
                                       config.data.title_separator)
  return train_from_batches(ctx, name, batches)


stage("pretrain")(lambda ctx: _supervised_stage(ctx, "pretrain"))
stage("finetune")(lambda ctx: _supervised_stage(ctx, "finetune"))


def _checkpoint_for(ctx: Context, field_value: str, what: str) -> str:
  checkpoint = field_value or ctx.last_trained_checkpoint()
  if not checkpoint:
    raise FileNotFoundError(f"{what}: no completed training stage in {ctx.workdir}; "
                            f"set --config.{what}.checkpoint=PATH to a stage's checkpoints directory")
  return checkpoint


def encoder_for(ctx: Context, checkpoint: str):
  params, model_config = checkpoints.restore_params(checkpoint, ctx.config.model)
  config = ctx.config

  def encode(texts: list[str], tower: str, progress) -> np.ndarray:
    max_length = config.data.query_max_length if tower == "query" else config.data.passage_max_length
    buckets = ctx.query_buckets() if tower == "query" else ctx.passage_buckets()
    return embeddings.encode_texts(params, model_config, ctx.tokenizer, texts, tower, max_length, buckets,
                                   config.evaluate.encode_batch_size, progress)
  return encode


def _export_language(ctx: Context, encode, directory: str, language: str, splits: list[str],
                     checkpoint: str) -> dict:
  """Corpus and query embedding shards of one language; returns {name: manifest}."""
  config = ctx.config
  corpus = ctx.corpus(language)
  texts = {p.docid: data.passage_text(p, config.data.title_separator) for p in corpus}
  header = {"checkpoint": checkpoint, "language": language, "model": config.model.to_dict()}
  manifests = {"corpus": embeddings.export_shards(
      directory, "corpus", [p.docid for p in corpus],
      lambda ids, progress: encode([texts[i] for i in ids], "passage", progress),
      config.evaluate.shard_size, dict(header, tower="passage"), f"{language} corpus")}
  for split in splits:
    queries = {q.query_id: q.query for q in data.read_queries(ctx.spec(config.data.queries, language, split))}
    manifests[f"queries-{split}"] = embeddings.export_shards(
        directory, f"queries-{split}", list(queries),
        lambda ids, progress: encode([queries[i] for i in ids], "query", progress),
        config.evaluate.shard_size, dict(header, tower="query", split=split), f"{language} {split} queries")
  return manifests


def retrieval_results(ctx: Context, systems: dict[str, str], split: str, out_dir: str,
                      with_bm25: bool) -> dict[str, dict[str, dict]]:
  """``{system: {language: metrics}}`` of dense retrieval (FAISS over exported shards) and BM25.

  Writes each system's embeddings and TREC run files under ``out_dir``.
  """
  config = ctx.config
  results: dict[str, dict[str, dict]] = {}
  encoders = {name: encoder_for(ctx, checkpoint) for name, checkpoint in systems.items()}
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  for language in ctx.languages:
    corpus = ctx.corpus(language)
    queries = data.read_queries(ctx.spec(config.data.queries, language, split))
    if config.data.qrels:
      qrels_path = ctx.spec(config.data.qrels, language, split)
      qrels = data.read_qrels(qrels_path)
    else:
      qrels_path, qrels = ctx.spec(config.data.queries, language, split), data.qrels_from_queries(queries)
    data.check_qrels(qrels, {p.docid for p in corpus}, qrels_path)
    query_ids = [q.query_id for q in queries]
    runs = {}
    if with_bm25:
      runs["BM25"] = bm25.bm25_run([p.docid for p in corpus],
                                   [data.passage_text(p, " ") for p in corpus], query_ids,
                                   [q.query for q in queries], config.evaluate.depth)
    for name, checkpoint in systems.items():
      directory = os.path.join(out_dir, "embeddings", name, language)
      _export_language(ctx, encoders[name], directory, language, [split], checkpoint)
      query_vectors = np.concatenate([e for _, e in embeddings.load_shards(directory, f"queries-{split}")])
      scores, docids = search.search_shards(
          query_vectors, embeddings.load_shards(directory, "corpus"), config.evaluate.depth,
          config.evaluate.index, ivf_lists=config.evaluate.ivf_lists, hnsw_neighbors=config.evaluate.hnsw_neighbors)
      runs[name] = search.to_run(query_ids, scores, docids)
    for name, run in runs.items():
      metrics.write_trec_run(os.path.join(out_dir, "runs", f"{name}.{language}.{split}.trec"), run, name)
      results.setdefault(name, {})[language] = metrics.evaluate_run(qrels, run)
  return results


@stage("evaluate")
def evaluate_stage(ctx: Context) -> StageResult:
  """BM25, the stages named in ``evaluate.also_checkpoints`` and the final model, per language, in one table."""
  config, stage_dir = ctx.config, ctx.stage_dir("evaluate")
  split = config.evaluate.split
  systems = {}
  for name in [s.strip() for s in config.evaluate.also_checkpoints.split(",") if s.strip()]:
    manifest = ctx.completed_manifest(name)
    if manifest is None:
      raise FileNotFoundError(f"evaluate.also_checkpoints: stage {name!r} has not completed in {ctx.workdir}")
    systems[name] = ctx.stage_checkpoints(name)
  final = _checkpoint_for(ctx, config.evaluate.checkpoint, "evaluate")
  final_name = next((n for n in reversed(ctx.training_order) if ctx.completed_manifest(n)
                     and ctx.stage_checkpoints(n) == os.path.abspath(final)), "model")
  systems[final_name] = final
  results = retrieval_results(ctx, systems, split, stage_dir, config.evaluate.bm25)
  checkpoints.write_json_atomic(os.path.join(stage_dir, "results.json"), results)
  tables = "\n\n".join(metrics.format_table(results, ctx.languages, m) for m in metrics.MEASURES)
  with open(os.path.join(stage_dir, "results.md"), "w", encoding="utf-8") as file:
    file.write(tables + "\n")
  print(f"\nRetrieval on {split} ({config.evaluate.index} index, depth {config.evaluate.depth}):\n\n{tables}\n",
        flush=True)
  summary = {f"{name}/{m}": float(np.mean([r[l][m] for l in ctx.languages]))
             for name, r in results.items() for m in metrics.MEASURES}
  return StageResult(summary)


@stage("export")
def export_stage(ctx: Context) -> StageResult:
  """Corpus and query embeddings of the final (or a chosen) checkpoint, as numpy shards."""
  config = ctx.config
  checkpoint = _checkpoint_for(ctx, config.export.checkpoint, "export")
  encode = encoder_for(ctx, checkpoint)
  splits = [s.strip() for s in config.export.splits.split(",") if s.strip()]
  counts = {}
  for language in ctx.languages:
    manifests = _export_language(ctx, encode, os.path.join(ctx.stage_dir("export"), language), language,
                                 splits, checkpoint)
    counts.update({f"{language}/{name}": manifest["count"] for name, manifest in manifests.items()})
  return StageResult(counts, None)


@stage("export_hf")
def export_hf_stage(ctx: Context) -> StageResult:
  """The final (or a chosen) checkpoint as a Hugging Face + sentence-transformers model directory."""
  checkpoint = _checkpoint_for(ctx, ctx.config.export.checkpoint, "export")
  params, model_config = checkpoints.restore_params(checkpoint, ctx.config.model)
  params = jax.tree.map(np.asarray, params)
  directories = {}
  for tower, tower_params in params.items():
    name = "model" if model_config.tied else tower.replace("_encoder", "")
    directories[name] = os.path.join(ctx.stage_dir("export_hf"), name)
    hf_checkpoint.export_encoder(tower_params, model_config, ctx.tokenizer, directories[name])
  logging.info("Exported %s to %s", checkpoint, directories)
  return StageResult({"checkpoint": checkpoint, **directories})


def validate_config(config) -> list[str]:
  """Fails at launch on what would otherwise fail an hour in; returns the stage names to run."""
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  for name in names:
    if find_stage(name) is None:
      raise ValueError(f"config field stages: unknown stage {name!r}; known: {','.join(STAGES)},round_<k>")
    if name.startswith("round_") and int(name[6:]) > config.adversarial.rounds:
      raise ValueError(f"config field stages: {name} but adversarial.rounds is {config.adversarial.rounds}")
  data.parse_languages(config.data.languages)
  model = config.model
  checks = [
      (model.pooling in ("cls", "mean"), "model.pooling must be cls or mean"),
      (model.attention_impl in ("xla", "cudnn", "auto"), "model.attention_impl must be xla, cudnn or auto"),
      (model.hidden_size % model.num_heads == 0, "model.hidden_size must be a multiple of model.num_heads"),
      (config.data.passage_max_length + model.position_offset <= model.max_position_embeddings,
       "data.passage_max_length + model.position_offset must not exceed model.max_position_embeddings"),
      (config.data.query_max_length + model.position_offset <= model.max_position_embeddings,
       "data.query_max_length + model.position_offset must not exceed model.max_position_embeddings"),
      (config.evaluate.index in ("flat", "ivf", "hnsw"), "evaluate.index must be flat, ivf or hnsw"),
      (config.adversarial.selection in ("hardest", "random", "all"),
       "adversarial.selection must be hardest, random or all"),
      (config.generator.backend in ("qwen", "rules"), "generator.backend must be qwen or rules"),
  ]
  trained = [(name, getattr(config, name)) for name in TRAIN_STAGES if name in names]
  if any(name.startswith("round_") for name in names):
    trained.append(("adversarial.train", config.adversarial.train))
  for name, stage_config in trained:
    data.parse_languages(stage_config.languages, f"{name}.languages")
    checks += [
        (stage_config.batch_size % jax.device_count() == 0,
         f"{name}.batch_size ({stage_config.batch_size}) must be a multiple of the device count ({jax.device_count()})"),
        (stage_config.group_size >= 1, f"{name}.group_size must be at least 1"),
        (stage_config.num_steps >= 1, f"{name}.num_steps must be at least 1"),
    ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"config: {message}")
  # Local data must exist now, not when the stage that reads it starts.
  ctx = Context(config, "")
  specs = []
  if any(n in names for n in ("ict", "evaluate", "export")) or not config.tokenizer.name_or_path:
    specs += [ctx.spec(config.ict.corpus or config.data.corpus, lang) for lang in ctx.languages]
  for name in ("pretrain", "finetune"):
    if name in names:
      stage_config = getattr(config, name)
      langs = data.parse_languages(stage_config.languages, f"{name}.languages") or [""]
      specs += [ctx.spec(stage_config.train_data, lang, "train") for lang in langs]
  if "evaluate" in names:
    specs += [ctx.spec(config.data.queries, lang, config.evaluate.split) for lang in ctx.languages]
  for spec in specs:
    if not spec.startswith("hf:") and not glob.glob(spec):
      raise FileNotFoundError(f"config: data file {spec!r} does not exist (check data.root and the data fields)")
  return names


def _tokenizer_texts(ctx: Context):
  per_language = ctx.config.tokenizer.train_docs_per_language
  for language in ctx.languages:
    for passage in ctx.corpus(language)[:per_language]:
      yield data.passage_text(passage, " ")


def run(config, workdir: str) -> dict[str, dict]:
  """Runs the configured stages in order, skipping completed ones; returns each stage's metrics."""
  if config.model.init_from:
    # The checkpoint decides the architecture; the config keeps pooling, projection, dtype and the rest.
    hf_config = hf_checkpoint.read_hf_config(hf_checkpoint.resolve(config.model.init_from))
    config.model.update(hf_checkpoint.model_config_from_hf(hf_config, config.model).to_dict())
  names = validate_config(config)
  ctx = Context(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  ctx.tokenizer = get_tokenizer(config, workdir, lambda: _tokenizer_texts(ctx))
  if not config.tokenizer.name_or_path:
    with config.unlocked():
      config.model.vocab_size = len(ctx.tokenizer)
  outcome = {}
  for name in names:
    manifest = ctx.completed_manifest(name)
    if manifest is not None:
      logging.info("Stage %s is complete (%s); skipping it", name, ctx.stage_dir(name))
      outcome[name] = manifest["metrics"]
      continue
    logging.info("Stage %s starts", name)
    started = time.time()
    result = find_stage(name)(ctx)
    manifest = {"stage": name, "config": json.loads(config.to_json_best_effort()), "metrics": result.metrics,
                "checkpoint": result.checkpoint, "seconds": round(time.time() - started, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if jax.process_index() == 0:
      checkpoints.write_json_atomic(os.path.join(ctx.stage_dir(name), "manifest.json"), manifest)
      with open(os.path.join(ctx.stage_dir(name), "COMPLETE"), "w", encoding="utf-8") as file:
        file.write(manifest["finished"] + "\n")
    outcome[name] = result.metrics
  return outcome


# Stages defined in their own modules register themselves on import.
from axl_jax import visualize  # noqa: E402,F401
