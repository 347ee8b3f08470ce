"""Writes adversarial negatives as sharded JSON Lines: ``python -m axl_jax.negatives.generate``.

    python -m axl_jax.negatives.generate --config=configs/demo.py --output=runs/demo/negatives \
        --config.generator.backend=rules

Meant to run as its own process (the pipeline launches it with ``subprocess``) and never imports
PyTorch. Every (training query, technique) pair is one record: query_id, source docid, language,
technique, backend, model id, prompt version, the generated text, accepted or the reject reason.
Records go into fixed shards written atomically, each with a ``shard-NNNNN.done.json`` beside it (its
counts), so a killed run restarts at the missing shards and ends with no record lost or duplicated.
``--process_index/--process_count``: one generator per host, each making the shards ``i`` with
``i % process_count == process_index`` on its own accelerators; together they make one set, which any
host count resumes.
"""
import hashlib
import json
import os
import time
import zlib

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from axl_jax import batching, data, hub, io, prepared, tokenization
from axl_jax.negatives import checks, prompts, rules
from axl_jax.negatives.window import EncoderWindow, word_cut

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Directory for the shards and manifest.json.")
config_flags.DEFINE_config_file("config", None, "Launch config; its `generator` section is used.", lock_config=True)
flags.DEFINE_string("config_json", None, "A whole config as JSON (how the pipeline hands its config over).")
flags.DEFINE_integer("process_index", 0, "This host's share of the shards: those i with i % process_count == it.")
flags.DEFINE_integer("process_count", 1, "Hosts generating together into --output.")


def _source_specs(config) -> list[tuple[str, str]]:
  """``(language, spec)`` of the rows whose positives are rewritten: ``generator.train_data`` ("" = finetune's)
  in ``generator.languages`` (the rounds set them to finetune's rows and languages)."""
  template = config.generator.train_data or config.finetune.train_data
  return [(language, data.expand_spec(template, config.data.root, language, "train"))
          for language in data.parse_languages(config.generator.languages, "generator.languages")]


def work_items(config, window: EncoderWindow | None = None) -> list[dict]:
  """Every (query, technique) to generate, in a fixed order: the shards are slices of this list. ``visible``
  is how many characters of the positive's text the retriever reads (all without a ``window``)."""
  generator = config.generator
  techniques = [t.strip() for t in generator.techniques.split(",") if t.strip()]
  for technique in techniques:
    if technique not in prompts.TECHNIQUES:
      raise ValueError(f"config field generator.techniques: unknown technique {technique!r}")
  items = []
  store = prepared.Store(config.data.prepared_dir)
  for language, spec in _source_specs(config):
    rows = store.rows(spec, language)
    count = min(len(rows), generator.max_queries_per_language or len(rows))
    for example in rows.examples(range(count)):
      positive = example.positives[0]
      visible = window.visible_chars(positive.title, positive.text) if window else len(positive.text)
      for technique in techniques:
        items.append({"query_id": example.query_id, "query": example.query, "language": language,
                      "source_docid": positive.docid, "title": positive.title, "positive": positive.text,
                      "technique": technique, "answers": example.answers, "visible": visible})
  return items


class RulesBackend:
  """Rule-based rewrites; entity substitution swaps a title found in the text for another corpus title.

  The titles are those of at most ``TITLE_SAMPLE`` passages per language (all of a small corpus), drawn
  by index from the prepared corpus: a Mr.TyDi corpus is never read whole.
  """
  model_id = "rules"
  TITLE_SAMPLE = 16384

  def __init__(self, config):
    self.seed = config.generator.seed
    self.titles = {}
    store = prepared.Store(config.data.prepared_dir)
    for language in dict.fromkeys(language for language, _ in _source_specs(config)):
      corpus = store.corpus(prepared.corpus_spec(config, language), language)
      count = min(len(corpus), self.TITLE_SAMPLE)
      sample = batching.permute([self.seed, zlib.crc32(language.encode())], np.arange(count), len(corpus)) \
          if count else np.zeros(0, np.int64)
      self.titles[language] = sorted({p.title for p in corpus.passages(np.sort(sample)) if p.title})

  def rewrite(self, items: list[dict]) -> list[tuple[str | None, int, str]]:
    """``(text, 0 new tokens, why there is none)`` per item: the edit is made where the retriever reads."""
    results = []
    for item in items:
      # Ids repeat across languages (Mr.TyDi), so the language is part of the stream's key.
      rng = lambda: np.random.default_rng([self.seed, zlib.crc32(f"{item['language']}\0{item['query_id']}".encode()),
                                           list(prompts.TECHNIQUES).index(item["technique"])])
      edit = lambda limit: rules.rewrite(item["technique"], item["positive"], item["title"], item["language"],
                                         self.titles[item["language"]], rng(), limit)
      text = edit(item["visible"])
      # Nothing to edit in the window: say whether the rule would have applied beyond it.
      why = "" if text is not None else ("only_outside_window" if item["visible"] < len(item["positive"])
                                         and edit(None) is not None else "not_applicable")
      results.append((text, 0, why))
    return results


