"""What the training stages share: where a stage starts from, its fingerprint fields, checks, the loop call.

A training stage starts from its ``init_checkpoint`` when set, else from the previous training stage
(ICT -> pretrain -> finetune -> round_1 -> ...) that is configured to run or complete in the workdir,
else from ``model.init_from`` (a Hugging Face encoder), else from a random initialisation.
"""
from __future__ import annotations

import jax
from absl import logging

from axl_jax import batching, checkpoints, data, distributed, encoder, hf_checkpoint, prepared, trainer
from axl_jax.stages import StageResult

TRAINING_STAGES = ("ict", "pretrain", "finetune")

# Fields of a stage config that change how often things are written, not what is trained.
_COSMETIC = ("checkpoint_every", "keep_checkpoints", "log_every", "init_checkpoint")


def training_order(config) -> tuple[str, ...]:
  """Training stages in the order each starts from the one before: ICT, supervised, the adversarial rounds."""
  return TRAINING_STAGES + tuple(f"round_{i}" for i in range(1, config.adversarial.rounds + 1))


def previous_stage(config, name: str | None, available) -> str | None:
  """The latest training stage before ``name`` (any, for None) that is configured to run or complete."""
  order = training_order(config)
  earlier = order[:order.index(name)] if name in order else order
  return next((stage for stage in reversed(earlier) if available(stage)), None)


def inputs(config, name: str, available, init_checkpoint: str) -> list[str]:
  if init_checkpoint:
    return []
  previous = previous_stage(config, name, available)
  return [previous] if previous else []


def stage_fields(prefix: str, stage_config, init_checkpoint: str) -> dict:
  """The stage config's fields that decide the trained parameters, and where it starts from."""
  fields = {f"{prefix}.{k}": v for k, v in stage_config.to_dict().items() if k not in _COSMETIC}
  # Fields at the value all there was before they existed: stages trained then keep their fingerprints.
  for field, default in (("optimizer", "adamw"), ("grad_cache_chunks", 1)):
    if fields.get(f"{prefix}.{field}") == default:
      del fields[f"{prefix}.{field}"]
  if init_checkpoint:  # By content: the same parameters moved elsewhere are the same start.
    fields[f"{prefix}.init_checkpoint"] = checkpoints.digest(init_checkpoint)
  return fields


def check_stage(config, prefix: str, stage_config):
  """The stage's fields; the batch against the device count once the process has opened its devices (the
  pipeline validates again then: before, the rounds' generators may own them)."""
  devices = jax.device_count() if distributed.backends_started() else stage_config.batch_size
  chunks = stage_config.get("grad_cache_chunks", 1)
  checks = [
      (stage_config.batch_size % devices == 0,
       f"{prefix}.batch_size ({stage_config.batch_size}) must be a multiple of the device count ({devices})"),
      (chunks >= 1 and (stage_config.batch_size // devices) % chunks == 0,
       f"{prefix}.grad_cache_chunks ({chunks}) must divide the queries per device "
       f"({stage_config.batch_size} / {devices} devices)"),
      (stage_config.group_size >= 1, f"{prefix}.group_size must be at least 1"),
      (stage_config.num_steps >= 1, f"{prefix}.num_steps must be at least 1"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"config: {message}")


def _initial_params(ctx, stage_config, init_checkpoint: str):
  """A zero-argument function giving the starting parameters (only called when not resuming), and its source."""
  source = init_checkpoint or (ctx.workdir.checkpoints(ctx.inputs[0]) if ctx.inputs else "")
  model_config = ctx.config.model

  def initial():
    if source:
      logging.info("%s starts from %s", ctx.name, source)
      params, trained_config = checkpoints.restore_params(source, model_config)
      if trained_config.to_dict() != model_config.to_dict():
        logging.warning("%s: %s was trained with another model config; its parameters must still fit", ctx.name,
                        source)
      return params
    if model_config.init_from:
      logging.info("%s starts from the Hugging Face encoder %s", ctx.name, model_config.init_from)
      _, params = hf_checkpoint.load_encoder(model_config.init_from, model_config)
      return jax.device_put(params, checkpoints.replicated_sharding())
    logging.info("%s starts from a random initialisation (seed %d)", ctx.name, ctx.config.seed)
    return jax.device_put(encoder.init_params(model_config, jax.random.key(ctx.config.seed)),
                          checkpoints.replicated_sharding())
  return initial, source or model_config.init_from or "random"


def train(ctx, stage_config, batches, init_checkpoint: str = "") -> StageResult:
  """Runs (or resumes) the stage's training loop from where the stage starts."""
  initial, source = _initial_params(ctx, stage_config, init_checkpoint)
  final_metrics, directory = trainer.train(ctx.name, stage_config, ctx.config, ctx.workdir.root, batches, initial,
                                           fingerprint=ctx.fingerprint)
  final_metrics["initialised_from"] = source
  return StageResult(final_metrics, str(directory))


def batch_shape(ctx, stage_config) -> batching.BatchShape:
  return batching.batch_shape(ctx.config, stage_config, jax.process_index(), jax.process_count(), ctx.name)


def supervised_batches(ctx, stage_config, rows, seed: int, **adversarial) -> batching.SupervisedBatches:
  """Batches of ``rows`` (prepared rows, or a list of ``TrainExample``)."""
  config = ctx.config
  return batching.SupervisedBatches(rows, ctx.tokenizer, batch_shape(ctx, stage_config), seed,
                                    config.data.query_max_length, config.data.passage_max_length,
                                    config.data.title_separator, **adversarial)


def rows_fields(config, prefix: str, stage_config) -> dict:
  """The training rows a stage reads, by spec and by content."""
  return {f"{prefix}.rows": [[language, stage_config.train_data, data.spec_identity(spec)]
                             for language, spec in data.training_specs(config, stage_config)]}


def rows_specs(config, stage_config) -> list[str]:
  return [spec for _, spec in data.training_specs(config, stage_config)]


def supervised_stage(section: str):
  """``inputs, fingerprint_fields, check_config, run`` of a supervised stage trained on ``config.<section>``."""

  def stage_inputs(config, name, available):
    return inputs(config, name, available, config[section].init_checkpoint)

  def fingerprint_fields(config, name):
    stage_config = config[section]
    return {**stage_fields(section, stage_config, stage_config.init_checkpoint),
            **rows_fields(config, section, stage_config)}

  def check_config(config, name):
    check_stage(config, section, config[section])
    return rows_specs(config, config[section])

  def run(ctx):
    stage_config = ctx.config[section]
    rows = prepared.training_rows(ctx.config, stage_config, prepared.store(ctx.config, ctx.workdir.root))
    batches = supervised_batches(ctx, stage_config, rows, ctx.config.seed)
    return train(ctx, stage_config, batches, stage_config.init_checkpoint)

  return stage_inputs, fingerprint_fields, check_config, run
