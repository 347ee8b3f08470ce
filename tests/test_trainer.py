"""The training loop through ``trainer.train``: non-finite intervals, the logged learning rate, resume checks.

A tiny model on one CPU device. Non-finite steps are real ones: a token id outside the vocabulary
embeds as NaN (``jnp.take`` fills out-of-bounds rows with NaN), so the loss and gradient of that step
are NaN and the step skips its update.
"""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs.default
from axl_jax import batching, checkpoints, encoder, trainer
from axl_jax import train_step as ts
from tests.helpers import tiny_model_config

QUERIES, GROUP, QUERY_LENGTH, PASSAGE_LENGTH = 4, 2, 6, 8


class Batches:
  """A pure function of the step; ``bad`` steps carry an out-of-vocabulary token, ``crash_at`` raises."""

  def __init__(self, vocab_size: int, bad=(), crash_at=None):
    self.vocab_size, self.bad, self.crash_at = vocab_size, set(bad), crash_at

  def batch(self, step: int) -> dict:
    if step == self.crash_at:
      raise RuntimeError(f"simulated preemption at step {step}")
    rng = np.random.default_rng(step)
    batch = {
        "query_ids": rng.integers(1, self.vocab_size, (QUERIES, QUERY_LENGTH)).astype(np.int32),
        "query_lengths": rng.integers(2, QUERY_LENGTH + 1, QUERIES).astype(np.int32),
        "passage_ids": rng.integers(1, self.vocab_size, (QUERIES * GROUP, PASSAGE_LENGTH)).astype(np.int32),
        "passage_lengths": rng.integers(2, PASSAGE_LENGTH + 1, QUERIES * GROUP).astype(np.int32)}
    if step in self.bad:
      batch["query_ids"][0, 0] = self.vocab_size + 3
    return batch