class QwenBackend:
  def __init__(self, config):
    from axl_jax import hf_checkpoint
    from axl_jax.negatives import qwen2
    from axl_jax.negatives.chat import ChatTokenizer
    generator = config.generator
    self.model_id, self.generator = generator.checkpoint, generator
    self.model_config, self.params = qwen2.load(generator.checkpoint, generator.dtype)
    self.tokenizer = ChatTokenizer(hf_checkpoint.resolve(generator.checkpoint))
    self.eos_ids = self.tokenizer.end_ids()
    if not self.eos_ids:
      raise ValueError(f"{generator.checkpoint}: the tokenizer has no end-of-turn token")
    self.pad_id = self.tokenizer.pad_id()

  def rewrite(self, items: list[dict]) -> list[tuple[str | None, int, str]]:
    """``(text, new tokens, "")`` per item. The model sees the part of the positive the retriever reads, cut
    at a word start; the rest follows its rewrite unchanged (an edit there would be invisible to the retriever).
    A positive whose title fills the window has nothing to show: ``only_outside_window``."""
    from axl_jax.negatives import decode
    cuts = [word_cut(item["positive"], item["visible"]) for item in items]
    results: list = [(None, 0, "only_outside_window") if cut == 0 else None for cut in cuts]
    todo = [index for index, cut in enumerate(cuts) if cut > 0]
    prompt_ids = {index: self.tokenizer.prompt_ids(prompts.messages(
        items[index]["technique"], items[index]["language"], items[index]["query"],
        items[index]["positive"][:cuts[index]])) for index in todo}
    # Prompts of similar length batched together: less left padding to prefill and to keep in the cache.
    order = sorted(todo, key=lambda index: (len(prompt_ids[index]), index))
    size = self.generator.batch_size
    for start in range(0, len(order), size):
      rows = order[start:start + size]
      batch = [prompt_ids[row] for row in rows]
      padded = batch + [batch[0]] * (size - len(batch))  # A fixed batch shape compiles once.
      # The seed depends on the work itself, so a restarted run samples exactly the same tokens.
      first = items[rows[0]]
      seed = zlib.crc32(json.dumps([self.generator.seed, first["language"], first["query_id"],
                                    first["technique"]]).encode())
      outputs = decode.generate_ids(self.params, self.model_config, padded, max_new_tokens=self.generator.max_new_tokens,
                                    eos_ids=self.eos_ids, pad_id=self.pad_id, temperature=self.generator.temperature,
                                    top_p=self.generator.top_p, seed=seed)[:len(batch)]
      for row, ids in zip(rows, outputs):
        text = prompts.parse_rewrite(self.tokenizer.decode(ids))
        tail = items[row]["positive"][cuts[row]:]
        results[row] = (None if text is None else text + tail, len(ids), "")
    return results


def _fingerprint(config, num_items: int, window: EncoderWindow | None) -> str:
  """What decides the records: the generator's settings, the prompts, the rows rewritten, the corpus and
  the retriever's window."""
  # Not ``env``: where the generator runs (which chips) does not change what it writes.
  fields = {k: v for k, v in config.generator.to_dict().items() if k != "env"} | {
      "prompt_version": prompts.PROMPT_VERSION, "num_items": num_items,
      "rows": [[language, data.spec_identity(spec)] for language, spec in _source_specs(config)],
      "corpus": [data.spec_identity(data.expand_spec(config.data.corpus, config.data.root, language))
                 for language, _ in _source_specs(config)] if config.generator.backend == "rules" else [],
      "title_sample": RulesBackend.TITLE_SAMPLE if config.generator.backend == "rules" else 0,
      "window": [tokenization.fingerprint(window.tokenizer), window.max_length, window.separator] if window else None}
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def encoder_window(config) -> EncoderWindow | None:
  """The retriever's window: its tokenizer (``tokenizer.name_or_path``; the rounds pass the run's own) and
  ``data.passage_max_length``. Without a tokenizer, edits may fall anywhere in the passage."""
  if not config.tokenizer.name_or_path:
    logging.warning("generator: no tokenizer.name_or_path, so edits are not kept to the %d tokens the retriever "
                    "reads", config.data.passage_max_length)
    return None
  return EncoderWindow(tokenization.load_tokenizer(config.tokenizer.name_or_path), config.data.passage_max_length,
                       config.data.title_separator)


