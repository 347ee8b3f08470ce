"""The ``ict`` stage: Inverse Cloze Task pretraining on the corpora of ``data.languages``.

Pseudo pairs (a sentence as the query, the rest of its passage as the positive) are made on the fly from
passages read by index from the prepared corpora (none is held in memory), with in-batch negatives only
(``ict.group_size`` 1).
"""
from __future__ import annotations

from axl_jax import batching, data, prepared
from axl_jax.stages import training

EXPENSIVE = True


def _corpus_specs(config) -> list[tuple[str, str]]:
  template = config.ict.corpus or config.data.corpus
  return [(language, data.expand_spec(template, config.data.root, language))
          for language in data.parse_languages(config.data.languages)]


def inputs(config, name, available):
  return training.inputs(config, name, available, config.ict.init_checkpoint)


def fingerprint_fields(config, name):
  fields = training.stage_fields("ict", config.ict, config.ict.init_checkpoint)
  fields["ict.corpus"] = [[language, config.ict.corpus or config.data.corpus, data.spec_identity(spec)]
                          for language, spec in _corpus_specs(config)]
  return fields


def check_config(config, name):
  training.check_stage(config, "ict", config.ict)
  return [spec for _, spec in _corpus_specs(config)]


def run(ctx):
  config = ctx.config
  store = prepared.store(config, ctx.workdir.root)
  corpora = [(language, store.corpus(spec, language)) for language, spec in _corpus_specs(config)]
  batches = batching.ICTBatches(corpora, ctx.tokenizer, training.batch_shape(ctx, config.ict), config.seed,
                                config.data.query_max_length, config.data.passage_max_length,
                                config.data.title_separator, config.ict.remove_sentence_prob,
                                config.ict.min_sentence_chars)
  return training.train(ctx, config.ict, batches, config.ict.init_checkpoint)
