"""The part of a passage the retriever reads: its first ``passage_max_length`` tokens.

An edit beyond them changes nothing the encoder sees: the negative scores exactly like its positive,
the false-negative guard drops it, and generating it was wasted. The generator therefore edits inside
this window (the ``rules`` backend picks its edit there; the ``qwen`` backend is shown only the window
and the rest of the passage is appended unchanged), and rejects a candidate whose tokens in the window
equal the positive's (``outside_window``).
"""
from __future__ import annotations

from axl_jax import data, tokenization


class EncoderWindow:
  """``tokenizer`` is the retriever's; passages are ``title + title_separator + text`` as it encodes them."""

  def __init__(self, tokenizer, max_length: int, title_separator: str):
    self.tokenizer, self.max_length, self.separator = tokenizer, max_length, title_separator

  def _full(self, title: str, text: str) -> str:
    return data.passage_text(data.Passage("", title, text), self.separator)

  def visible_chars(self, title: str, text: str) -> int:
    """How many leading characters of ``text`` fall in the encoder's tokens (``len(text)`` when all do)."""
    full = self._full(title, text)
    encoded = self.tokenizer(full, truncation=True, max_length=self.max_length, add_special_tokens=True,
                             return_offsets_mapping=True)
    ends = [end for start, end in encoded["offset_mapping"] if end > start]  # special tokens are (0, 0)
    end = max(ends, default=0)
    offset = len(full) - len(text)  # where the text starts after the title and separator
    if end >= len(full):
      return len(text)
    return max(0, end - offset)

  def same_input(self, title: str, positive: str, candidate: str) -> bool:
    """Whether the encoder reads the same tokens for ``candidate`` as for ``positive`` (so scores them equal)."""
    ids = tokenization.tokenize(self.tokenizer, [self._full(title, positive), self._full(title, candidate)],
                                self.max_length)
    return ids[0].shape == ids[1].shape and bool((ids[0] == ids[1]).all())


def word_cut(text: str, visible: int) -> int:
  """Where the generator's prompt cuts ``text``: at ``visible``, moved back to the start of the word it ends
  inside (the window's last token often ends mid-word: "extra|ordinary"), so the model never rewrites a word
  fragment that the unchanged tail then continues. Scripts without spaces keep the token boundary."""
  if visible >= len(text) or visible == 0 or text[visible].isspace() or text[visible - 1].isspace():
    return min(visible, len(text))
  space = max(text.rfind(c, 0, visible) for c in " \n\t\u3000")
  return space + 1 if space >= 0 else visible