class Recorder(trainer.ScalarWriter):
  """Keeps every scalar the trainer writes, by step."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})


@pytest.fixture
def recorder(monkeypatch):
  recorder = Recorder()
  monkeypatch.setattr(trainer, "create_writer", lambda config, logdir: recorder)
  return recorder


def _config(**model_overrides):
  config = configs.default.get_config()
  config.model = tiny_model_config(**model_overrides)
  return config


def _stage(**overrides):
  fields = dict(num_steps=4, learning_rate=1e-2, warmup_steps=2, temperature=0.5, log_every=2,
                checkpoint_every=500, batch_size=QUERIES, group_size=GROUP)
  fields.update(overrides)
  return configs.default.train_stage(**fields)


def _initial(config):
  return lambda: encoder.init_params(config.model, jax.random.key(0))


def _train(name, stage, config, workdir, batches, fingerprint=""):
  return trainer.train(name, stage, config, str(workdir), batches, _initial(config), fingerprint=fingerprint)


def _meta(stage_dir, step):
  manager = ocp.CheckpointManager(os.path.join(stage_dir, "checkpoints"))
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def test_short_final_interval_of_skipped_steps_raises(tmp_path, recorder):
  # 5 steps logged every 2: the intervals are 1-2, 3-4 and the single step 5, which is non-finite.
  config = _config()
  batches = Batches(config.model.vocab_size, bad={4})
  with pytest.raises(FloatingPointError, match=r"short_tail: steps 5 to 5 .*non-finite"):
    _train("short_tail", _stage(num_steps=5), config, tmp_path, batches)
  assert recorder.scalars[4]["skipped_steps"] == 0
  assert recorder.scalars[5]["skipped_steps"] == 1  # the metrics were still written before raising


def test_skipped_interval_after_resume_raises(tmp_path, recorder):
  # Preempted after step 3 of 6 (logged every 4); the resumed run's intervals are 4 (to the next
  # multiple of 4) and 5-6, and both steps of the last one are non-finite.
  config = _config()
  stage = _stage(num_steps=6, log_every=4, checkpoint_every=1)
  with pytest.raises(RuntimeError, match="simulated preemption"):
    _train("resumed", stage, config, tmp_path, Batches(config.model.vocab_size, crash_at=3))
  batches = Batches(config.model.vocab_size, bad={4, 5})
  with pytest.raises(FloatingPointError, match=r"resumed: steps 5 to 6 .*non-finite"):
    _train("resumed", stage, config, tmp_path, batches)
  assert recorder.scalars[4]["skipped_steps"] == 0 and recorder.scalars[6]["skipped_steps"] == 2


def test_partly_skipped_intervals_continue_and_log_the_optimiser_learning_rate(tmp_path, recorder):
  config = _config()
  stage = _stage(num_steps=6, log_every=3, warmup_steps=2)
  schedule = ts.create_learning_rate_fn(stage)
  final, directory = _train("lr", stage, config, tmp_path, Batches(config.model.vocab_size, bad={1}))
  assert recorder.scalars[3]["skipped_steps"] == recorder.scalars[6]["skipped_steps"] == 1
  # Step index 1 kept the old optimiser state, so its schedule count lags the step by one from then
  # on: the last step of each interval (indices 2 and 5) ran at counts 1 and 4, not 2 and 5.
  np.testing.assert_allclose(recorder.scalars[3]["learning_rate"], float(schedule(1)), rtol=1e-6)
  np.testing.assert_allclose(recorder.scalars[6]["learning_rate"], float(schedule(4)), rtol=1e-6)
  assert float(schedule(1)) != pytest.approx(float(schedule(2)))
  assert float(schedule(4)) != pytest.approx(float(schedule(5)))
  # The optimiser's own count in the final checkpoint: 6 steps, one of them skipped.
  manager = checkpoints.checkpoint_manager(directory, 2)
  optimizer = ts.create_optimizer(stage)
  abstract_params = checkpoints.abstract_params(config.model)
  _, opt_state, meta = checkpoints.restore(manager, 6, abstract_params,
                                           checkpoints.abstract_tree(optimizer.init, abstract_params))
  assert int(ts.schedule_count(opt_state)) == 6 - 1 and meta["skipped_steps"] == 1
  assert final["learning_rate"] == pytest.approx(float(schedule(4)))


def test_resume_refuses_another_fingerprint_or_schedule_length(tmp_path, recorder, caplog):
  config = _config()
  stage = _stage(num_steps=4, checkpoint_every=1)
  stage_dir = os.path.join(tmp_path, "fp")
  with pytest.raises(RuntimeError, match="simulated preemption"):
    _train("fp", stage, config, tmp_path, Batches(config.model.vocab_size, crash_at=2), fingerprint="aaa")
  meta = _meta(stage_dir, 2)
  assert meta["fingerprint"] == "aaa" and meta["num_steps"] == 4 and meta["step"] == 2

  batches = Batches(config.model.vocab_size)
  with pytest.raises(ValueError) as error:
    _train("fp", stage, config, tmp_path, batches, fingerprint="bbb")
  message = str(error.value)
  assert stage_dir in message and "'aaa'" in message and "'bbb'" in message
  assert "another configuration" in message and "new workdir" in message and "recompute" in message
  # Another model too: the fingerprint is reported, not a shape mismatch from restoring the params.
  with pytest.raises(ValueError, match="another configuration"):
    _train("fp", stage, _config(hidden_size=8), tmp_path, batches, fingerprint="ccc")
  # The same fingerprint but a longer schedule: warm-up and decay would no longer match the saved state.
  with pytest.raises(ValueError, match=r"num_steps=4.*asks for 6"):
    _train("fp", _stage(num_steps=6, checkpoint_every=1), config, tmp_path, batches, fingerprint="aaa")
  assert ocp.CheckpointManager(os.path.join(stage_dir, "checkpoints")).latest_step() == 2  # untouched

  caplog.set_level("INFO")
  final, _ = _train("fp", stage, config, tmp_path, batches, fingerprint="aaa")
  assert "fp: resuming from step 2 of 4" in caplog.text
  assert final["steps"] == 4 and final["skipped_steps"] == 0
  assert _meta(stage_dir, 4)["fingerprint"] == "aaa" and _meta(stage_dir, 4)["num_steps"] == 4
  # A finished stage is checked as well: a caller with another configuration does not get its result.
  with pytest.raises(ValueError, match="another configuration"):
    _train("fp", stage, config, tmp_path, batches, fingerprint="bbb")


def test_wandb_writer_can_be_created(tmp_path, monkeypatch):
  # A stand-in for the optional wandb package: the writer class must implement every abstract method
  # of clu's MetricWriter, or asking for wandb fails before the first step.
  import sys
  import types
  logged = []
  run = types.SimpleNamespace(log=lambda scalars, step: logged.append((step, scalars)), finish=lambda: None,
                              config=types.SimpleNamespace(update=lambda *args, **kwargs: None))
  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
  config = _config()
  config.logging.wandb = True
  writer = trainer.create_writer(config, str(tmp_path))
  writer.write_scalars(3, {"loss": 1.5})
  writer.close()
  assert logged == [(3, {"loss": 1.5})]


def test_resume_refuses_checkpoints_of_another_batch_order(tmp_path):
  stage = _stage(num_steps=4)
  old = {"fingerprint": "a", "num_steps": 4}  # written before checkpoints recorded their batch order
  with pytest.raises(ValueError, match="ordered the batches differently"):
    trainer._check_resumable(str(tmp_path), 2, old, stage, "a")
  trainer._check_resumable(str(tmp_path), 2, dict(old, batch_order=batching.BATCH_ORDER), stage, "a")


def test_a_stage_with_grad_cache_trains_like_the_plain_stage(tmp_path, recorder):
  # The config field reaches the step: 2 sub-batches per device, the same losses and parameters.
  config = _config()
  plain, _ = _train("plain", _stage(optimizer="sgd", grad_clip_norm=0.0), config, tmp_path, Batches(config.model.vocab_size))
  cached, directory = _train("cached", _stage(optimizer="sgd", grad_clip_norm=0.0, grad_cache_chunks=2), config,
                             tmp_path, Batches(config.model.vocab_size))
  assert cached["loss"] == pytest.approx(plain["loss"], rel=1e-5)
  from axl_jax import checkpoints
  a, _ = checkpoints.restore_params(str(tmp_path / "plain" / "checkpoints"), config.model)
  b, _ = checkpoints.restore_params(str(directory), config.model)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
