"""axl-jax beside the PyTorch stack a user would pick instead: train step, corpus encoding, generation, search.

    python bench/compare.py                                        # tiny shapes: a CPU, a few minutes
    python bench/compare.py --shape=h200 --json=/tmp/compare.json  # issue #11's shapes (one H200)

Both sides run in this process on the same device (JAX's first device; torch on CUDA when it sees one)
with the same shapes and random inputs; lengths are uniform in 25-100% of the maximum. bf16 on a GPU
(JAX: bf16 compute over float32 weights; torch: autocast), float32 on a CPU. Each figure is wall-clock
after warm-up with the device synchronised. Ratios are axl-jax / reference (transformers on torch; for
search, torch matmul + topk). search_shards's figure includes building its FAISS index from the host
array, as evaluation does; the other search rows start with the corpus in place. In each part the reference
runs first and gives its GPU memory back before JAX runs (JAX keeps what it grows to). Random weights,
nothing downloaded; torch is imported here only.
A benchmark, never a test: it asserts nothing.
"""
import functools
import gc
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX grows its GPU pool as needed instead of taking 75% up front: torch and FAISS share the GPU with it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # search's per-shard progress bar would break the table

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import configs.default
from axl_jax import embeddings, encoder, train_step as ts
from axl_jax.batching import passage_buckets
from axl_jax.negatives import decode, qwen2

WORK = ("train", "encode", "generate", "search")
flags.DEFINE_enum("shape", "tiny", ["tiny", "h200"], "tiny: a CPU in minutes; h200: the issue's shapes.")
flags.DEFINE_list("only", list(WORK), "Work to measure, a subset of train,encode,generate,search.")
flags.DEFINE_string("json", "", "Write every figure and the four ratios to this file.")
flags.DEFINE_integer("steps", None, "Timed train steps after two warm-up steps (tiny: 30, h200: 10).")
flags.DEFINE_integer("repeats", None, "Timed runs of encode, generate and search after a warm-up, the best counting "
                     "(tiny: 5, h200: 2).")
flags.DEFINE_integer("torch_threads", 0, "torch's CPU threads (0: its default, one per core). On a busy CPU, 1 "
                     "avoids the oversubscription that slows torch's OpenMP far more than XLA.")
FLAGS = flags.FLAGS

SHAPES = {
    "tiny": dict(model=dict(vocab_size=8000, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
                 queries=8, group=4, query_length=16, passage_length=64, passages=512, encode_batch=64,
                 qwen=dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=True), gen_batch=4, prompt=32, new=16,
                 corpus=50_000, dim=128, search_queries=256, steps=30, repeats=5),
    "h200": dict(model=dict(), queries=64, group=8, query_length=32, passage_length=256, passages=16 * 1024,
                 encode_batch=1024, qwen=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                              num_layers=36, num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
                 gen_batch=64, prompt=256, new=128, corpus=2_000_000, dim=768, search_queries=8192, steps=10,
                 repeats=2),
}
UNITS = {"train": "passages/s", "encode": "passages/s", "generate": "new tokens/s", "search": "queries/s"}
TARGETS = {"train": 3600, "encode": 17300, "generate": 15400, "search": 55000}  # issue #11, one H200
RATIOS = dict(train="ratio_train_step", encode="ratio_encode", generate="ratio_generate", search="ratio_search")
DEPTH = 100


def on_gpu() -> bool:
  return jax.devices()[0].platform == "gpu"


def torch_setup():
  """``(torch, device, autocast, sync)``: CUDA when torch sees it, with bf16 autocast; float32 on a CPU."""
  import torch
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
  sync = torch.cuda.synchronize if device == "cuda" else lambda: None
  return torch, device, autocast, sync


def release_memory():
  """Gives torch's cached GPU memory back once its models are gone, for JAX to grow into."""
  gc.collect()
  if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    sys.modules["torch"].cuda.empty_cache()


def best_seconds(run, repeats, sync=lambda: None):
  """One warm-up call, then the fastest of ``repeats`` timed calls."""
  run()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    sync()
    times.append(time.perf_counter() - start)
  return min(times)


def mean_step_seconds(step, sync):
  """Two warm-up steps, then the mean of ``--steps`` steps dispatched back to back."""
  for _ in range(2):
    sync(step())
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    out = step()
  sync(out)
  return (time.perf_counter() - start) / FLAGS.steps


