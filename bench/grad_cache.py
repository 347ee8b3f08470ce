"""Device memory of one contrastive train step, plain against GradCache, from XLA's compiled memory analysis
(compiles, never runs the step: the number holds for the device the step is compiled for).

    python bench/grad_cache.py                                   # XLM-R base, 512 x 8 passages of 256 tokens
    python bench/grad_cache.py --batch=64 --chunks=1,4,16        # other shapes

Prints, per sub-batch count, the temporary buffers XLA plans for the step (activations kept for the
backward pass, the gradients) besides the arguments (parameters, optimiser state, batch).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import configs.default
import configs.demo
from axl_jax import encoder, train_step as ts

flags.DEFINE_integer("batch", 512, "Queries per step on the device.")
flags.DEFINE_integer("group", 8, "Passages per query.")
flags.DEFINE_integer("query_length", 32, "Query tokens.")
flags.DEFINE_integer("passage_length", 256, "Passage tokens.")
flags.DEFINE_string("chunks", "1,16,64", "GradCache sub-batch counts to compile (1 = the plain step).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_enum("shape", "base", ["base", "small"], "base: XLM-R base; small: the demo's model.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # The default model is XLM-R base's shape (250K vocabulary, 12 x 768); the demo's is 2 x 128.
  model_config = (configs.default if FLAGS.shape == "base" else configs.demo).get_config().model
  if FLAGS.shape == "small":
    model_config.vocab_size = 8000
  model_config.dtype = FLAGS.dtype
  stage = configs.default.train_stage()
  optimizer = ts.create_optimizer(stage)
  model = encoder.BiEncoder(model_config)
  state = jax.eval_shape(lambda: ts.create_train_state(encoder.init_params(model_config, jax.random.key(0)),
                                                       optimizer))
  queries, passages = FLAGS.batch, FLAGS.batch * FLAGS.group
  batch = {"query_ids": jax.ShapeDtypeStruct((1, queries, FLAGS.query_length), jnp.int32),
           "query_lengths": jax.ShapeDtypeStruct((1, queries), jnp.int32),
           "passage_ids": jax.ShapeDtypeStruct((1, passages, FLAGS.passage_length), jnp.int32),
           "passage_lengths": jax.ShapeDtypeStruct((1, passages), jnp.int32)}
  params_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  print(f"{jax.devices()[0].platform}: {FLAGS.shape} ({params_bytes / 2**20:,.0f} MiB of float32 parameters), "
        f"{queries} queries x {FLAGS.group} passages, {FLAGS.query_length}/{FLAGS.passage_length} tokens, {FLAGS.dtype}")
  print("| sub-batches | queries per sub-batch | temporary GiB | arguments GiB | compile s |")
  print("|---|---|---|---|---|")
  for chunks in [int(c) for c in FLAGS.chunks.split(",")]:
    step = ts.make_parallel_train_step(model, optimizer, stage.temperature, grad_cache_chunks=chunks)
    started = time.time()
    compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype)).compile()
    analysis = compiled.memory_analysis()
    print(f"| {chunks} | {queries // chunks} | {analysis.temp_size_in_bytes / 2**30:,.2f} | "
          f"{analysis.argument_size_in_bytes / 2**30:,.2f} | {time.time() - started:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
