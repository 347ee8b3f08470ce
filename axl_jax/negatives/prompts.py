"""Prompts for the three rewriting techniques and a robust parser of the model's structured answer.

The model is asked for JSON ``{"rewrite": "..."}``; the parser also accepts it inside a code fence or
after some chatter, and falls back to the first ``"rewrite": "..."`` it can find. Bump
``PROMPT_VERSION`` whenever a template changes: every record carries it.
"""
from __future__ import annotations

import json
import re

from axl_jax.data import LANGUAGE_NAMES

# v2: long passages are shown only up to the retriever's window (negatives/window.py).
PROMPT_VERSION = "v2"

TECHNIQUES = {
    "entity_substitution": (
        "Replace the named entity that answers the question (a person, place, organisation, work or date) "
        "with a different, plausible entity of the same type, everywhere it appears. Change nothing else."),
    "numerical_perturbation": (
        "Change the numbers that answer the question (years, counts, amounts, dates, measurements) to "
        "different, plausible values, written in the same kind of digits or number words. Change nothing else."),
    "logical_negation": (
        "Negate the statement that answers the question (add a negation, remove one, or reverse its meaning) "
        "so that the passage no longer supports the answer. Change as few words as possible."),
}

SYSTEM = ("You edit encyclopedia passages to create hard negative examples for training a search engine. "
          "You follow the instructions exactly and answer with JSON only.")


def messages(technique: str, language: str, query: str, passage: str) -> list[dict]:
  """Chat messages asking for one rewrite of ``passage`` with ``technique``."""
  if technique not in TECHNIQUES:
    raise ValueError(f"unknown technique {technique!r}; expected one of {sorted(TECHNIQUES)}")
  name = LANGUAGE_NAMES[language].capitalize()
  user = (f"Language: {name}\nQuestion: {query}\nPassage: {passage}\n\n"
          f"Task: {TECHNIQUES[technique]}\n"
          f"The rewritten passage must be in {name}, in the same script as the original, about as long as the "
          "original, and must no longer answer the question.\n"
          'Answer with JSON only, in this form: {"rewrite": "<the rewritten passage>"}')
  return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_FIELD = re.compile(r'"rewrite"\s*:\s*"((?:[^"\\]|\\.)*)"', re.DOTALL)


def parse_rewrite(answer: str) -> str | None:
  """The ``rewrite`` string of the model's answer, or None when none can be recovered."""
  fenced = _FENCE.search(answer)
  candidates = [fenced.group(1)] if fenced else []
  start, end = answer.find("{"), answer.rfind("}")
  if 0 <= start < end:
    candidates.append(answer[start:end + 1])
  for candidate in candidates:
    try:
      value = json.loads(candidate)
    except json.JSONDecodeError:
      continue
    if isinstance(value, dict) and isinstance(value.get("rewrite"), str):
      return value["rewrite"]
  match = _FIELD.search(answer)
  if match:
    try:
      return json.loads(f'"{match.group(1)}"')
    except json.JSONDecodeError:
      return None
  return None
