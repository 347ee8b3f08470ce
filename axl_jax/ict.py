"""Inverse Cloze Task pseudo pairs (ORQA): a sentence of a passage is the query, the passage its positive.

The sentence is removed from its passage with probability ``remove_prob`` (0.9 in ORQA) so the model
learns more than word overlap. Passages of one sentence give no pair. Sentence splitting covers the
11 languages' scripts: Latin/Cyrillic ``. ! ?``, CJK ``。！？``, Bengali/Devanagari ``। ॥``, Arabic
``؟ ۔ .``; Thai has no sentence punctuation and separates sentences with spaces, so Thai splits there.
"""
from __future__ import annotations

import re

import numpy as np

from axl_jax.data import Passage

# A terminator ends a sentence when white space follows (Latin, Cyrillic, Arabic, Indic scripts use
# spaces between sentences); the CJK full stops end one even without a space.
_SPACED_END = re.compile(r"(?<=[.!?؟۔।॥])\s+")
_CJK_END = re.compile(r"(?<=[。！？])")
_WHITESPACE = re.compile(r"\s+")


def split_sentences(text: str, language: str, min_chars: int = 5) -> list[str]:
  """Sentences of ``text``; pieces shorter than ``min_chars`` are merged into their neighbour."""
  if language == "th":
    pieces = _WHITESPACE.split(text)
  else:
    pieces = [part for chunk in _SPACED_END.split(text) for part in _CJK_END.split(chunk)]
  sentences: list[str] = []
  for piece in (p.strip() for p in pieces):
    if not piece:
      continue
    if sentences and (len(piece) < min_chars or len(sentences[-1]) < min_chars):
      joiner = "" if language == "ja" else " "
      sentences[-1] = sentences[-1] + joiner + piece
    else:
      sentences.append(piece)
  return sentences


def make_pair(passage: Passage, language: str, rng: np.random.Generator, remove_prob: float,
              min_chars: int = 5) -> tuple[str, Passage] | None:
  """``(pseudo_query, context_passage)`` for one passage, or None when it has a single sentence."""
  sentences = split_sentences(passage.text, language, min_chars)
  if len(sentences) < 2:
    return None
  index = int(rng.integers(len(sentences)))
  query = sentences[index]
  if rng.random() < remove_prob:
    sentences = sentences[:index] + sentences[index + 1:]
  joiner = "" if language in ("ja",) else " "
  return query, Passage(passage.docid, passage.title, joiner.join(sentences))