def done_path(output: str, shard: int) -> str:
  return os.path.join(output, f"shard-{shard:05d}.done.json")


def run(config, output: str, process_index: int = 0, process_count: int = 1) -> dict:
  """Generates this process's missing shards; returns the manifest (with totals once every shard is done)."""
  hub.configure(config)
  if not config.data.prepared_dir:  # Standalone: the rules backend's prepared corpora live beside the output.
    config = config.copy_and_resolve_references()
    config.data.prepared_dir = os.path.join(output, "prepared")
  window = encoder_window(config)
  items = work_items(config, window)
  shard_size = config.generator.shard_size
  num_shards = max(1, -(-len(items) // shard_size))
  fingerprint = _fingerprint(config, len(items), window)
  manifest_path = os.path.join(output, "manifest.json")
  manifest = {"fingerprint": fingerprint, "num_records": len(items), "shard_size": shard_size,
              "num_shards": num_shards, "prompt_version": prompts.PROMPT_VERSION,
              "generator": config.generator.to_dict(), "complete": False}
  if os.path.exists(manifest_path):
    previous = io.read_json(manifest_path)
    if previous["fingerprint"] != fingerprint:
      raise ValueError(f"{output} holds negatives of another generator config or data "
                       f"(fingerprint {previous['fingerprint']} != {fingerprint}); pass a new --output")
  else:
    io.write_json(manifest_path, manifest)  # every host writes the same: the set's identity, before any shard
  backend_cls = {"rules": RulesBackend, "qwen": QwenBackend}.get(config.generator.backend)
  if backend_cls is None:
    raise ValueError(f"config field generator.backend must be qwen or rules, got {config.generator.backend!r}")
  backend = None
  mine = range(process_index, num_shards, process_count)
  progress = tqdm(total=sum(len(items[s * shard_size:(s + 1) * shard_size]) for s in mine), unit="record",
                  desc=f"negatives (host {process_index} of {process_count})" if process_count > 1 else "negatives")
  new_tokens, started = 0, time.time()
  for shard in mine:
    shard_items = items[shard * shard_size:(shard + 1) * shard_size]
    if os.path.exists(done_path(output, shard)):
      progress.update(len(shard_items))
      continue
    backend = backend or backend_cls(config)  # The model loads only when there is work left.
    records, counts = [], {}
    for item, (text, tokens, why) in zip(shard_items, backend.rewrite(shard_items)):
      if text is None and why:
        reason = why  # e.g. the rule has nothing to edit (where the retriever reads)
      else:
        reason = checks.reject_reason(text, item["positive"], item["language"], item["answers"])
      if reason is None and window and window.same_input(item["title"], item["positive"], text):
        reason = "outside_window"  # every change lies beyond the tokens the retriever reads
      records.append({"query_id": item["query_id"], "source_docid": item["source_docid"],
                      "language": item["language"], "technique": item["technique"],
                      "backend": config.generator.backend, "model_id": backend.model_id,
                      "prompt_version": prompts.PROMPT_VERSION, "text": text, "accepted": reason is None,
                      "reject_reason": reason, "new_tokens": tokens})
      counts[reason or "accepted"] = counts.get(reason or "accepted", 0) + 1
      new_tokens += tokens
    io.write_jsonl(os.path.join(output, f"shard-{shard:05d}.jsonl"), records)
    io.write_json(done_path(output, shard), {"records": len(records), "counts": counts})  # the shard is done
    progress.update(len(shard_items))
    if new_tokens:
      progress.set_postfix(tokens_per_s=f"{new_tokens / max(1e-9, time.time() - started):.0f}")
  progress.close()
  if not all(os.path.exists(done_path(output, shard)) for shard in range(num_shards)):
    return manifest  # other hosts' shards are still being made
  totals: dict = {}
  for shard in range(num_shards):
    for reason, count in io.read_json(done_path(output, shard))["counts"].items():
      totals[reason] = totals.get(reason, 0) + count
  manifest.update(complete=True, counts=totals)
  io.write_json(manifest_path, manifest)
  logging.info("Negatives in %s: %s", output, totals)
  return manifest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  config = FLAGS.config
  if FLAGS.config_json:
    import ml_collections
    with open(FLAGS.config_json, encoding="utf-8") as file:
      config = ml_collections.ConfigDict(json.load(file))
  if config is None:
    raise app.UsageError("--config or --config_json is required")
  run(config, FLAGS.output, FLAGS.process_index, FLAGS.process_count)


if __name__ == "__main__":
  app.run(main)
