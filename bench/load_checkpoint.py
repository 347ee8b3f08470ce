"""Time to load a Hugging Face encoder checkpoint into the Flax encoder (PyTorch-free path).

    python bench/load_checkpoint.py                 # xlm-roberta-base shape (~278M parameters), random weights
    python bench/load_checkpoint.py --shape=large   # xlm-roberta-large shape (~560M)

Writes a random checkpoint of that shape with numpy + safetensors into a temporary directory (so no
download is needed), then times ``hf_checkpoint.load_encoder`` and the transfer to the default device.
"""
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

import configs.default
from axl_jax import encoder, hf_checkpoint

flags.DEFINE_enum("shape", "base", ["base", "large"], "xlm-roberta-base or -large shapes.")
flags.DEFINE_integer("repeats", 3, "Timed loads (the best and the mean are printed).")
FLAGS = flags.FLAGS

SHAPES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
          "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


def write_random_checkpoint(directory):
  hf_config = dict(model_type="xlm-roberta", architectures=["XLMRobertaModel"], vocab_size=250002,
                   max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                   hidden_act="gelu", **SHAPES[FLAGS.shape])
  with open(os.path.join(directory, "config.json"), "w") as file:
    json.dump(hf_config, file)
  model_config = hf_checkpoint.model_config_from_hf(hf_config, configs.default.get_config().model)
  abstract = jax.eval_shape(functools.partial(encoder.init_params, model_config), jax.random.key(0))
  rng = np.random.default_rng(0)
  tensors = {}
  for hf_name, path, transposed in hf_checkpoint.name_table(model_config.num_layers, model_config.type_vocab_size):
    leaf = abstract["query_encoder"]["transformer"]
    for key in path:
      leaf = leaf[key]
    shape = tuple(reversed(leaf.shape)) if transposed else leaf.shape
    tensors["roberta." + hf_name] = rng.standard_normal(shape, dtype=np.float32) * 0.02
  # Split into two shards like large hub checkpoints.
  names = sorted(tensors)
  halves = [names[:len(names) // 2], names[len(names) // 2:]]
  index = {"metadata": {}, "weight_map": {}}
  for number, shard in enumerate(halves, start=1):
    filename = f"model-0000{number}-of-00002.safetensors"
    save_file({name: tensors[name] for name in shard}, os.path.join(directory, filename))
    index["weight_map"].update({name: filename for name in shard})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as file:
    json.dump(index, file)
  return sum(t.size for t in tensors.values())


def main(_):
  with tempfile.TemporaryDirectory() as directory:
    parameters = write_random_checkpoint(directory)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      _, params = hf_checkpoint.load_encoder(directory, configs.default.get_config().model)
      jax.block_until_ready(jax.device_put(params))
      times.append(time.perf_counter() - start)
      del params
  print("| shape | parameters | checkpoint MB | device | best s | mean s |")
  print("|---|---|---|---|---|---|")
  print(f"| xlm-roberta-{FLAGS.shape} | {parameters / 1e6:.0f}M | {size / 2**20:.0f} | "
        f"{jax.devices()[0].device_kind} | {min(times):.2f} | {np.mean(times):.2f} |")


if __name__ == "__main__":
  app.run(main)
