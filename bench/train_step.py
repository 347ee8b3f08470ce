"""Throughput of the pmapped contrastive step and of passage encoding, on whatever devices JAX sees.

    python bench/train_step.py                      # a small shape that runs on a CPU in a minute
    python bench/train_step.py --shape=base --batch=64 --group=8 --passage_length=256   # XLM-R base

Prints one row per (dtype, attention implementation): steps/s, passages/s in training, passages/s
encoded. cuDNN attention is only tried on NVIDIA GPUs. A benchmark, never a test: it asserts nothing.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags

import configs.default
from axl_jax import encoder, train_step as ts

flags.DEFINE_enum("shape", "small", ["small", "base"], "small: the demo's model; base: XLM-R base.")
flags.DEFINE_integer("batch", 32, "Queries per step (global).")
flags.DEFINE_integer("group", 4, "Passages per query.")
flags.DEFINE_integer("query_length", 32, "Query tokens.")
flags.DEFINE_integer("passage_length", 96, "Passage tokens.")
flags.DEFINE_integer("steps", 10, "Timed steps after two warm-up steps.")
FLAGS = flags.FLAGS


def model_config(dtype, attention):
  config = configs.default.get_config().model
  if FLAGS.shape == "small":
    config.update(vocab_size=8000, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                  max_position_embeddings=512, position_offset=0)
  config.update(dtype=dtype, attention_impl=attention, hidden_dropout=0.1, attention_dropout=0.0)
  return config


def measure(dtype, attention):
  config = model_config(dtype, attention)
  stage = configs.default.train_stage(num_steps=1000, warmup_steps=10)
  optimizer = ts.create_optimizer(stage)
  state = ts.create_train_state(encoder.init_params(config, jax.random.key(0)), optimizer)
  step = ts.make_parallel_train_step(encoder.BiEncoder(config), optimizer, temperature=1.0)
  rng = np.random.default_rng(0)
  passages = FLAGS.batch * FLAGS.group
  batch = ts.shard_batch({
      "query_ids": rng.integers(5, 8000, (FLAGS.batch, FLAGS.query_length)).astype(np.int32),
      "query_lengths": rng.integers(FLAGS.query_length // 2, FLAGS.query_length + 1, FLAGS.batch).astype(np.int32),
      "passage_ids": rng.integers(5, 8000, (passages, FLAGS.passage_length)).astype(np.int32),
      "passage_lengths": rng.integers(FLAGS.passage_length // 2, FLAGS.passage_length + 1, passages).astype(np.int32),
  }, jax.local_device_count())
  key = jax.random.key(1)
  for _ in range(2):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  train_seconds = (time.perf_counter() - start) / FLAGS.steps

  model = encoder.BiEncoder(config)
  encode = jax.jit(lambda p, i, l: model.apply({"params": p}, i, l, method=encoder.BiEncoder.encode_passages))
  ids = batch["passage_ids"].reshape(passages, -1)
  lengths = batch["passage_lengths"].reshape(passages)
  jax.block_until_ready(encode(state.params, ids, lengths))
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    out = encode(state.params, ids, lengths)
  jax.block_until_ready(out)
  encode_seconds = (time.perf_counter() - start) / FLAGS.steps
  return 1 / train_seconds, passages / train_seconds, passages / encode_seconds


def main(_):
  devices = jax.devices()
  print(f"devices: {len(devices)} x {devices[0].device_kind}; shape={FLAGS.shape} batch={FLAGS.batch} "
        f"group={FLAGS.group} query_length={FLAGS.query_length} passage_length={FLAGS.passage_length}")
  on_gpu = devices[0].platform == "gpu"
  rows = [("float32", "xla")] + ([("bfloat16", "xla"), ("bfloat16", "cudnn")] if on_gpu else [("bfloat16", "xla")])
  print("| dtype | attention | train steps/s | train passages/s | encode passages/s |")
  print("|---|---|---|---|---|")
  for dtype, attention in rows:
    steps, train_passages, encode_passages = measure(dtype, attention)
    print(f"| {dtype} | {attention} | {steps:.2f} | {train_passages:.0f} | {encode_passages:.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
