"""Sentence splitting in every script and ICT pair construction."""
import numpy as np
import pytest

from axl_jax import ict
from axl_jax.data import Passage

CASES = {
    "en": ("The cat sat. It was happy! Was it? Yes.", ["The cat sat.", "It was happy!", "Was it?", "Yes."]),
    "ja": ("東京は日本の首都である。人口は多い。大阪も大きい。", ["東京は日本の首都である。", "人口は多い。", "大阪も大きい。"]),
    "bn": ("ঢাকা বাংলাদেশের রাজধানী। এটি একটি বড় শহর।", ["ঢাকা বাংলাদেশের রাজধানী।", "এটি একটি বড় শহর।"]),
    "ar": ("ما هي عاصمة مصر؟ القاهرة هي العاصمة. وهي مدينة كبيرة.",
           ["ما هي عاصمة مصر؟", "القاهرة هي العاصمة.", "وهي مدينة كبيرة."]),
    "th": ("กรุงเทพมหานครเป็นเมืองหลวง ประเทศไทยมีประชากรมาก", ["กรุงเทพมหานครเป็นเมืองหลวง", "ประเทศไทยมีประชากรมาก"]),
    "ru": ("Москва — столица России. Это большой город.", ["Москва — столица России.", "Это большой город."]),
    "te": ("హైదరాబాద్ ఒక నగరం. ఇది పెద్దది.", ["హైదరాబాద్ ఒక నగరం.", "ఇది పెద్దది."]),
}


@pytest.mark.parametrize("language", sorted(CASES))
def test_split_sentences_per_script(language):
  text, expected = CASES[language]
  assert ict.split_sentences(text, language, min_chars=3) == expected


def test_short_pieces_merge_into_neighbours():
  assert ict.split_sentences("A. Long sentence here. B.", "en", min_chars=5) == ["A. Long sentence here. B."]


def test_single_sentence_passage_gives_no_pair():
  assert ict.make_pair(Passage("d", "t", "Only one sentence here"), "en", np.random.default_rng(0), 0.9) is None


def test_pair_removes_the_query_sentence_at_the_configured_rate():
  passage = Passage("d", "Title", "First sentence here. Second sentence here. Third sentence here.")
  removed = 0
  for seed in range(400):
    query, context = ict.make_pair(passage, "en", np.random.default_rng(seed), remove_prob=0.9)
    assert query in passage.text and context.title == "Title"
    removed += query not in context.text
  assert 0.85 < removed / 400 < 0.95
  for seed in range(20):  # remove_prob 0: the context is always the whole passage
    _, context = ict.make_pair(passage, "en", np.random.default_rng(seed), remove_prob=0.0)
    assert context.text == passage.text


def test_japanese_context_rejoins_without_spaces():
  passage = Passage("d", "", CASES["ja"][0])
  query, context = ict.make_pair(passage, "ja", np.random.default_rng(0), remove_prob=1.0)
  assert " " not in context.text and query not in context.text and len(context.text) + len(query) == len(passage.text)
