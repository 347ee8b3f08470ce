"""The training loop of one contrastive stage: resume, step, log, checkpoint.

The stage resumes from its latest finished checkpoint; because batches are a pure function of
``(seed, step)`` and the dropout key is folded with the step, a resumed run computes exactly what an
uninterrupted one would. Non-finite steps are skipped by the step itself; a whole logging interval of
them stops the run loudly.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from axl_jax import checkpoints
from axl_jax import train_step as ts
from axl_jax.encoder import BiEncoder


def create_writer(config, logdir: str):
  writer = metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)
  if config.logging.wandb and jax.process_index() == 0:
    import wandb  # Optional dependency, only when asked for.
    run = wandb.init(project=config.logging.wandb_project, dir=logdir, config=config.to_dict(), resume="allow")

    class _Wandb(metric_writers.MetricWriter):
      def write_scalars(self, step, scalars):
        run.log(dict(scalars), step=step)
      def write_images(self, step, images): pass
      def write_videos(self, step, videos): pass
      def write_audios(self, step, audios, *, sample_rate): pass
      def write_texts(self, step, texts): pass
      def write_histograms(self, step, arrays, num_buckets=None): pass
      def write_hparams(self, hparams): run.config.update(hparams, allow_val_change=True)
      def flush(self): pass
      def close(self): run.finish()
    writer = metric_writers.MultiWriter([writer, _Wandb()])
  return writer


def _prefetch(make_batch: Callable[[int], dict], steps: range, depth: int = 2):
  """Builds the next batches on a host thread while the devices run the current step."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = [pool.submit(make_batch, step) for step in steps[:depth]]
    for offset, step in enumerate(steps):
      batch = pending.pop(0).result()
      if offset + depth < len(steps):
        pending.append(pool.submit(make_batch, steps[offset + depth]))
      yield step, batch


def train(stage_name: str, stage_config, config, workdir: str, batches, initial_params: Callable[[], object]):
  """Runs (or resumes) a training stage; returns its final metrics."""
  stage_dir = os.path.join(workdir, stage_name)
  model = BiEncoder(config.model)
  optimizer = ts.create_optimizer(stage_config)
  learning_rate = ts.create_learning_rate_fn(stage_config)
  manager = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"), stage_config.keep_checkpoints)
  abstract_params = checkpoints.abstract_params(config.model)
  start = manager.latest_step()
  if start is not None:
    abstract_opt_state = checkpoints.abstract_tree(optimizer.init, abstract_params)
    params, opt_state, meta = checkpoints.restore(manager, start, abstract_params, abstract_opt_state)
    state = ts.TrainState(step=np.int32(meta["step"]), params=params, opt_state=opt_state,
                          skipped_steps=np.int32(meta["skipped_steps"]))
    logging.info("%s: resuming from step %d of %d", stage_name, start, stage_config.num_steps)
  else:
    start = 0
    state = ts.create_train_state(initial_params(), optimizer)
  # Committed and replicated from the start, so the first step's output matches its input and the
  # step compiles once.
  state = jax.device_put(state, checkpoints.replicated_sharding())
  num_devices = jax.local_device_count()
  p_train_step = ts.make_parallel_train_step(model, optimizer, stage_config.temperature)
  # One dropout stream per stage, folded with the step inside the step function.
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), sum(map(ord, stage_name)))
  writer = create_writer(config, stage_dir)
  if start == 0:
    writer.write_hparams({f"{stage_name}.{k}": v for k, v in stage_config.to_dict().items()})
  report = periodic_actions.ReportProgress(num_train_steps=stage_config.num_steps, writer=writer)
  metrics, last_skipped = {}, int(state.skipped_steps)
  with metric_writers.ensure_flushes(writer):
    steps = range(start, stage_config.num_steps)
    for step, batch in _prefetch(batches.batch, steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = p_train_step(state, ts.shard_batch(batch, num_devices), dropout_rng)
      done = step + 1
      report(done)
      if done % stage_config.log_every == 0 or done == stage_config.num_steps:
        scalars = {name: float(value) for name, value in metrics.items()}
        scalars["learning_rate"] = float(learning_rate(step))
        writer.write_scalars(done, scalars)
        skipped_now = int(scalars["skipped_steps"]) - last_skipped
        if skipped_now >= min(stage_config.log_every, done - start):
          raise FloatingPointError(f"{stage_name}: every step up to {done} had a non-finite loss or gradient")
        last_skipped = int(scalars["skipped_steps"])
      if done % stage_config.checkpoint_every == 0 or done == stage_config.num_steps:
        checkpoints.save(manager, done, state.params, state.opt_state,
                         {"step": done, "data_step": done, "skipped_steps": int(state.skipped_steps),
                          "seed": config.seed, "model": config.model.to_dict()})
  manager.wait_until_finished()
  final = {name: float(value) for name, value in metrics.items()}
  final["steps"] = stage_config.num_steps
  return final, manager.directory
