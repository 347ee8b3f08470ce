"""Starting a run that spans processes (hosts of a TPU pod slice, nodes of a GPU cluster, or several
processes on one machine) with ``jax.distributed``.

``initialize`` must run before anything touches a JAX backend. It starts the distributed runtime when the
launch says the run spans processes: explicit ``--coordinator_address/--num_processes/--process_id``
flags, or a cluster JAX detects by itself (a SLURM job of several tasks, a multi-host Cloud TPU slice).
A single-process run starts nothing. Collectives between CPU processes use gloo (the tests' multi-process
runs, and CPU-only clusters); GPUs and TPUs use their own.
"""
from __future__ import annotations

import os

from absl import logging


def _cluster_spans_processes() -> bool:
  """A cluster environment JAX's auto-detection handles, running more than one process."""
  if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in workers


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
  logging.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def barrier(label: str) -> None:
  """Waits until every process of the run reaches ``label`` (nothing to wait for in a single process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(label)


def block(count: int) -> slice:
  """This process's consecutive share of ``count`` items (shards to search), in process order."""
  import jax
  process, processes = jax.process_index(), jax.process_count()
  return slice(count * process // processes, count * (process + 1) // processes)