def tokens(rng, rows, length, vocab):
  """Random ids ``[rows, length]`` and lengths uniform in 25-100% of ``length``."""
  ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
  return ids, rng.integers(max(1, length // 4), length + 1, rows).astype(np.int32)


def model_config(shape):
  """configs/default.py's model (XLM-R base), tiny on request; bf16 and cuDNN attention on NVIDIA GPUs."""
  config = configs.default.get_config().model
  config.update(SHAPES[shape]["model"])
  nvidia = on_gpu() and "rocm" not in jax.devices()[0].client.platform_version.lower()
  config.update(dtype="bfloat16" if on_gpu() else "float32", attention_impl="cudnn" if nvidia else "xla",
                hidden_dropout=0.1, attention_dropout=0.0)
  return config


def xlmr(config, torch, device, dropout):
  """transformers' XLM-R with the dimensions of ``config``, initialised on ``device``, no pooler."""
  import transformers
  hf_config = transformers.XLMRobertaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings, type_vocab_size=1, pad_token_id=1,
      layer_norm_eps=config.layer_norm_eps, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.XLMRobertaModel(hf_config, add_pooling_layer=False)
  return model, f"{device}, {model.config._attn_implementation} attention"


def torch_inputs(torch, device, ids, lengths):
  """Pad id 1 after each length (XLM-R counts positions over non-pad ids) and the attention mask."""
  mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
  return torch.tensor(np.where(mask, ids, 1), device=device), torch.tensor(mask.astype(np.int64), device=device)


def train_parts(s):
  """The reference's part and axl-jax's, each ``part(record)``; so for every kind of work."""
  config = model_config(FLAGS.shape)
  rng = np.random.default_rng(0)
  query_ids, query_lengths = tokens(rng, s["queries"], s["query_length"], config.vocab_size)
  passage_ids, passage_lengths = tokens(rng, s["queries"] * s["group"], s["passage_length"], config.vocab_size)
  batch = {"query_ids": query_ids, "query_lengths": query_lengths, "passage_ids": passage_ids,
           "passage_lengths": passage_lengths}
  return [functools.partial(part, s, config, batch) for part in (train_torch, train_jax)]


def train_torch(s, config, batch, record):
  torch, device, autocast, sync = torch_setup()
  model, where = xlmr(config, torch, device, dropout=0.1)
  model.train()
  # transformers' Trainer default on torch >= 2.8 is the fused AdamW; both sides clip at global norm 1.
  adamw = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01, fused=device == "cuda")
  queries = torch_inputs(torch, device, batch["query_ids"], batch["query_lengths"])
  passages = torch_inputs(torch, device, batch["passage_ids"], batch["passage_lengths"])
  labels = torch.arange(s["queries"], device=device) * s["group"]

  def step():
    with autocast():
      q = model(input_ids=queries[0], attention_mask=queries[1]).last_hidden_state[:, 0].float()
      p = model(input_ids=passages[0], attention_mask=passages[1]).last_hidden_state[:, 0].float()
    loss = torch.nn.functional.cross_entropy(q @ p.T, labels)  # in-batch + group softmax, temperature 1
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    return loss
  rate = len(batch["passage_ids"]) / mean_step_seconds(step, lambda _: sync())
  record(f"transformers XLMRobertaModel + AdamW ({where})", rate, reference=True)


def train_jax(s, config, batch, record):
  optimizer = ts.create_optimizer(configs.default.train_stage(num_steps=1000, warmup_steps=10))
  state = [ts.create_train_state(encoder.init_params(config, jax.random.key(0)), optimizer)]
  train_step = ts.make_parallel_train_step(encoder.BiEncoder(config), optimizer, temperature=1.0)
  sharded, key = ts.shard_batch(batch, jax.local_device_count()), jax.random.key(1)

  def step():
    state[0], metrics = train_step(state[0], sharded, key)
    return metrics
  rate = len(batch["passage_ids"]) / mean_step_seconds(step, jax.block_until_ready)
  record(f"axl_jax make_parallel_train_step ({config.dtype}, {config.attention_impl})", rate)


def encode_parts(s):
  config = model_config(FLAGS.shape)
  ids, lengths = tokens(np.random.default_rng(1), s["passages"], s["passage_length"], config.vocab_size)
  return [functools.partial(part, s, config, ids, lengths) for part in (encode_torch, encode_jax)]


def encode_torch(s, config, ids, lengths, record):
  torch, device, autocast, sync = torch_setup()
  model, where = xlmr(config, torch, device, dropout=0.0)
  model.eval()
  output, batch_size = np.zeros((len(ids), config.hidden_size), np.float32), s["encode_batch"]

  def run(order):
    with torch.inference_mode(), autocast():
      for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch_ids, mask = torch_inputs(torch, device, ids[rows, :lengths[rows].max()], lengths[rows])
        output[rows] = model(input_ids=batch_ids, attention_mask=mask).last_hidden_state[:, 0].float().cpu()
  record(f"transformers XLMRobertaModel, corpus order, padded to the batch's longest ({where})",
         len(ids) / best_seconds(lambda: run(np.arange(len(ids))), FLAGS.repeats, sync), reference=True)
  record(f"transformers XLMRobertaModel, length-sorted (not the reference) ({where})",
         len(ids) / best_seconds(lambda: run(np.argsort(lengths, kind="stable")), FLAGS.repeats, sync))


def encode_jax(s, config, ids, lengths, record):
  """``embeddings.encode_tokens`` (what evaluation and export run, after tokenizing): length-sorted, bucketed,
  every batch the same rows, the next batch dispatched before the last one is fetched."""
  length, batch_size = s["passage_length"], s["encode_batch"]
  run_config = configs.default.get_config()
  run_config.data.update(passage_max_length=length, passage_length_buckets=f"{length // 4},{length // 2}")
  buckets = passage_buckets(run_config)  # 64,128,256 at 256 tokens: the default config's
  params = encoder.init_params(config, jax.random.key(0))
  tokens = [ids[i, :lengths[i]] for i in range(len(ids))]
  run = lambda: embeddings.encode_tokens(params, config, tokens, "passage", buckets, batch_size)
  record(f"axl_jax encode_passages, length-sorted, buckets {','.join(map(str, buckets))} ({config.dtype}, "
         f"{config.attention_impl})", len(ids) / best_seconds(run, FLAGS.repeats))


def generate_parts(s):
  """bench/generate.py's comparison: greedy, no end token, so every row makes exactly ``new`` tokens."""
  config = qwen2.Qwen2Config(**s["qwen"], dtype="bfloat16" if on_gpu() else "float32")
  prompts = np.random.default_rng(2).integers(1, config.vocab_size, (s["gen_batch"], s["prompt"])).tolist()
  return [functools.partial(part, s, config, prompts) for part in (generate_torch, generate_jax)]


def generate_torch(s, config, prompts, record):
  import transformers
  torch, device, _, sync = torch_setup()
  dtype = torch.bfloat16 if device == "cuda" else torch.float32
  hf_config = transformers.Qwen2Config(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, tie_word_embeddings=config.tie_word_embeddings)
  default_dtype = torch.get_default_dtype()
  torch.set_default_dtype(dtype)  # made in place on the device: 3B initialised on the host takes minutes
  try:
    with torch.device(device):
      model = transformers.Qwen2ForCausalLM(hf_config).eval()
  finally:
    torch.set_default_dtype(default_dtype)
  input_ids = torch.tensor(prompts, device=device)

  def run():
    with torch.inference_mode():
      model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=s["new"],
                     min_new_tokens=s["new"], do_sample=False, eos_token_id=None, pad_token_id=0)
  record(f"transformers Qwen2ForCausalLM.generate ({device}, {str(dtype).split('.')[-1]})",
         len(prompts) * s["new"] / best_seconds(run, FLAGS.repeats, sync), reference=True)


