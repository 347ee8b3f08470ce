"""Tokenizers: a pretrained one from the HF hub or a local directory, or one trained on the corpus.

Both end up as a ``transformers`` fast tokenizer (no torch involved). A trained tokenizer is a
multilingual BPE over SentencePiece-style ``▁`` pre-tokens (so scripts without spaces such as Japanese
and Thai still get subwords), saved in ``<workdir>/tokenizer`` and reused when the run resumes. BPE
rather than Unigram because its training is deterministic: the same corpus gives the same vocabulary,
so two runs with one seed train the same model.
"""
from __future__ import annotations

import copy
import os
import shutil
import threading
from typing import Iterable

import numpy as np
from absl import logging

from axl_jax import io

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


SETTINGS_FILE = "axl_training_settings.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: str, settings: dict | None = None):
  """Trains a BPE tokenizer on ``texts`` and saves it to ``directory`` atomically, with the ``settings``
  that decided it (so a later run can tell whether it may reuse it)."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.NFKC()
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, max_token_length=16,
                                show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  tokenizer.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  partial = directory + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  wrapped.save_pretrained(partial)
  if settings is not None:
    io.write_json(os.path.join(partial, SETTINGS_FILE), settings)
  os.replace(partial, directory)
  return wrapped


def load_tokenizer(name_or_path: str):
  """A HF fast tokenizer from a local directory or a hub id, with an actionable error offline."""
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
  except OSError as error:
    raise OSError(f"could not load tokenizer {name_or_path!r}: {error}. Without network access, download it "
                  "elsewhere (huggingface-cli download NAME --local-dir DIR) and set tokenizer.name_or_path=DIR.") from error


class StaleTokenizerError(ValueError):
  """The workdir's trained tokenizer was made with other settings or data, and retraining was not asked for."""


def get_tokenizer(config, workdir: str, corpus_texts, settings: dict, retrain: bool = False):
  """The run's tokenizer: the configured one, else the one trained in ``workdir``, else train it now.

  ``corpus_texts`` is a zero-argument callable so the corpus is only read when training is needed.
  ``settings`` (vocabulary size, corpus identity, ...) must match those of a tokenizer trained earlier;
  otherwise it is retrained when ``retrain``, and the run stops when not (every stage depends on it).
  """
  if config.tokenizer.name_or_path:
    return load_tokenizer(config.tokenizer.name_or_path)
  directory = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(directory, "tokenizer.json")):
    settings_path = os.path.join(directory, SETTINGS_FILE)
    previous = io.read_json(settings_path) if os.path.exists(settings_path) else None
    if previous == settings:
      logging.info("Reusing the tokenizer trained earlier in %s", directory)
      return load_tokenizer(directory)
    changed = sorted(k for k in set(settings) | set(previous or {}) if (previous or {}).get(k) != settings.get(k))
    if not retrain:
      raise StaleTokenizerError(
          f"{directory} was trained with other settings or data ({', '.join(changed)} changed) and every stage "
          "depends on it: run with --config.recompute=all to retrain it and everything, or use a new --workdir.")
    logging.warning("Retraining the tokenizer in %s: %s changed", directory, ", ".join(changed))
    shutil.rmtree(directory)
  logging.info("Training a %d-piece BPE tokenizer into %s", config.tokenizer.vocab_size, directory)
  os.makedirs(workdir, exist_ok=True)
  return train_tokenizer(corpus_texts(), config.tokenizer.vocab_size, directory, settings)


_threads = threading.local()


def _own_copy(tokenizer):
  """This thread's copy of ``tokenizer``: a fast tokenizer's call sets truncation on its shared Rust backend,
  so two threads tokenizing to different lengths at once would race (the input pipeline's workers do)."""
  if threading.current_thread() is threading.main_thread():
    return tokenizer
  copies = _threads.__dict__.setdefault("copies", {})
  original, copy_ = copies.get(id(tokenizer), (None, None))
  if original is not tokenizer:
    copy_ = copy.deepcopy(tokenizer)
    copies[id(tokenizer)] = (tokenizer, copy_)
  return copy_


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
  """Token ids (with the model's special tokens) of each text, truncated to ``max_length`` (thread-safe)."""
  if not texts:
    return []
  encoded = _own_copy(tokenizer)(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
  return [np.asarray(ids, dtype=np.int32) for ids in encoded["input_ids"]]


def fingerprint(tokenizer) -> str:
  """A hash of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
  import hashlib
  import json
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
  definition = json.loads(backend.to_str())
  # Truncation and padding are set on the backend by each call (they follow the last max_length used).
  definition.pop("truncation", None)
  definition.pop("padding", None)
  return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]
