"""The ``rules`` backend: the three kinds of near-misses without any model.

- numerical perturbation: a number of the passage changes value, kept in its own digit script
  (ASCII, Arabic-Indic, Bengali, Telugu, Thai, ... : any Unicode decimal digits);
- entity substitution: a title of the same language's corpus that occurs in the passage (its own
  title first) is replaced everywhere by another title of that corpus;
- logical negation: the first match of a small per-language lexicon of (affirmative, negated) pairs
  flips, in whichever direction the passage allows.

Each edit is chosen inside the first ``limit`` characters of the passage, the part the retriever reads
(``negatives/window.py``): a number there, an entity found there (then replaced everywhere), a lexicon
match there. Deterministic for a given ``rng``. Returns None when a technique does not apply there.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np

_NUMBER = re.compile(r"\d+")

# (affirmative, negated) pairs, tried in order; spaces delimit words where the script uses them.
NEGATIONS = {
    "en": [(" is ", " is not "), (" was ", " was not "), (" are ", " are not "), (" were ", " were not "),
           (" has ", " has not "), (" can ", " cannot ")],
    "fi": [(" on ", " ei ole "), (" oli ", " ei ollut "), (" ovat ", " eivät ole ")],
    "id": [(" adalah ", " bukan "), (" merupakan ", " bukan merupakan "), (" ada ", " tidak ada "),
           (" telah ", " belum ")],
    "sw": [(" ni ", " si "), (" alikuwa ", " hakuwa "), (" ana ", " hana "), (" kuna ", " hakuna ")],
    "ru": [(" является ", " не является "), (" был ", " не был "), (" была ", " не была "),
           (" было ", " не было "), (" были ", " не были ")],
    "ar": [(" كان ", " لم يكن "), (" كانت ", " لم تكن "), (" هو ", " ليس "), (" هي ", " ليست ")],
    "bn": [("ছিলেন", "ছিলেন না"), ("ছিল", "ছিল না"), ("হয়", "হয় না"), ("করেন", "করেন না")],
    "te": [("ఉన్నారు", "లేరు"), ("ఉన్నాయి", "లేవు"), ("ఉంది", "లేదు")],
    "ja": [("である", "ではない"), ("です", "ではありません"), ("した", "しなかった"), ("ある", "ない")],
    "ko": [("있다", "없다"), ("이다", "이 아니다"), ("했다", "하지 않았다"), ("였다", "가 아니었다")],
    "th": [("เป็น", "ไม่เป็น"), ("มี", "ไม่มี"), ("คือ", "ไม่ใช่")],
}


def _render(value: int, like: str) -> str:
  """``value`` in the digit script of ``like`` (whose first character is a decimal digit)."""
  zero = ord(like[0]) - unicodedata.digit(like[0])
  return "".join(chr(zero + int(d)) for d in str(value))


def perturb_number(text: str, rng: np.random.Generator, limit: int | None = None) -> str | None:
  limit = len(text) if limit is None else limit
  matches = [match for match in _NUMBER.finditer(text) if match.end() <= limit]
  if not matches:
    return None
  match = matches[int(rng.integers(len(matches)))]
  digits = match.group()
  value = int("".join(str(unicodedata.digit(c)) for c in digits))
  # Years move by a few years, small counts by a little, large amounts by 5-50%.
  if 1000 <= value <= 2100 and len(digits) == 4:
    delta = int(rng.integers(1, 12))
  elif value < 20:
    delta = int(rng.integers(1, 4))
  else:
    delta = max(1, int(value * rng.uniform(0.05, 0.5)))
  new_value = value + delta if (rng.random() < 0.5 or value - delta < 0) else value - delta
  return text[:match.start()] + _render(new_value, digits) + text[match.end():]


def substitute_entity(text: str, title: str, language_titles: list[str], rng: np.random.Generator,
                      limit: int | None = None) -> str | None:
  window = text if limit is None else text[:limit]
  present = [t for t in dict.fromkeys([title] + language_titles) if len(t) >= 3 and t in window]
  if not present:
    return None
  entity = present[0] if title in present else present[int(rng.integers(len(present)))]
  replacements = [t for t in language_titles if t != entity and entity not in t and t not in entity]
  if not replacements:
    return None
  return text.replace(entity, replacements[int(rng.integers(len(replacements)))])


def negate(text: str, language: str, limit: int | None = None) -> str | None:
  """Removes the first lexicon negation found, else negates the first affirmative found."""
  limit = len(text) if limit is None else limit
  for affirmative, negated in NEGATIONS.get(language, []):
    for old, new in ((negated, affirmative), (affirmative, negated)):
      at = text.find(old, 0, limit)
      if at >= 0:
        return text[:at] + new + text[at + len(old):]
  return None


def rewrite(technique: str, text: str, title: str, language: str, language_titles: list[str],
            rng: np.random.Generator, limit: int | None = None) -> str | None:
  """``technique``'s edit of ``text`` inside its first ``limit`` characters (None: anywhere)."""
  if technique == "numerical_perturbation":
    return perturb_number(text, rng, limit)
  if technique == "entity_substitution":
    return substitute_entity(text, title, language_titles, rng, limit)
  if technique == "logical_negation":
    return negate(text, language, limit)
  raise ValueError(f"unknown technique {technique!r}")
