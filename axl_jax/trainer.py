"""The training loop of one contrastive stage: resume, step, log, checkpoint.

The stage resumes from its latest finished checkpoint; because batches are a pure function of
``(seed, step)`` and the dropout key is folded with the step, a resumed run computes exactly what an
uninterrupted one would. Non-finite steps are skipped by the step itself; a whole logging interval of
them stops the run loudly. Every checkpoint records the configuration fingerprint and schedule
length it was made with; a resume under another one raises instead of continuing.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions

from axl_jax import batching, checkpoints
from axl_jax import train_step as ts
from axl_jax.encoder import BiEncoder


class ScalarWriter(metric_writers.MetricWriter):
  """A clu writer for scalars only: subclasses define ``write_scalars``; the other kinds are ignored."""
  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


def create_writer(config, logdir: str):
  writer = metric_writers.create_default_writer(logdir, just_logging=jax.process_index() > 0)
  if config.logging.wandb and jax.process_index() == 0:
    import wandb  # Optional dependency, only when asked for.
    run = wandb.init(project=config.logging.wandb_project, dir=logdir, config=config.to_dict(), resume="allow")

    class _Wandb(ScalarWriter):
      def write_scalars(self, step, scalars):
        run.log(dict(scalars), step=step)
      def write_hparams(self, hparams): run.config.update(hparams, allow_val_change=True)
      def close(self): run.finish()
    writer = metric_writers.MultiWriter([writer, _Wandb()])
  return writer


def _prefetch(make_batch: Callable[[int], dict], steps: range, workers: int = 2):
  """Builds the next batches (reading and tokenizing) on ``workers`` host threads while the devices run
  the current step; batches come out in step order."""
  workers = max(1, workers)
  depth = workers + 1
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    pending = [pool.submit(make_batch, step) for step in steps[:depth]]
    for offset, step in enumerate(steps):
      batch = pending.pop(0).result()
      if offset + depth < len(steps):
        pending.append(pool.submit(make_batch, steps[offset + depth]))
      yield step, batch


def _read_meta(manager, step: int) -> dict:
  # The JSON item alone: checkpoints from another configuration may not even fit this model's
  # parameter shapes, and that should be reported as a configuration mismatch, not a shape error.
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _check_resumable(stage_dir: str, step: int, meta: dict, stage_config, fingerprint: str) -> None:
  """Refuses to continue a stage whose checkpoints another configuration or schedule made."""
  remedy = "use a new workdir, or the pipeline's recompute option to retrain this stage"
  saved = meta.get("fingerprint")
  if saved is None:
    # Checkpoints from before fingerprints were stored: nothing to compare, so say so.
    logging.warning("%s: checkpoint %d carries no configuration fingerprint; resuming unchecked", stage_dir, step)
  elif saved != fingerprint:
    raise ValueError(f"{stage_dir}: the stage's checkpoints were made with another configuration "
                     f"(fingerprint {saved!r}; this run's is {fingerprint!r}); resuming would mix the two: "
                     f"{remedy}")
  # Checkpoints without the field predate the per-index permutation (numpy permutations of whole epochs).
  if meta.get("batch_order", 1) != batching.BATCH_ORDER:
    raise ValueError(f"{stage_dir}: the stage's checkpoints were made by a version of axl-jax that ordered the "
                     f"batches differently (batch order {meta.get('batch_order', 1)}, now {batching.BATCH_ORDER}); "
                     f"resuming would not see the batches an uninterrupted run sees: {remedy}")
  saved_steps = meta.get("num_steps")
  if saved_steps is not None and saved_steps != stage_config.num_steps:
    raise ValueError(f"{stage_dir}: the stage's checkpoints were made for num_steps={saved_steps}, this run "
                     f"asks for {stage_config.num_steps}; the learning-rate schedule (warm-up, then decay to "
                     f"zero at num_steps) would differ from the one the saved optimiser followed: {remedy}")
  if step > stage_config.num_steps:
    raise ValueError(f"{stage_dir}: the latest checkpoint is at step {step}, past this run's "
                     f"num_steps={stage_config.num_steps}: {remedy}")


def train(stage_name: str, stage_config, config, workdir: str, batches, initial_params: Callable[[], object],
          fingerprint: str = ""):
  """Runs (or resumes) a training stage; returns ``(final metrics, checkpoint directory)``.

  ``fingerprint`` identifies the configuration the stage is computed from; it is stored in every
  checkpoint, and a resume from checkpoints with another fingerprint (or another ``num_steps``)
  raises ``ValueError`` instead of continuing someone else's run.
  """
  stage_dir = os.path.join(workdir, stage_name)
  model = BiEncoder(config.model)
  optimizer = ts.create_optimizer(stage_config)
  learning_rate = ts.create_learning_rate_fn(stage_config)
  manager = checkpoints.checkpoint_manager(os.path.join(stage_dir, "checkpoints"), stage_config.keep_checkpoints)
  abstract_params = checkpoints.abstract_params(config.model)
  start = manager.latest_step()
  if start is not None:
    _check_resumable(stage_dir, start, _read_meta(manager, start), stage_config, fingerprint)
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
  # The step reports the learning rate at the optimiser's own count: skipped steps keep the old
  # optimiser state, so the schedule falls behind ``state.step`` and ``learning_rate(step)`` would drift.
  p_train_step = ts.make_parallel_train_step(model, optimizer, stage_config.temperature,
                                             learning_rate_fn=learning_rate,
                                             grad_cache_chunks=stage_config.get("grad_cache_chunks", 1))
  # One dropout stream per stage, folded with the step inside the step function.
  dropout_rng = jax.random.fold_in(jax.random.key(config.seed), sum(map(ord, stage_name)))
  writer = create_writer(config, stage_dir)
  if start == 0:
    writer.write_hparams({f"{stage_name}.{k}": v for k, v in stage_config.to_dict().items()})
  report = periodic_actions.ReportProgress(num_train_steps=stage_config.num_steps, writer=writer)
  # The current logging interval: the steps after ``interval_start`` (the start, the resume point or
  # the previous metric write), and the skipped-step count when it began.
  metrics, interval_start, interval_skipped = {}, start, int(state.skipped_steps)
  try:
    with metric_writers.ensure_flushes(writer):
      steps = range(start, stage_config.num_steps)
      # Read, tokenize, split over the devices and copy there, all on the loader threads.
      def device_batch(step):
        return ts.put_on_devices(ts.shard_batch(batches.batch(step), num_devices))
      for step, batch in _prefetch(device_batch, steps, config.data.loader_threads):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          state, metrics = p_train_step(state, batch, dropout_rng)
        done = step + 1
        report(done)
        if done % stage_config.log_every == 0 or done == stage_config.num_steps:
          scalars = {name: float(value) for name, value in metrics.items()}
          writer.write_scalars(done, scalars)
          skipped = int(scalars["skipped_steps"])
          # However short the interval (the last one, the first after a resume), a run that applied
          # no update in it is not training: stop rather than checkpoint unchanged parameters.
          if skipped - interval_skipped == done - interval_start:
            raise FloatingPointError(
                f"{stage_name}: steps {interval_start + 1} to {done} (of {stage_config.num_steps}) all had a "
                f"non-finite loss or gradient; none of them updated the parameters")
          interval_start, interval_skipped = done, skipped
        if done % stage_config.checkpoint_every == 0 or done == stage_config.num_steps:
          checkpoints.save(manager, done, state.params, state.opt_state,
                           {"step": done, "data_step": done, "skipped_steps": int(state.skipped_steps),
                            "seed": config.seed, "model": config.model.to_dict(),
                            "fingerprint": fingerprint, "num_steps": stage_config.num_steps,
                            "batch_order": batching.BATCH_ORDER})
  finally:
    # Saves are asynchronous: finish the one in flight even when the loop raises, so a rerun
    # resumes from it rather than from the one before.
    manager.wait_until_finished()
  final = {name: float(value) for name, value in metrics.items()}
  final["steps"] = stage_config.num_steps
  return final, manager.directory
