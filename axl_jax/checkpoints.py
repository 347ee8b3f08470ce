"""Orbax checkpoints of a training stage, params-only restores, and content digests of checkpoints.

A stage checkpoint holds three items: ``params``, ``opt_state`` and ``meta`` (JSON: step, data
position, skipped steps, seed). Evaluation and export restore the ``params`` item alone, from a
stage's ``checkpoints`` directory (its latest step) or from one step directory; ``digest`` names a
checkpoint by its content.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from axl_jax import encoder


def replicated_sharding() -> jax.sharding.NamedSharding:
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_tree(tree_fn, *args) -> Any:
  """Shapes and dtypes of ``tree_fn(*args)`` with the replicated sharding orbax restores into."""
  sharding = replicated_sharding()
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      jax.eval_shape(tree_fn, *args))


def abstract_params(model_config) -> Any:
  # The config is closed over: ConfigDicts are pytrees and would otherwise be traced.
  return abstract_tree(functools.partial(encoder.init_params, model_config), jax.random.key(0))


def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _global(tree):
  """The pmapped step's outputs are replicated over this process's devices only; orbax saves arrays of
  the global mesh, so in a multi-process run each leaf is placed on it (every process holds the same values)."""
  if jax.process_count() == 1:
    return tree
  sharding = replicated_sharding()
  return jax.tree.map(lambda leaf: jax.device_put(np.asarray(leaf), sharding) if isinstance(leaf, jax.Array)
                      else leaf, tree)


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict):
  params, opt_state = _global(params), _global(opt_state)
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params_tree, abstract_opt_state):
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params_tree),
      opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore()))
  return restored["params"], restored["opt_state"], restored["meta"]


def resolve(path: str) -> tuple[str, int]:
  """``(manager_directory, step)`` of a stage's ``checkpoints`` dir (its latest step) or of one step's dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  if os.path.isdir(path):
    step = ocp.CheckpointManager(path).latest_step()
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {path!r} holds no finished checkpoint")
    return path, step
  raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def digest(path: str) -> str:
  """A hash of the parameters' bytes on disk (the ``params`` item of the resolved step).

  Work derived from a checkpoint (embeddings, scores) is keyed by this, not by the path: a stage
  retrained in place has the same path and other parameters.
  """
  directory, step = resolve(path)
  params_dir = os.path.join(directory, str(step), "params")
  sha = hashlib.sha256()
  for root, dirs, files in os.walk(params_dir):
    dirs.sort()
    for name in sorted(files):
      file_path = os.path.join(root, name)
      sha.update(os.path.relpath(file_path, params_dir).encode() + b"\0")
      with open(file_path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
          sha.update(block)
  return sha.hexdigest()[:24]


def restore_params(path: str, model_config):
  """``(params, model_config)`` from a stage's ``checkpoints`` dir (latest step) or one step's dir.

  Checkpoints carry the model config they were trained with, so any checkpoint can be evaluated or
  exported without repeating its architecture on the command line; ``model_config`` is the fallback
  for checkpoints without one.
  """
  directory, step = resolve(path)
  manager = ocp.CheckpointManager(directory)
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("model"):
    model_config = ml_collections.ConfigDict(meta["model"])
  params = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params(model_config))))["params"]
  return params, model_config
