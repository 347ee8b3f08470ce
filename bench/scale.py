"""Scale benchmark: a synthetic Mr.TyDi-shaped corpus of N passages through prepare, ICT, supervised steps,
encoding and search, with the demo's model. Prints a table; ``--json OUT`` writes every figure.

    python bench/scale.py --passages 1000000 [--noexport] --json /tmp/scale-1m.json

The corpus is deterministic: N passages spread over the 11 languages' scripts (Mr.TyDi-style docids that
repeat across languages, 2-5 sentences each), plus ``--rows`` training rows per language (a sentence as the
query, its passage the positive, three other passages as negatives). Peak RSS is the process's maximum
resident set (``ru_maxrss``), measured after each phase; the prepared files sit in the page cache, not in it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each language's letters (a code-point range) and how its sentences end.
SCRIPTS = {
    "ar": (0x0627, 0x064A, ". "), "bn": (0x0995, 0x09B9, "। "), "en": (0x61, 0x7A, ". "),
    "fi": (0x61, 0x7A, ". "), "id": (0x61, 0x7A, ". "), "ja": (0x3042, 0x3093, "。"),
    "ko": (0xAC00, 0xAC00 + 400, ". "), "ru": (0x0430, 0x044F, ". "), "sw": (0x61, 0x7A, ". "),
    "te": (0x0C15, 0x0C39, ". "), "th": (0x0E01, 0x0E2E, " "),
}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vocabulary(language: str, rng: np.random.Generator, size: int = 3000) -> list[str]:
  low, high, _ = SCRIPTS[language]
  lengths = rng.integers(2, 8, size)
  return ["".join(chr(c) for c in rng.integers(low, high + 1, n)) for n in lengths]


def _passages(language: str, start: int, count: int, vocabulary: list[str], seed: int):
  """``(docid, title, text)`` of passages ``start..start+count`` of a language (deterministic by block)."""
  rng = np.random.default_rng([seed, sum(map(ord, language)), start])
  end = SCRIPTS[language][2]
  joiner = "" if language == "ja" else " "
  sentences_per = rng.integers(2, 6, count)
  words = rng.integers(0, len(vocabulary), (count, 5 * 12))
  lengths = rng.integers(6, 13, (count, 5))
  for row in range(count):
    sentences, used = [], 0
    for sentence in range(sentences_per[row]):
      n = lengths[row, sentence]
      sentences.append(joiner.join(vocabulary[w] for w in words[row, used:used + n]))
      used += n
    index = start + row
    yield f"{index // 4}#{index % 4}", " ".join(vocabulary[w] for w in words[row, :2]), end.join(sentences) + end.strip()


def write_data(root: str, passages: int, rows_per_language: int, seed: int) -> dict:
  """The corpus and training rows as gzip JSON Lines in tydi-mini's layout; returns counts."""
  languages = list(SCRIPTS)
  per_language = [passages // len(languages) + (i < passages % len(languages)) for i in range(len(languages))]
  os.makedirs(os.path.join(root, "corpus"), exist_ok=True)
  os.makedirs(os.path.join(root, "train"), exist_ok=True)
  for language, count in zip(languages, per_language):
    rng = np.random.default_rng([seed, sum(map(ord, language))])
    vocabulary = _vocabulary(language, rng)
    with gzip.open(os.path.join(root, "corpus", f"{language}.jsonl.gz"), "wt", encoding="utf-8", compresslevel=1) as out:
      for start in range(0, count, 10000):
        for docid, title, text in _passages(language, start, min(10000, count - start), vocabulary, seed):
          out.write(json.dumps({"docid": docid, "title": title, "text": text}, ensure_ascii=False) + "\n")
    picks = rng.integers(0, count, (rows_per_language, 4))
    with gzip.open(os.path.join(root, "train", f"{language}.jsonl.gz"), "wt", encoding="utf-8") as out:
      for number, pick in enumerate(picks):
        chosen = [next(_passages(language, int(i), 1, vocabulary, seed)) for i in pick]
        as_row = lambda p: {"docid": p[0], "title": p[1], "text": p[2]}
        query = chosen[0][2].split(SCRIPTS[language][2].strip() or " ")[0]
        out.write(json.dumps({"query_id": str(number), "query": query, "positive_passages": [as_row(chosen[0])],
                              "negative_passages": [as_row(p) for p in chosen[1:]]}, ensure_ascii=False) + "\n")
  return dict(zip(languages, per_language))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--passages", type=int, default=100000)
  parser.add_argument("--rows", type=int, default=500, help="training rows per language")
  parser.add_argument("--steps", type=int, default=20, help="ICT and supervised steps (after the first)")
  parser.add_argument("--noexport", action="store_true", help="skip encoding, export and search")
  parser.add_argument("--queries", type=int, default=1000)
  parser.add_argument("--workdir", default="", help="kept when given; a temporary directory otherwise")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table
  import jax

  import configs.demo
  from axl_jax import batching, data, embeddings, encoder, prepared, search, tokenization
  from axl_jax import train_step as ts

  workdir = args.workdir or tempfile.mkdtemp(prefix="axl-scale-")
  figures: dict = {"passages": args.passages, "rows_per_language": args.rows, "devices": jax.device_count(),
                   "platform": jax.devices()[0].platform}
  start = time.perf_counter()
  counts = write_data(os.path.join(workdir, "data"), args.passages, args.rows, seed=0)
  figures["generate_s"] = time.perf_counter() - start
  figures["peak_rss_mb/generate"] = peak_rss_mb()

  config = configs.demo.get_config()
  config.data.root = os.path.join(workdir, "data")
  config.data.prepared_dir = os.path.join(workdir, "prepared")
  config.finetune.languages = config.data.languages
  store = prepared.store(config, workdir)
  start = time.perf_counter()
  corpora = [(language, store.corpus(prepared.corpus_spec(config, language), language)) for language in counts]
  rows = prepared.training_rows(config, config.finetune, store)
  figures["prepare_s"] = time.perf_counter() - start
  figures["prepared_mb"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store.root) for f in fs) / 2**20
  figures["peak_rss_mb/prepare"] = peak_rss_mb()

  start = time.perf_counter()
  texts = (data.passage_text(p, " ") for _, corpus in corpora
           for _, chunk in corpus.chunks(2000, stop=min(2000, len(corpus))) for p in chunk)
  tokenizer = tokenization.train_tokenizer(texts, config.tokenizer.vocab_size, os.path.join(workdir, "tokenizer"))
  config.model.vocab_size = len(tokenizer)
  figures["tokenizer_s"] = time.perf_counter() - start

  model = encoder.BiEncoder(config.model)
  params = encoder.init_params(config.model, jax.random.key(0))

  def run_steps(stage_config, make_batches):
    """Seconds to the end of the first step (batches built, step compiled) and steps/s after it."""
    begin = time.perf_counter()
    batches = make_batches()
    optimizer = ts.create_optimizer(stage_config)
    # The step donates its state: each run starts from its own copy of the initial parameters.
    state = ts.create_train_state(jax.tree.map(jax.numpy.copy, params), optimizer)
    step_fn = ts.make_parallel_train_step(model, optimizer, stage_config.temperature,
                                          learning_rate_fn=ts.create_learning_rate_fn(stage_config))
    rng = jax.random.key(1)
    first = None
    for step in range(args.steps + 1):
      state, metrics = step_fn(state, ts.shard_batch(batches.batch(step), jax.local_device_count()), rng)
      if step == 0:
        jax.block_until_ready(metrics)
        first = time.perf_counter()
    jax.block_until_ready(metrics)
    return first - begin, args.steps / (time.perf_counter() - first), state

  shape = lambda stage: batching.batch_shape(config, stage)
  figures["ict_first_step_s"], figures["ict_steps_per_s"], _ = run_steps(config.ict, lambda: batching.ICTBatches(
      corpora, tokenizer, shape(config.ict), 0, config.data.query_max_length, config.data.passage_max_length, " ",
      config.ict.remove_sentence_prob, config.ict.min_sentence_chars))
  figures["peak_rss_mb/ict"] = peak_rss_mb()
  figures["supervised_first_step_s"], figures["steps_per_s"], state = run_steps(
      config.finetune, lambda: batching.SupervisedBatches(rows, tokenizer, shape(config.finetune), 0,
                                                          config.data.query_max_length,
                                                          config.data.passage_max_length, " "))
  figures["peak_rss_mb/supervised"] = peak_rss_mb()

  if not args.noexport:
    trained = jax.device_get(state.params)
    passage_buckets, query_buckets = batching.passage_buckets(config), batching.query_buckets(config)
    encode = lambda texts, tower, progress=None: embeddings.encode_texts(
        trained, config.model, tokenizer, texts, tower,
        config.data.passage_max_length if tower == "passage" else config.data.query_max_length,
        passage_buckets if tower == "passage" else query_buckets, config.evaluate.encode_batch_size, progress)
    start = time.perf_counter()
    for language, corpus in corpora:
      def read(begin, end, corpus=corpus):
        passages = corpus.passages(range(begin, end))
        return [p.docid for p in passages], [data.passage_text(p, " ") for p in passages]
      embeddings.export_shards(os.path.join(workdir, "embeddings", language), "corpus", len(corpus), read,
                               lambda texts, progress: encode(texts, "passage", progress), config.evaluate.shard_size,
                               {"key": "scale"}, language, config.evaluate.embedding_dtype)
    figures["encode_s"] = time.perf_counter() - start
    figures["encode_passages_per_s"] = args.passages / figures["encode_s"]
    figures["peak_rss_mb/encode"] = peak_rss_mb()
    language, corpus = corpora[2]  # English: the largest language of Mr.TyDi
    sample = np.random.default_rng(0).integers(0, len(corpus), args.queries)
    queries = encode([p.text.split(". ")[0] for p in corpus.passages(sample)], "query")
    start = time.perf_counter()
    scores, docids = search.search_shards(queries, embeddings.load_shards(os.path.join(workdir, "embeddings", language),
                                                                          "corpus"), 100)
    figures["search_s"] = time.perf_counter() - start
    figures["search_queries_per_s"] = args.queries / figures["search_s"]
    figures["search_corpus_passages"] = len(corpus)
    figures["search_top1_is_source"] = float(np.mean([d[0] == corpus.passages([i])[0].docid
                                                      for d, i in zip(docids, sample)]))
    figures["peak_rss_mb/search"] = peak_rss_mb()
  figures["peak_rss_mb"] = peak_rss_mb()

  width = max(map(len, figures))
  for name, value in figures.items():
    print(f"{name:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
  if args.json:
    with open(args.json, "w") as out:
      json.dump(figures, out, indent=1)
  if not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
