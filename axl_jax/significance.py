"""Paired significance of the difference between two retrievers on the same queries.

For each language the samples are per-query differences ``d_i = a_i - b_i`` of one measure (system minus
baseline). Two standard procedures of IR evaluation (Smucker, Allan and Carterette, CIKM 2007;
Sakai, 2014):

- a **paired randomization (permutation) test**: under the null hypothesis the two systems are
  exchangeable on each query, so each ``d_i`` flips sign with probability 1/2; the two-sided p-value is
  the share of sign-flipped resamples whose mean difference is at least as far from 0 as the observed
  one, counting the observed assignment itself (``(hits + 1) / (resamples + 1)``, never 0);
- a **paired bootstrap** 95% confidence interval of the mean difference: queries resampled with
  replacement, percentile interval.

The macro average over languages (the tables' ``avg`` column) is tested the same way with every
language's queries resampled (or sign-flipped) within that language, stratified, so each language keeps
its weight of ``1 / languages`` whatever its query count. Resampling is seeded: the same inputs give the
same p-values and intervals. The p-values are per comparison, not corrected for the many cells a table has.
"""
from __future__ import annotations

import zlib

import numpy as np

# Resamples per chunk: memory is chunk x queries of one language.
_CHUNK = 1000


def _resampled_means(differences: np.ndarray, resamples: int, rng: np.random.Generator, kind: str) -> np.ndarray:
  """``resamples`` means of ``differences`` under sign flips (``kind="flip"``) or the bootstrap."""
  n = len(differences)
  means = np.empty(resamples)
  for start in range(0, resamples, _CHUNK):
    count = min(_CHUNK, resamples - start)
    if kind == "flip":
      signs = rng.integers(0, 2, size=(count, n), dtype=np.int8) * 2 - 1
      means[start:start + count] = signs @ differences / n
    else:
      picks = rng.integers(0, n, size=(count, n))
      means[start:start + count] = differences[picks].mean(axis=1)
  return means


def paired_test(system: dict[str, np.ndarray], baseline: dict[str, np.ndarray], *, resamples: int = 10000,
                seed: int = 0, confidence: float = 0.95) -> dict[str, dict[str, float]]:
  """``{language: stats}`` and ``{"avg": stats}`` for the macro average, where stats are the observed mean
  difference ``diff`` (system - baseline), the bootstrap interval ``ci_low``/``ci_high``, the randomization
  test's two-sided ``p`` and the number of ``queries``.

  ``system`` and ``baseline`` map each language to per-query values in the same query order.
  """
  if set(system) != set(baseline):
    raise ValueError(f"paired test: the systems cover different languages ({sorted(system)} vs {sorted(baseline)})")
  if resamples < 1:
    raise ValueError(f"paired test: resamples must be positive, got {resamples}")
  languages = sorted(system)
  out: dict[str, dict[str, float]] = {}
  flips, boots, observed = [], [], []
  for language in languages:
    a, b = np.asarray(system[language], np.float64), np.asarray(baseline[language], np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
      raise ValueError(f"paired test, {language}: need the same non-empty list of queries for both systems, "
                       f"got {a.shape} and {b.shape}")
    differences = a - b
    # One stream per language (by name) and procedure: adding a language does not change another's numbers.
    stream = zlib.crc32(language.encode())
    flip = _resampled_means(differences, resamples, np.random.default_rng([seed, stream, 0]), "flip")
    boot = _resampled_means(differences, resamples, np.random.default_rng([seed, stream, 1]), "bootstrap")
    out[language] = _stats(differences.mean(), flip, boot, confidence) | {"queries": len(differences)}
    flips.append(flip)
    boots.append(boot)
    observed.append(differences.mean())
  out["avg"] = _stats(np.mean(observed), np.mean(flips, axis=0), np.mean(boots, axis=0), confidence) | {
      "queries": sum(out[language]["queries"] for language in languages)}
  return out


def _stats(observed: float, flipped: np.ndarray, booted: np.ndarray, confidence: float) -> dict[str, float]:
  # A small tolerance: resamples equal to the observed mean up to rounding count as "as extreme".
  extreme = np.sum(np.abs(flipped) >= abs(observed) - 1e-12)
  tail = (1 - confidence) / 2
  low, high = np.quantile(booted, [tail, 1 - tail])
  return {"diff": float(observed), "ci_low": float(low), "ci_high": float(high),
          "p": float((extreme + 1) / (len(flipped) + 1))}


def mark(p: float, alpha: float = 0.05) -> str:
  """The tables' significance mark: ``*`` when ``p < alpha``."""
  return "*" if p < alpha else ""
