"""Starting a run that spans processes (hosts of a TPU pod slice, nodes of a GPU cluster, or several
processes on one machine) with ``jax.distributed``, and what the processes agree on outside the devices.

``initialize`` must run before anything touches a JAX backend. It starts the distributed runtime when the
launch says the run spans processes: explicit ``--coordinator_address/--num_processes/--process_id``
flags, or a cluster JAX detects by itself (a SLURM job of several tasks, a multi-host Cloud TPU slice).
A single-process run starts nothing. Collectives between CPU processes use gloo (the tests' multi-process
runs, and CPU-only clusters); GPUs and TPUs use their own.

Nothing here opens an accelerator: ``process_index``, ``barrier`` and ``global_max`` talk to the
coordination service, so the pipeline can synchronise hosts while a generator subprocess owns the devices.
"""
from __future__ import annotations

import itertools

from absl import logging

# Hosts wait at a barrier for the slowest one (a stage's last shard, a long search): hours, not seconds.
BARRIER_TIMEOUT_MS = 24 * 3600 * 1000
_barriers = itertools.count()


def _cluster_spans_processes() -> bool:
  """A cluster JAX's auto-detection handles (SLURM, Open MPI, Cloud TPU VMs through their metadata, GKE)
  running more than one process."""
  from jax._src import clusters  # JAX's own detection: what jax.distributed.initialize() would find
  for env in clusters.ClusterEnv._cluster_types:
    if not env.opt_in_only_method and env.is_env_present():
      try:
        return env.get_process_count() > 1
      except Exception:  # present but not answering: let jax.distributed.initialize() say why
        return True
  return False


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Starts ``jax.distributed`` when the run spans processes; returns whether it did."""
  import jax
  if not coordinator_address and not _cluster_spans_processes():
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < num_processes, "
                       f"got {num_processes} and {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()  # SLURM or Cloud TPU: JAX reads the cluster from the environment.
  logging.info("jax.distributed: process %d of %d", process_index(), process_count())
  return True


def _state():
  from jax._src import distributed  # the runtime jax.distributed.initialize started (no public accessor)
  return distributed.global_state


def process_index() -> int:
  """This process's index; unlike ``jax.process_index()`` it does not start a backend."""
  state = _state()
  return state.process_id if state.client is not None else 0


def backends_started() -> bool:
  """Whether this process has opened its JAX devices (after which a subprocess may not get them)."""
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def process_count() -> int:
  state = _state()
  return state.num_processes if state.client is not None else 1


def barrier(label: str) -> None:
  """Waits until every process of the run reaches ``label`` (nothing to wait for in a single process).

  Every process passes the same barriers in the same order, so a counter makes each id unique."""
  if process_count() > 1:
    _state().client.wait_at_barrier(f"axl/barrier/{next(_barriers)}/{label}", BARRIER_TIMEOUT_MS)


def run_on_process_zero(label: str, fn):
  """``fn()`` on process 0 (its result; None elsewhere) while the others wait; if it raises, every process
  raises, instead of the others waiting at a barrier for a process that has stopped."""
  if process_count() == 1:
    return fn()
  client, key = _state().client, f"axl/outcome/{next(_barriers)}/{label}"
  if process_index() == 0:
    try:
      result = fn()
    except BaseException as error:
      client.key_value_set(key, f"{type(error).__name__}: {error}")
      raise
    client.key_value_set(key, "")
    return result
  failure = client.blocking_key_value_get(key, BARRIER_TIMEOUT_MS)
  if failure:
    raise RuntimeError(f"process 0 failed at {label}: {failure}")
  return None


def check_devices() -> None:
  """After the devices are open: JAX's process count is the one the run started with. A slice whose hosts
  JAX connected by itself without ``jax.distributed`` would have every host believe it is process 0."""
  import jax
  if jax.process_count() != process_count():
    raise RuntimeError(f"JAX sees {jax.process_count()} processes but jax.distributed was started for "
                       f"{process_count()}: pass --coordinator_address, --num_processes and --process_id")


def global_max(key: str, values: list[int]) -> list[int]:
  """The element-wise largest of the ``values`` every process passes with ``key`` (a key is used once).

  Thread-safe and off the devices: data loaders call it from their threads (a batch's padded lengths)."""
  if process_count() == 1:
    return list(values)
  client = _state().client
  client.key_value_set(f"axl/max/{key}/{process_index()}", ",".join(str(int(v)) for v in values),
                       allow_overwrite=True)
  result = list(values)
  for process in range(process_count()):
    theirs = client.blocking_key_value_get(f"axl/max/{key}/{process}", BARRIER_TIMEOUT_MS)
    result = [max(a, int(b)) for a, b in zip(result, theirs.split(","))]
  return result


def forget(key: str) -> None:
  """Drops this process's value of ``key`` from the coordination service once every process has read it."""
  if process_count() > 1:
    _state().client.key_value_delete(f"axl/max/{key}/{process_index()}")


def block(count: int) -> slice:
  """This process's consecutive share of ``count`` items (shards to search, candidates to score)."""
  process, processes = process_index(), process_count()
  return slice(count * process // processes, count * (process + 1) // processes)
