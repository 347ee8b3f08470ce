"""The adversarial filter on hand-worked scores."""
import pytest

from axl_jax.adversarial import filter_decisions, margin_summary

# Eight English candidates, s(q,pos) = 10; margins 10 - s(q,neg).
POSITIVE = [10.0] * 8
NEGATIVE = [9.0, 4.0, 10.5, 7.0, 9.5, 2.0, 10.0, 8.0]   # margins 1, 6, -0.5, 3, 0.5, 8, 0, 2
LANGUAGES = ["en"] * 8


def _kept(decisions):
  return [i for i, d in enumerate(decisions) if d["kept"]]


def test_guard_then_hardest_quarter():
  decisions = filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, keep_fraction=0.25)
  # The guard drops s(neg) >= s(pos): candidates 2 (10.5) and 6 (10.0). Six remain eligible;
  # ceil(0.25 * 6) = 2 hardest: margins 0.5 (candidate 4) and 1 (candidate 0).
  assert [d["reason"] for d in decisions] == ["kept", "below_threshold", "guard", "below_threshold", "kept",
                                              "below_threshold", "guard", "below_threshold"]
  assert _kept(decisions) == [0, 4]
  assert decisions[0]["threshold"] == pytest.approx(1.0)


def test_guard_margin_widens_the_guard():
  decisions = filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, keep_fraction=0.25, guard_margin=0.75)
  # s(neg) >= 9.25 is guarded too: candidate 4 (9.5) joins 2 and 6; eligible 0,1,3,5,7 -> keep ceil(1.25)=2.
  assert [i for i, d in enumerate(decisions) if d["reason"] == "guard"] == [2, 4, 6]
  assert _kept(decisions) == [0, 7]


def test_without_guard_the_hardest_are_false_negatives():
  decisions = filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, keep_fraction=0.25, guard=False)
  assert _kept(decisions) == [2, 6]   # margins -0.5 and 0: exactly 25% of 8


def test_thresholds_are_per_language():
  languages = ["en"] * 4 + ["ja"] * 4
  positive = [1.0] * 4 + [100.0] * 4
  negative = [0.9, 0.5, 0.1, 0.0] + [99.0, 90.0, 50.0, 10.0]
  decisions = filter_decisions(positive, negative, languages, keep_fraction=0.5)
  assert _kept(decisions) == [0, 1, 4, 5]
  assert decisions[0]["threshold"] == pytest.approx(0.5) and decisions[4]["threshold"] == pytest.approx(10.0)


def test_ablations_all_and_random():
  everything = filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, selection="all", guard=False)
  assert _kept(everything) == list(range(8))
  random = filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, selection="random", guard=False, seed=1)
  assert len(_kept(random)) == 2 and random == filter_decisions(POSITIVE, NEGATIVE, LANGUAGES, selection="random",
                                                                guard=False, seed=1)


def test_margin_summary():
  summary = margin_summary([1.0, 2.0, 3.0, 4.0, 5.0])
  assert summary["mean"] == 3.0 and summary["q50"] == 3.0 and summary["count"] == 5
  assert margin_summary([]) == {"count": 0}
