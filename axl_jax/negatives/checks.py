"""Acceptance checks for a generated negative; each rejection has one reason, so they can be counted."""
from __future__ import annotations

import re
import unicodedata

# The script a language's running text is written in (by Unicode character name prefix).
LANGUAGE_SCRIPTS = {
    "ar": ("ARABIC",), "bn": ("BENGALI",), "en": ("LATIN",), "fi": ("LATIN",), "id": ("LATIN",),
    "ja": ("CJK", "HIRAGANA", "KATAKANA"), "ko": ("HANGUL",), "ru": ("CYRILLIC",), "sw": ("LATIN",),
    "te": ("TELUGU",), "th": ("THAI",),
}
MIN_LENGTH_RATIO, MAX_LENGTH_RATIO = 0.5, 2.0


def script_share(text: str, language: str) -> float:
  """Fraction of the letters of ``text`` that are in ``language``'s script."""
  scripts = LANGUAGE_SCRIPTS[language]
  letters = [c for c in text if c.isalpha()]
  if not letters:
    return 0.0
  return sum(unicodedata.name(c, "").startswith(scripts) for c in letters) / len(letters)


def _skeleton(text: str) -> str:
  """Letters and digits only, case-folded: two texts with one skeleton differ in nothing that matters."""
  return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text).casefold())


def reject_reason(candidate: str | None, positive: str, language: str, answers: tuple[str, ...] = ()) -> str | None:
  """Why ``candidate`` is not a usable negative for ``positive``, or None when it is."""
  if candidate is None:
    return "unparsable"
  if not candidate.strip():
    return "empty"
  if _skeleton(candidate) == _skeleton(positive):
    return "identical"
  # Relative to the positive: Latin names inside a Thai passage are fine, a Latin rewrite of it is not.
  if script_share(candidate, language) < 0.5 * script_share(positive, language):
    return "wrong_script"
  ratio = len(candidate) / max(1, len(positive))
  if not MIN_LENGTH_RATIO <= ratio <= MAX_LENGTH_RATIO:
    return "length"
  folded = unicodedata.normalize("NFKC", candidate).casefold()
  if any(answer.strip() and unicodedata.normalize("NFKC", answer).casefold() in folded for answer in answers):
    return "contains_answer"
  return None
