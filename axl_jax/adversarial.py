"""Adversarial filtering: which generated negatives the current retriever finds hard enough to train on.

Pure numerics over scores, so tests can check them by hand. For each candidate the retriever gives
s(q, pos) and s(q, neg); its margin is s(q, pos) - s(q, neg) (small = hard, negative = the model
prefers the negative). Per language:

1. the false-negative guard drops candidates with s(q, neg) >= s(q, pos) - guard_margin: an edit the
   model already scores at or above the positive probably did not change relevance;
2. of the remaining (eligible) candidates, the ``keep_fraction`` with the smallest margins are kept;
   the threshold in force is the largest kept margin, recomputed every round as the model changes.

Ablations: ``selection="all"`` keeps every eligible candidate, ``"random"`` a random ``keep_fraction``.
"""
from __future__ import annotations

import math

import numpy as np

SELECTIONS = ("hardest", "random", "all")


def filter_decisions(positive_scores, negative_scores, languages, *, keep_fraction: float = 0.25,
                     selection: str = "hardest", guard: bool = True, guard_margin: float = 0.0,
                     seed: int = 0) -> list[dict]:
  """One decision per candidate: ``{"kept", "reason", "margin", "threshold"}``.

  ``reason`` is ``kept``, ``guard`` (false-negative guard), ``below_threshold`` (not among the
  hardest) or ``not_sampled`` (random selection). ``threshold`` is the language's margin cut-off
  (None when nothing of that language is eligible, or for ``all``/``random``).
  """
  if selection not in SELECTIONS:
    raise ValueError(f"filter selection must be one of {SELECTIONS}, got {selection!r}")
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"filter keep_fraction must be in (0, 1], got {keep_fraction}")
  positive_scores = np.asarray(positive_scores, np.float64)
  negative_scores = np.asarray(negative_scores, np.float64)
  margins = positive_scores - negative_scores
  decisions = [{"kept": False, "reason": "", "margin": float(m), "threshold": None} for m in margins]
  languages = np.asarray(languages)
  rng = np.random.default_rng(seed)
  for language in sorted(set(languages.tolist())):
    indices = np.flatnonzero(languages == language)
    eligible = []
    for index in indices:
      if guard and negative_scores[index] >= positive_scores[index] - guard_margin:
        decisions[index]["reason"] = "guard"
      else:
        eligible.append(index)
    eligible = np.asarray(eligible, dtype=np.int64)
    count = len(eligible) if selection == "all" else math.ceil(keep_fraction * len(eligible))
    if selection == "hardest":
      # Stable sort: equal margins keep candidate order, so the kept set is reproducible.
      kept = eligible[np.argsort(margins[eligible], kind="stable")[:count]]
      threshold = float(margins[kept].max()) if count else None
    elif selection == "random":
      kept = rng.permutation(eligible)[:count]
      threshold = None
    else:
      kept, threshold = eligible, None
    kept_set = set(kept.tolist())
    for index in eligible:
      decisions[index].update(threshold=threshold, kept=index in kept_set,
                              reason="kept" if index in kept_set else
                              ("below_threshold" if selection == "hardest" else "not_sampled"))
  return decisions


def margin_summary(margins) -> dict:
  """Mean and quantiles of score margins (empty-safe), for the round statistics."""
  margins = np.asarray(margins, np.float64)
  if not len(margins):
    return {"count": 0}
  quantiles = np.quantile(margins, [0.1, 0.25, 0.5, 0.75, 0.9])
  return {"count": int(len(margins)), "mean": float(margins.mean()),
          **{f"q{int(q * 100)}": float(v) for q, v in zip([0.1, 0.25, 0.5, 0.75, 0.9], quantiles)}}
