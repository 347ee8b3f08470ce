"""Train state, optimiser and the per-device contrastive step, pmapped over the local devices.

The step is written for one device with explicit collectives over ``AXIS``; ``jax.pmap`` maps it
(on JAX >= 0.8 that is jit + shard_map). The state goes in and out un-replicated (``in_axes=None``,
``out_axes=None``): gradients are ``pmean``-ed, so the updated state is identical on every device.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from axl_jax.encoder import BiEncoder
from axl_jax.loss import contrastive_loss

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped_steps: jax.Array       # steps whose loss or gradient was not finite (no update applied)


def create_learning_rate_fn(stage_config) -> optax.Schedule:
  """Linear warmup to the peak, then linear decay to zero at ``num_steps``."""
  warmup = max(1, min(stage_config.warmup_steps, stage_config.num_steps))
  decay = max(1, stage_config.num_steps - warmup)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, stage_config.learning_rate, warmup),
       optax.linear_schedule(stage_config.learning_rate, 0.0, decay)],
      boundaries=[warmup])


def _decay_mask(params):
  """Weight decay on matrices and embeddings; never on biases and LayerNorm scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def create_optimizer(stage_config) -> optax.GradientTransformation:
  parts = []
  if stage_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(stage_config.grad_clip_norm))
  optimizer = stage_config.get("optimizer", "adamw")
  if optimizer == "sgd":  # plain SGD: a gradient off by a factor shows in the parameters
    parts.append(optax.sgd(create_learning_rate_fn(stage_config)))
  elif optimizer == "adamw":
    parts.append(optax.adamw(create_learning_rate_fn(stage_config), weight_decay=stage_config.weight_decay,
                             mask=_decay_mask))
  else:
    raise ValueError(f"config: optimizer must be adamw or sgd, got {optimizer!r}")
  return optax.chain(*parts)


def schedule_count(opt_state) -> jax.Array:
  """The count of the learning-rate schedule inside an optimiser state (optax's ``scale_by_schedule``).

  A skipped (non-finite) step keeps the old optimiser state, so this count lags ``TrainState.step``
  by the steps skipped so far; the schedule at this count is the learning rate the next update uses.
  """
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  counts = [node.count for node in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule) if is_schedule(node)]
  if len(counts) != 1:
    raise ValueError(f"expected one learning-rate schedule in the optimiser state, found {len(counts)}")
  return counts[0]


def create_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    skipped_steps=jnp.zeros((), jnp.int32))


