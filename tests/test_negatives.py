"""Prompts, the answer parser, the acceptance checks and the rules backend, on hand-made cases."""
import numpy as np
import pytest

from axl_jax.negatives import checks, prompts, rules


def test_parser_recovers_the_rewrite():
  assert prompts.parse_rewrite('{"rewrite": "Paris is in Italy."}') == "Paris is in Italy."
  assert prompts.parse_rewrite('Sure!\n```json\n{"rewrite": "東京は大阪にある。"}\n```') == "東京は大阪にある。"
  assert prompts.parse_rewrite('Here: {"rewrite": "a \\"quoted\\" word"} hope it helps') == 'a "quoted" word'
  assert prompts.parse_rewrite('{"rewrite": 42}') is None
  assert prompts.parse_rewrite('"rewrite": "no braces at all"') == "no braces at all"
  assert prompts.parse_rewrite("I cannot do that.") is None


def test_prompt_names_language_technique_and_format():
  messages = prompts.messages("numerical_perturbation", "bn", "কবে?", "১৯৭১ সালে")
  assert messages[0]["role"] == "system" and "Bengali" in messages[1]["content"]
  assert "১৯৭১ সালে" in messages[1]["content"] and '{"rewrite"' in messages[1]["content"]
  with pytest.raises(ValueError, match="unknown technique"):
    prompts.messages("paraphrase", "en", "q", "p")


@pytest.mark.parametrize("candidate, reason", [
    (None, "unparsable"),
    ("   ", "empty"),
    ("The Eiffel tower is in paris!", "identical"),
    ("Эйфелева башня находится в Риме.", "wrong_script"),
    ("Rome.", "length"),
    ("The Eiffel Tower is in Paris, France, not Rome.", "contains_answer"),
    ("The Eiffel Tower is in Rome.", None),
])
def test_reject_reasons(candidate, reason):
  positive = "The Eiffel Tower is in Paris."
  assert checks.reject_reason(candidate, positive, "en", answers=("France",)) == reason


def test_latin_names_inside_thai_are_fine():
  positive = "พระราชวัง Versailles ตั้งอยู่ในประเทศฝรั่งเศส"
  assert checks.reject_reason("พระราชวัง Versailles ตั้งอยู่ในประเทศอิตาลี", positive, "th") is None


@pytest.mark.parametrize("text", ["Founded in 1971 with 250 staff.", "١٩٧١ في عام", "১৯৭১ সালে", "౧౯౭౧ లో",
                                  "ปี ๒๕๑๔"])
def test_numbers_change_but_keep_their_digit_script(text):
  changed = rules.perturb_number(text, np.random.default_rng(0))
  assert changed != text and len(changed) >= len(text) - 1
  original_scripts = {checks.unicodedata.name(c).split()[0] for c in text if c.isdigit()}
  assert {checks.unicodedata.name(c).split()[0] for c in changed if c.isdigit()} == original_scripts
  assert rules.perturb_number("no digits here", np.random.default_rng(0)) is None


def test_entity_substitution_and_negation():
  text = "Helsinki is the capital of Finland. Helsinki lies by the sea."
  changed = rules.substitute_entity(text, "Helsinki", ["Helsinki", "Tampere", "Oulu"], np.random.default_rng(0))
  assert "Helsinki" not in changed and (changed.count("Tampere") == 2 or changed.count("Oulu") == 2)
  assert rules.substitute_entity(text, "Paris", ["Paris", "Rome"], np.random.default_rng(0)) is None
  assert rules.negate(text, "en") == "Helsinki is not the capital of Finland. Helsinki lies by the sea."
  assert rules.negate("Tämä ei ole totta.", "fi") == "Tämä on totta."
  assert rules.negate("東京は首都である。", "ja") == "東京は首都ではない。"
  assert rules.negate("東京は首都ではない。", "ja") == "東京は首都である。"


def test_rules_choose_their_edit_inside_the_limit():
  text = "Helsinki has 650000 people. Tampere is smaller, with 240000 people."
  limit = text.index("Tampere")
  for seed in range(10):  # of the two numbers, only the first lies inside the limit
    changed = rules.perturb_number(text, np.random.default_rng(seed), limit)
    assert changed[limit - 2:] == text[limit - 2:] and changed != text
  assert rules.perturb_number(text, np.random.default_rng(0), limit=5) is None
  # " is " occurs only after the limit; " has " inside it.
  assert rules.negate(text, "en", limit) == text.replace(" has ", " has not ", 1)
  assert rules.negate("Tampere is big. It has a lake.", "en", limit=8) is None
  # An entity seen inside the limit is replaced everywhere; one seen only after it is not a candidate.
  titles = ["Helsinki", "Tampere", "Oulu"]
  changed = rules.substitute_entity(text, "Tampere", titles, np.random.default_rng(0), limit)
  assert changed.startswith(("Tampere", "Oulu")) and "Helsinki" not in changed
  assert rules.substitute_entity(text, "Tampere", ["Tampere", "Oulu"], np.random.default_rng(0), limit) is None
