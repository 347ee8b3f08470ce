"""Paired significance tests: hand-worked exact cases, scipy's exact permutation test, a normal-theory interval."""
import numpy as np
import pytest
from scipy import stats

from axl_jax import metrics, significance


def test_three_queries_match_the_hand_worked_exact_p_value():
  # Differences 1, 2, 3: of the 8 sign assignments only +++ and --- reach |mean| >= 2, so the exact p is 2/8.
  result = significance.paired_test({"en": np.array([1.0, 2.0, 3.0])}, {"en": np.zeros(3)}, resamples=40000)
  assert result["en"]["diff"] == pytest.approx(2.0)
  assert result["en"]["p"] == pytest.approx(0.25, abs=0.01)
  # The bootstrap means of {1, 2, 3} lie in [1, 3], and the interval brackets the observed mean.
  assert 1.0 <= result["en"]["ci_low"] < 2.0 < result["en"]["ci_high"] <= 3.0


def test_p_values_match_scipy_exact_paired_permutation_test():
  rng = np.random.default_rng(4)
  for shift in (0.0, 0.15, 0.4):
    a = rng.uniform(size=12)
    b = np.clip(a - shift + rng.normal(scale=0.3, size=12), 0, 1)
    exact = stats.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                                   alternative="two-sided", n_resamples=np.inf).pvalue
    ours = significance.paired_test({"ko": a}, {"ko": b}, resamples=40000, seed=1)["ko"]["p"]
    assert ours == pytest.approx(exact, abs=0.01), (shift, ours, exact)


def test_identical_systems_have_p_one_and_a_zero_interval():
  values = np.random.default_rng(0).uniform(size=50)
  result = significance.paired_test({"sw": values, "th": values[:20]}, {"sw": values, "th": values[:20]})
  for column in ("sw", "th", "avg"):
    assert result[column]["diff"] == 0.0 and result[column]["p"] == 1.0
    assert result[column]["ci_low"] == result[column]["ci_high"] == 0.0


def test_bootstrap_interval_agrees_with_normal_theory_on_many_queries():
  rng = np.random.default_rng(2)
  baseline = rng.uniform(size=2000)
  system = np.clip(baseline + 0.03 + rng.normal(scale=0.2, size=2000), 0, 1)
  result = significance.paired_test({"fi": system}, {"fi": baseline}, resamples=20000)["fi"]
  d = system - baseline
  half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
  assert result["ci_low"] == pytest.approx(d.mean() - half, abs=0.1 * half)
  assert result["ci_high"] == pytest.approx(d.mean() + half, abs=0.1 * half)
  assert result["p"] < 0.001


def test_the_macro_average_weighs_languages_equally_and_pools_their_evidence():
  rng = np.random.default_rng(3)
  # Two languages of very different sizes, each with a small effect that alone is not significant.
  base = {"ar": rng.uniform(size=400), "te": rng.uniform(size=40)}
  system = {"ar": base["ar"] + 0.02 + rng.normal(scale=0.25, size=400),
            "te": base["te"] + 0.06 + rng.normal(scale=0.25, size=40)}
  result = significance.paired_test(system, base, resamples=20000, seed=5)
  per_language = [np.mean(system[l] - base[l]) for l in ("ar", "te")]
  assert result["avg"]["diff"] == pytest.approx(np.mean(per_language))  # not the pooled mean of 440 queries
  assert result["avg"]["queries"] == 440
  assert result["avg"]["ci_low"] < result["avg"]["diff"] < result["avg"]["ci_high"]
  # The macro interval is narrower than the smaller language's: averaging languages averages their noise.
  assert result["avg"]["ci_high"] - result["avg"]["ci_low"] < result["te"]["ci_high"] - result["te"]["ci_low"]
  # Seeded: the same inputs give the same numbers.
  assert significance.paired_test(system, base, resamples=20000, seed=5) == result


def test_mismatched_inputs_are_refused():
  with pytest.raises(ValueError, match="different languages"):
    significance.paired_test({"en": np.ones(3)}, {"fi": np.ones(3)})
  with pytest.raises(ValueError, match="en: need the same"):
    significance.paired_test({"en": np.ones(3)}, {"en": np.ones(4)})


def test_tables_mark_significant_cells_and_show_intervals():
  results = {"finetune": {"en": {"MRR@100": 0.5}}, "round_2": {"en": {"MRR@100": 0.6}}}
  tests = {"round_2": {"en": {"diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p": 0.01},
                       "avg": {"diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p": 0.01}}}
  table = metrics.format_table(results, ["en"], "MRR@100", marks={"round_2": {"en": "*", "avg": "*"}},
                               baseline="finetune")
  assert "| finetune (baseline) | 0.500 | 0.500 |" in table and "| round_2 | 0.600* | 0.600* |" in table
  differences = metrics.format_differences(tests, ["en"], "MRR@100", "finetune")
  assert "| round_2 | +0.100* [+0.050, +0.150] | +0.100* [+0.050, +0.150] | 0.01 |" in differences


def test_ablation_table_averages_seeds_and_tests_the_seed_averaged_model(tmp_path):
  from axl_jax import ablation_table, io
  rng = np.random.default_rng(7)
  queries = {"bn": [f"q{i}" for i in range(30)], "th": [f"q{i}" for i in range(50)]}
  base = {l: {q: {"MRR@100": float(rng.uniform())} for q in qs} for l, qs in queries.items()}
  runs, shifts = [], (0.10, 0.14, 0.12)
  for seed, shift in enumerate(shifts):
    system = {l: {q: {"MRR@100": min(1.0, v["MRR@100"] + shift)} for q, v in values.items()}
              for l, values in base.items()}
    workdir = tmp_path / f"seed{seed}"
    per_query = {"finetune": base, "round_2": system}  # evaluate holds the baseline and the last round
    io.write_json(str(workdir / "evaluate" / "per_query.json"), per_query)
    io.write_json(str(workdir / "evaluate" / "significance.json"),
                  {"baseline": "finetune", "tests": {"MRR@100": {"round_2": {"avg": {"p": 0.01 if seed else 0.2}}}}})
    for name, kept in (("round_1", 10 + seed), ("round_2", 20)):
      io.write_json(str(workdir / name / "round_stats.json"), {"kept": kept})
    runs.append(("full", str(workdir)))
  table = ablation_table.summarize(runs, resamples=2000)
  row = table.splitlines()[-1]
  macro = lambda per_language: np.mean([np.mean([v["MRR@100"] for v in per_language[l].values()]) for l in queries])
  finals = [macro({l: {q: {"MRR@100": min(1.0, v["MRR@100"] + s)} for q, v in vs.items()} for l, vs in base.items()})
            for s in shifts]
  assert row.startswith("| full (round_2) | 3 | ")
  assert f"{np.mean(finals):.3f} ± {np.std(finals, ddof=1):.3f}" in row and f"| {macro(base):.3f} |" in row
  assert f"+{np.mean(finals) - macro(base):.3f}*" in row and "| 2 of 3 |" in row and "| 11 / 20 |" in row
  # A seed whose baseline differs is not a seed of the same ablation.
  other = tmp_path / "seed0" / "evaluate" / "per_query.json"
  changed = io.read_json(str(other))
  changed["finetune"]["bn"]["q0"]["MRR@100"] += 0.5
  io.write_json(str(other), changed)
  with pytest.raises(ValueError, match="must share one supervised baseline"):
    ablation_table.summarize(runs, resamples=100)
