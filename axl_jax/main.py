"""Entry point: ``python -m axl_jax.main --config=configs/demo.py --workdir=runs/demo``.

Any config field can be overridden on the command line (``--config.finetune.learning_rate=3e-5``,
``--config.stages=evaluate``); a misspelt field fails at once because the config is locked.
"""
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, embeddings and results.")
config_flags.DEFINE_config_file("config", None, "Launch config (a Python file with get_config()).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])
# A run over several processes (hosts): the same command on every one of them. Cloud TPU slices and SLURM
# jobs of several tasks are detected without these.
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # JAX preallocates this share of each GPU when its backend starts (first use, below); FAISS searches in
  # the rest (search.py: float16 shards and temporary memory). A value set in the environment wins.
  import os
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(FLAGS.config.jax_memory_fraction))
  # clu's writers import TensorFlow; keep it off the accelerators JAX uses (as the Flax examples do).
  import tensorflow as tf
  tf.config.experimental.set_visible_devices([], "GPU")
  # Orbax logs every save and restore, TFDS every dataset it opens, at INFO; keep their warnings only.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_WARNING
      or not any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/")))
  import sys
  from axl_jax import data, distributed, pipeline
  # Starts no backend: the rounds' generators own the accelerators before this process opens them.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from axl_jax.stages import evaluate
  try:
    pipeline.run(FLAGS.config, FLAGS.workdir)
  except (*pipeline.STALE_ERRORS, data.DataError) as error:  # The user's to act on: no traceback.
    sys.stderr.write(f"\nerror: {error}\n")
    sys.exit(2)
  # The tables once more at the very end, where they are not buried under the stages' logs.
  workdir = pipeline.Workdir(FLAGS.workdir)
  tables = evaluate.read_tables(workdir)
  if tables and distributed.process_index() == 0:
    print(f"\nResults ({evaluate.results_path(workdir)}):\n\n{tables}", flush=True)


if __name__ == "__main__":
  app.run(main)
