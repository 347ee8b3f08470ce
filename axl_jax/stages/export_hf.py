"""The ``export_hf`` stage: the final (or a chosen) checkpoint as a Hugging Face + sentence-transformers directory.

``<workdir>/export_hf/model/`` (``query/`` and ``passage/`` for untied towers); see ``hf_checkpoint.export_encoder``.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from axl_jax import checkpoints, distributed, hf_checkpoint
from axl_jax.stages import StageResult, export

EXPENSIVE = False
inputs, fingerprint_fields = export.inputs, export.fingerprint_fields


def check_config(config, name):
  return []


def run(ctx) -> StageResult:
  checkpoint = export.checkpoint(ctx)
  params, model_config = checkpoints.restore_params(checkpoint, ctx.config.model)
  params = jax.tree.map(np.asarray, params)
  directories = {}
  for tower, tower_params in params.items():
    name = "model" if model_config.tied else tower.replace("_encoder", "")
    directories[name] = os.path.join(ctx.stage_dir, name)
    # The lengths the towers were trained with; a tied model reads passages, the longer of the two.
    data_config = ctx.config.data
    max_length = data_config.query_max_length if name == "query" else data_config.passage_max_length
    if distributed.process_index() == 0:  # every process restored the checkpoint; one writes it
      hf_checkpoint.export_encoder(tower_params, model_config, ctx.tokenizer, directories[name],
                                   max_seq_length=max_length)
  logging.info("Exported %s to %s", checkpoint, directories)
  return StageResult({"checkpoint": checkpoint, **directories})