def _chunked(array, chunks: int):
  """``[N, ...]`` as ``[chunks, N / chunks, ...]``."""
  return array.reshape((chunks, array.shape[0] // chunks) + array.shape[1:])


def cached_loss_and_grads(params, batch, rng, *, model: BiEncoder, temperature: float, chunks: int):
  """GradCache (Gao et al., 2021; Tevatron's ``grad_cache``): the gradient of the contrastive loss over the
  whole batch with the activations of one sub-batch in memory at a time.

  1. embed every sub-batch of queries and of passages without keeping activations;
  2. the loss over all embeddings (all-gathered across devices, as in the plain step) and its gradient with
     respect to the embeddings (the cache);
  3. embed each sub-batch again, now differentiably, and pull its cached gradient back to the parameters.
  The parameter gradient equals the plain step's (dropout masks are drawn per sub-batch, the same in 1 and 3).
  """
  def encoder_of(method):
    return lambda p, ids, lengths, key: model.apply({"params": p}, ids, lengths, deterministic=False,
                                                    rngs={"dropout": key}, method=method)
  towers = [(encoder_of(BiEncoder.encode_queries), "query", jax.random.fold_in(rng, 0)),
            (encoder_of(BiEncoder.encode_passages), "passage", jax.random.fold_in(rng, 1))]
  inputs = [(_chunked(batch[f"{name}_ids"], chunks), _chunked(batch[f"{name}_lengths"], chunks),
             jax.random.split(key, chunks)) for _, name, key in towers]
  frozen = jax.lax.stop_gradient(params)
  embeddings = [jax.lax.map(lambda x, encode=encode: encode(frozen, *x), chunk_inputs).reshape(
      chunk_inputs[0].shape[0] * chunk_inputs[0].shape[1], -1) for (encode, _, _), chunk_inputs in zip(towers, inputs)]
  (loss, accuracy), cached = jax.value_and_grad(
      lambda q, p: contrastive_loss(q, p, temperature, AXIS), argnums=(0, 1), has_aux=True)(*embeddings)
  grads = jax.tree.map(jnp.zeros_like, params)
  for (encode, _, _), chunk_inputs, cache in zip(towers, inputs, cached):
    def accumulate(total, x, encode=encode):
      ids, lengths, key, cotangent = x
      _, pull_back = jax.vjp(lambda p: encode(p, ids, lengths, key), params)
      return jax.tree.map(jnp.add, total, pull_back(cotangent)[0]), None
    grads, _ = jax.lax.scan(accumulate, grads, (*chunk_inputs, _chunked(cache, chunks)))
  return (loss, accuracy), grads


def train_step(state: TrainState, batch, dropout_rng, *, model: BiEncoder, optimizer, temperature: float,
               learning_rate_fn: optax.Schedule | None = None, grad_cache_chunks: int = 1):
  """One optimiser step on this device's share of the global batch (call under ``pmap``).

  With ``learning_rate_fn`` (the schedule inside ``optimizer``), the metrics carry the learning rate
  this step's update used, read at the optimiser's own count rather than at ``state.step``. With
  ``grad_cache_chunks`` > 1 the gradient is computed by GradCache over that many sub-batches per device
  (``cached_loss_and_grads``): the same gradient, the activations of one sub-batch in memory.
  """
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), jax.lax.axis_index(AXIS))

  def loss_fn(params):
    query_embeddings, passage_embeddings = model.apply(
        {"params": params}, batch["query_ids"], batch["query_lengths"], batch["passage_ids"],
        batch["passage_lengths"], deterministic=False, rngs={"dropout": rng})
    return contrastive_loss(query_embeddings, passage_embeddings, temperature, AXIS)

  if grad_cache_chunks > 1:
    (loss, accuracy), grads = cached_loss_and_grads(state.params, batch, rng, model=model, temperature=temperature,
                                                    chunks=grad_cache_chunks)
  else:
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # The all_gather's transpose already routed every device's loss to every passage, so the mean of
  # the per-device gradients is the gradient of the global mean loss.
  grads = jax.lax.pmean(grads, AXIS)
  loss = jax.lax.pmean(loss, AXIS)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  metrics = {"loss": loss, "accuracy": jax.lax.pmean(accuracy, AXIS), "grad_norm": grad_norm,
             "param_norm": optax.global_norm(new_state.params), "skipped_steps": new_state.skipped_steps}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(schedule_count(state.opt_state))
  return new_state, metrics


def make_parallel_train_step(model: BiEncoder, optimizer, temperature: float,
                             learning_rate_fn: optax.Schedule | None = None, grad_cache_chunks: int = 1):
  """``train_step`` pmapped over the local devices, state un-replicated and donated.

  Arguments: the state, a batch whose arrays lead with the local device count, a dropout key.
  """
  step = functools.partial(train_step, model=model, optimizer=optimizer, temperature=temperature,
                           learning_rate_fn=learning_rate_fn, grad_cache_chunks=grad_cache_chunks)
  return jax.pmap(step, axis_name=AXIS, in_axes=(None, 0, None), out_axes=(None, None), donate_argnums=(0,))


def shard_batch(batch: dict, num_devices: int) -> dict:
  """Reshapes host-local ``[N, ...]`` arrays to ``[num_devices, N / num_devices, ...]``."""
  def reshape(array):
    if array.shape[0] % num_devices:
      raise ValueError(f"batch of {array.shape[0]} rows does not divide over {num_devices} devices")
    return array.reshape((num_devices, array.shape[0] // num_devices) + array.shape[1:])
  return {name: reshape(array) for name, array in batch.items()}


def put_on_devices(batch: dict) -> dict:
  """Copies a ``shard_batch`` batch to the local devices, slice ``i`` to device ``i``: the arrays the
  pmapped step takes without a transfer of its own. Called from the loader threads, so the copy of
  batch ``n + 1`` overlaps step ``n``."""
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("devices",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
  return {name: jax.device_put(array, sharding) for name, array in batch.items()}