def generate_jax(s, config, prompts, record):
  model = qwen2.Qwen2(config)
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                          *qwen2.init_cache(config, 1, 1), 0, jnp.ones((1, 1), bool))["params"])(
                                              jax.random.key(0))

  def run():
    outputs = decode.generate_ids(params, config, prompts, max_new_tokens=s["new"], eos_ids=[-1], pad_id=0,
                                  prompt_bucket=s["prompt"])
    assert all(len(row) == s["new"] for row in outputs)
  record(f"axl_jax decode.generate_ids ({config.dtype})", len(prompts) * s["new"] / best_seconds(run, FLAGS.repeats))


def search_parts(s):
  """Exact top-100 by inner product; every path but search_shards has its corpus in place beforehand."""
  dtype = np.float16 if on_gpu() else np.float32
  corpus_key, query_key = jax.random.split(jax.random.key(3))
  corpus = np.array(jax.random.normal(corpus_key, (s["corpus"], s["dim"]), dtype))
  queries = np.array(jax.random.normal(query_key, (s["search_queries"], s["dim"]), dtype))
  return [functools.partial(part, corpus, queries) for part in (search_torch, search_faiss, search_lax, search_axl)]


def chunks(queries, corpus):
  """Equal slices of queries, [slice, corpus] scores below 2^31 (1,024 queries, 4 GiB in float16 at 2M)."""
  size = 1 << max(0, (2**31 // len(corpus)).bit_length() - 1)
  return [slice(start, start + size) for start in range(0, len(queries), size)]


def search_torch(corpus, queries, record):
  torch, device, _, sync = torch_setup()
  torch_corpus, torch_queries = torch.from_numpy(corpus).to(device), torch.from_numpy(queries).to(device)

  def run():
    for rows in chunks(queries, corpus):
      torch.topk(torch_queries[rows] @ torch_corpus.T, DEPTH, dim=1)
  record(f"torch matmul + topk ({device}, {corpus.dtype})", len(queries) / best_seconds(run, FLAGS.repeats, sync),
         reference=True)


def faiss_here():
  """FAISS, refused on a GPU machine where it has no GPU: a CPU search of a GPU-sized corpus compares nothing."""
  import faiss
  if on_gpu() and not faiss.get_num_gpus():
    raise RuntimeError("FAISS sees no GPU here (faiss-cpu installed?): install faiss-gpu")
  return faiss


def search_faiss(corpus, queries, record):
  faiss = faiss_here()
  index, where = faiss.IndexFlatIP(corpus.shape[1]), "CPU"
  index.add(np.ascontiguousarray(corpus, np.float32))
  if faiss.get_num_gpus():
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16, options.shard = True, True
    index, where = faiss.index_cpu_to_all_gpus(index, options), "GPU float16"
  float_queries = np.ascontiguousarray(queries, np.float32)
  record(f"FAISS IndexFlatIP ({where})",
         len(queries) / best_seconds(lambda: index.search(float_queries, DEPTH), FLAGS.repeats))


def search_lax(corpus, queries, record):
  corpus_on_device = jax.device_put(corpus)
  top_k = jax.jit(lambda q, c: jax.lax.top_k(q @ c.T, DEPTH))

  def run():
    for rows in chunks(queries, corpus):
      jax.block_until_ready(top_k(queries[rows], corpus_on_device))
  record(f"jnp matmul + jax.lax.top_k ({corpus.dtype})", len(queries) / best_seconds(run, FLAGS.repeats))


def search_axl(corpus, queries, record):
  faiss = faiss_here()
  from axl_jax import search
  ids = [str(i) for i in range(len(corpus))]
  record(f"axl_jax search_shards (index built in the call; {faiss.get_num_gpus()} FAISS GPUs)",
         len(queries) / best_seconds(lambda: search.search_shards(queries, [(ids, corpus)], DEPTH), FLAGS.repeats))


PARTS = {"train": train_parts, "encode": encode_parts, "generate": generate_parts, "search": search_parts}


def main(argv):
  del argv
  if set(FLAGS.only) - set(WORK):
    raise app.UsageError(f"--only: choose from {','.join(WORK)}, got {','.join(FLAGS.only)}")
  devices, h200 = jax.devices(), FLAGS.shape == "h200"
  FLAGS.steps = FLAGS.steps or SHAPES[FLAGS.shape]["steps"]
  FLAGS.repeats = FLAGS.repeats or SHAPES[FLAGS.shape]["repeats"]
  figures = {"shape": FLAGS.shape, "shapes": SHAPES[FLAGS.shape], "jax": jax.__version__,
             "device": f"{len(devices)} x {devices[0].device_kind}", "rows": [], "errors": {},
             **{name: None for name in RATIOS.values()}}
  try:
    import torch
    figures["torch"] = f"{torch.__version__} ({'cuda' if torch.cuda.is_available() else 'cpu'})"
  except ImportError:
    figures["torch"] = "not installed"
  print(f"shape={FLAGS.shape}; devices: {figures['device']}; jax {jax.__version__}; torch {figures['torch']}\n")
  print("| work | implementation | throughput |" + (" target (H200) |" if h200 else ""))
  print("|---|---|---|" + ("---|" if h200 else ""))
  for work in [w for w in WORK if w in FLAGS.only]:
    rates = {}

    def record(name, rate, reference=False, work=work, rates=rates):
      figures["rows"].append({"work": work, "implementation": name, UNITS[work]: rate, "reference": reference})
      rates["reference" if reference else name] = rate
      target = f" {TARGETS[work]:,} |" if name.startswith("axl_jax") else " |"
      print(f"| {work} | {name} | {rate:,.0f} {UNITS[work]} |" + (target if h200 else ""), flush=True)

    def failed(error, work=work):  # a failing part (no torch, out of memory) leaves the others' figures
      traceback.print_exc()
      figures["errors"].setdefault(work, []).append(f"{type(error).__name__}: {error}")
      print(f"| {work} | failed: {type(error).__name__}: {str(error)[:200]} | |" + (" |" if h200 else ""),
            flush=True)
    try:
      parts = PARTS[work](SHAPES[FLAGS.shape])
    except Exception as error:
      parts = []
      failed(error)
    for part in parts:
      try:
        part(record)
      except Exception as error:
        failed(error)
      release_memory()
    ours = [rate for name, rate in rates.items() if name.startswith("axl_jax")]
    figures[RATIOS[work]] = ours[0] / rates["reference"] if ours and "reference" in rates else None
    if FLAGS.json:  # after each kind of work, so a run stopped part-way still leaves its figures
      with open(FLAGS.json, "w") as file:
        json.dump(figures, file, indent=2)

  print("\n| ratio | axl-jax / reference |")
  print("|---|---|")
  for work in [w for w in WORK if w in FLAGS.only]:
    ratio = figures[RATIOS[work]]
    print(f"| {RATIOS[work]} | {'-' if ratio is None else f'{ratio:.2f}x'} |")


if __name__ == "__main__":
  app.run(main)
