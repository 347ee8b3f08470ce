"""New tokens per second of the JAX Qwen2 generator, beside ``transformers`` generate on the same shape.

    python bench/generate.py --shape=3b --batch=64 --prompt=256 --new=128   # the issue's shape (GPU)
    python bench/generate.py                                               # a small shape for a CPU

Random weights (no download), greedy decoding, no end token, so every row makes exactly ``--new``
tokens. ``transformers`` runs only where torch is installed (bf16 on a GPU, float32 on a CPU).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from axl_jax.negatives import decode, qwen2

flags.DEFINE_enum("shape", "small", ["small", "3b"], "small: a 4-layer toy; 3b: Qwen2.5-3B.")
flags.DEFINE_integer("batch", 8, "Prompts per batch.")
flags.DEFINE_integer("prompt", 64, "Prompt tokens.")
flags.DEFINE_integer("new", 32, "New tokens per prompt.")
flags.DEFINE_integer("repeats", 2, "Timed runs after one warm-up.")
flags.DEFINE_bool("transformers", True, "Also time transformers' generate when torch is installed.")
flags.DEFINE_float("finish", 0.0, "If > 0: this share of the rows ends after an eighth of --new tokens (their own "
                   "greedy token there is made an end id), and axl_jax runs with and without dropping them.")
FLAGS = flags.FLAGS

SHAPES = {
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                  num_kv_heads=2, tie_word_embeddings=True),
    "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
               num_kv_heads=2, tie_word_embeddings=True),
}


def init_params(config):
  model = qwen2.Qwen2(config)
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                        *qwen2.init_cache(config, 1, 1), 0, jnp.ones((1, 1), bool))["params"])(
                                            jax.random.key(0))


def best_seconds(run):
  run()
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def time_jax(config, params, prompts):
  run = lambda: decode.generate_ids(params, config, prompts, max_new_tokens=FLAGS.new, eos_ids=[-1], pad_id=0,
                                    prompt_bucket=FLAGS.prompt)
  assert all(len(row) == FLAGS.new for row in run())
  return FLAGS.batch * FLAGS.new / best_seconds(run)


def time_finishing(config, params, prompts):
  """New tokens/s when ``--finish`` of the rows end early: one decode call (finished rows ride along to the end)
  against segments of 32 steps with finished rows dropped between them."""
  free = decode.generate_ids(params, config, prompts, max_new_tokens=FLAGS.new, eos_ids=[-1], pad_id=0,
                             prompt_bucket=FLAGS.prompt)
  step, ending = FLAGS.new // 8, int(FLAGS.finish * len(prompts))
  ends = sorted({free[row][step] for row in range(ending)} - {t for row in free[ending:] for t in row})
  rates = {}
  for name, segment in (("one call", FLAGS.new), ("segments of 32, finished rows dropped", 32)):
    run = lambda: decode.generate_ids(params, config, prompts, max_new_tokens=FLAGS.new, eos_ids=ends, pad_id=0,
                                      prompt_bucket=FLAGS.prompt, segment=segment)
    made = sum(len(row) for row in run())
    rates[name] = made / best_seconds(run)
  return rates


def time_transformers(config, prompts):
  import torch
  import transformers
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if device == "cuda" else torch.float32
  hf_config = transformers.Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, tie_word_embeddings=config.tie_word_embeddings)
  model = transformers.Qwen2ForCausalLM(hf_config).to(device=device, dtype=dtype).eval()
  input_ids = torch.tensor(prompts, device=device)
  generate = lambda: model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=FLAGS.new, min_new_tokens=FLAGS.new, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
  with torch.no_grad():
    generate()
    times = []
    for _ in range(FLAGS.repeats):
      if device == "cuda":
        torch.cuda.synchronize()
      start = time.perf_counter()
      generate()
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - start)
  return FLAGS.batch * FLAGS.new / min(times), f"{device} {str(dtype).split('.')[-1]}"


def main(_):
  on_accelerator = jax.devices()[0].platform != "cpu"
  config = qwen2.Qwen2Config(**SHAPES[FLAGS.shape], dtype="bfloat16" if on_accelerator else "float32")
  prompts = np.random.default_rng(0).integers(1, config.vocab_size, (FLAGS.batch, FLAGS.prompt)).tolist()
  print(f"shape={FLAGS.shape} batch={FLAGS.batch} prompt={FLAGS.prompt} new={FLAGS.new} "
        f"device={jax.devices()[0].device_kind}")
  print("| implementation | dtype | new tokens/s |")
  print("|---|---|---|")
  params = init_params(config)
  print(f"| axl_jax (jit prefill + while_loop decode) | {config.dtype} | {time_jax(config, params, prompts):.0f} |",
        flush=True)
  if FLAGS.finish:
    for name, rate in time_finishing(config, params, prompts).items():
      print(f"| axl_jax, {FLAGS.finish:.0%} of rows end at token {FLAGS.new // 8}: {name} | {config.dtype} | "
            f"{rate:.0f} |", flush=True)
  if FLAGS.transformers:
    try:
      rate, where = time_transformers(config, prompts)
      print(f"| transformers generate (eager) | {where} | {rate:.0f} |")
    except ImportError:
      print("| transformers generate | - | torch not installed |")


if __name__ == "__main__":
  app.run(main)
