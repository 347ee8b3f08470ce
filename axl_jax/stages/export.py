"""The ``export`` stage: corpus and query embeddings of the final (or a chosen) checkpoint as numpy shards.

``<workdir>/export/<lang>/corpus.NNNNN.npy`` (float32 ``[n, dim]``) with ``corpus.NNNNN.ids.txt``, likewise
``queries-<split>.*``, and ``<name>.manifest.json``. The shards are hard links to the checkpoint's
embeddings under ``<workdir>/embeddings/`` (copies where links are impossible): a checkpoint already
encoded for evaluation is not encoded again.
"""
from __future__ import annotations

import os
import shutil

import jax

from axl_jax import checkpoints, data, embeddings, io
from axl_jax.stages import StageResult, evaluate

EXPENSIVE = False


def _splits(config) -> list[str]:
  return [s.strip() for s in config.export.splits.split(",") if s.strip()]


def inputs(config, name, available):
  return evaluate.final_checkpoint(config, config.export.checkpoint, available, "export")


def fingerprint_fields(config, name):
  fields = {}
  if config.export.checkpoint:
    fields["export.checkpoint"] = checkpoints.digest(config.export.checkpoint)
  if name == "export":
    fields.update({"export.splits": config.export.splits, "evaluate.shard_size": config.evaluate.shard_size})
    fields["data"] = {language: [data.spec_identity(data.expand_spec(config.data.corpus, config.data.root, language))]
                      + [data.spec_identity(data.expand_spec(config.data.queries, config.data.root, language, split))
                         for split in _splits(config)]
                      for language in data.parse_languages(config.data.languages)}
  return fields


def check_config(config, name):
  return [data.expand_spec(template, config.data.root, language, split)
          for language in data.parse_languages(config.data.languages)
          for template, split in [(config.data.corpus, "")] + [(config.data.queries, s) for s in _splits(config)]]


def checkpoint(ctx) -> str:
  return ctx.config.export.checkpoint or ctx.workdir.checkpoints(ctx.inputs[0])


def _link(source: str, target: str):
  if os.path.exists(target):
    if os.path.samefile(source, target):
      return  # Linked by an interrupted run of this stage.
    os.remove(target)
  try:
    os.link(source, target)
  except OSError:  # Another file system, or one without hard links.
    shutil.copyfile(source, target)


def run(ctx) -> StageResult:
  encoder = embeddings.Encoder(checkpoint(ctx), ctx.config, ctx.tokenizer)
  counts = {}
  for language in ctx.languages:
    source = embeddings.language_embeddings(ctx.workdir.root, encoder, language, _splits(ctx.config))
    if jax.process_index() > 0:
      continue  # Process 0 links the shards every process encoded (the stage ends with a barrier).
    target = os.path.join(ctx.stage_dir, language)
    os.makedirs(target, exist_ok=True)
    for name in ["corpus"] + [f"queries-{split}" for split in _splits(ctx.config)]:
      manifest = embeddings.read_shards_manifest(source, name)
      for shard in manifest["shards"]:
        for file_name in (shard["embeddings"], shard["ids"]):
          _link(os.path.join(source, file_name), os.path.join(target, file_name))
      io.write_json(embeddings.shards_manifest_path(target, name), dict(manifest, checkpoint=encoder.checkpoint))
      counts[f"{language}/{name}"] = manifest["count"]
  return StageResult(counts)
