"""Orbax checkpoints of a training stage, params-only restores, and atomic JSON files.

A stage checkpoint holds three items: ``params``, ``opt_state`` and ``meta`` (JSON: step, data
position, skipped steps, seed). Evaluation and export restore the ``params`` item alone, from a
stage's ``checkpoints`` directory (its latest step) or from one step directory.
"""
from __future__ import annotations

import functools
import json
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


def save(manager: ocp.CheckpointManager, step: int, params, opt_state, meta: dict):
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params_tree, abstract_opt_state):
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params_tree),
      opt_state=ocp.args.StandardRestore(abstract_opt_state), meta=ocp.args.JsonRestore()))
  return restored["params"], restored["opt_state"], restored["meta"]


def restore_params(path: str, model_config):
  """``(params, model_config)`` from a stage's ``checkpoints`` dir (latest step) or one step's dir.

  Checkpoints carry the model config they were trained with, so any checkpoint can be evaluated or
  exported without repeating its architecture on the command line; ``model_config`` is the fallback
  for checkpoints without one.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "params")) and os.path.basename(path).isdigit():
    directory, step = os.path.dirname(path), int(os.path.basename(path))
  elif os.path.isdir(path):
    directory, step = path, ocp.CheckpointManager(path).latest_step()
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {path!r} holds no finished checkpoint")
  else:
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  manager = ocp.CheckpointManager(directory)
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta.get("model"):
    model_config = ml_collections.ConfigDict(meta["model"])
  params = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params(model_config))))["params"]
  return params, model_config


def write_json_atomic(path: str, value) -> None:
  """Writes JSON to ``path`` through a temporary file and a rename: readers never see half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  partial = f"{path}.partial"
  with open(partial, "w", encoding="utf-8") as file:
    json.dump(value, file, indent=2, ensure_ascii=False, sort_keys=True)
    file.flush()
    os.fsync(file.fileno())
  os.replace(partial, path)
