"""The ablation table: each variant's final round against the supervised baseline, over several seeds.

    python -m axl_jax.ablation_table full=runs/ablation-full-seed0 full=runs/ablation-full-seed1 mined=...

Each workdir is one seed of one variant (``launch/ablations.sh``); its ``evaluate`` stage holds per-query
values of the baseline (``evaluate.baseline``) and of the last round. Per variant: the macro-average measure
over seeds (mean and standard deviation), how many seeds' own paired tests found a significant difference,
and one paired test of the seed-averaged values (each query's value averaged over the seeds) against the
baseline. That test resamples queries only: it says whether the seeds' average differs from the baseline
on these queries, not how much another set of training seeds would vary (the ± column shows that). The
seeds of a variant must share the baseline's per-query values exactly (one copied supervised stage,
evaluated deterministically, as on CPU).
"""
from __future__ import annotations

import glob
import os
import sys

import numpy as np

from axl_jax import io, significance


def _last_round(per_query: dict, baseline: str) -> str:
  rounds = sorted((s for s in per_query if s.startswith("round_")), key=lambda s: int(s.split("_")[1]))
  if not rounds:
    raise ValueError(f"no round among the evaluated systems {sorted(per_query)}")
  return rounds[-1]


def summarize(runs: list[tuple[str, str]], measure: str = "MRR@100", resamples: int = 10000) -> str:
  """A Markdown table of ``(variant, workdir)`` runs, in the order variants first appear."""
  by_variant: dict[str, list[dict]] = {}
  for variant, workdir in runs:
    evaluate_dir = os.path.join(workdir, "evaluate")
    per_query = io.read_json(os.path.join(evaluate_dir, "per_query.json"))
    tests = io.read_json(os.path.join(evaluate_dir, "significance.json"))
    baseline = tests["baseline"]
    system = _last_round(per_query, baseline)
    rounds = sorted(glob.glob(os.path.join(workdir, "round_*", "round_stats.json")),
                    key=lambda path: int(os.path.basename(os.path.dirname(path)).split("_")[1]))
    kept = [io.read_json(path)["kept"] for path in rounds]
    by_variant.setdefault(variant, []).append({"workdir": workdir, "baseline": baseline, "system": system,
                                               "per_query": per_query, "kept": kept,
                                               "p": tests["tests"][measure][system]["avg"]["p"]})
  lines = [f"| variant | seeds | {measure} avg (mean ± sd) | baseline | difference, seed-averaged [95% CI] | p | "
           "seeds with p < 0.05 | kept per round (mean) |", "|---|---|---|---|---|---|---|---|"]
  for variant, seeds in by_variant.items():
    baseline_name = seeds[0]["baseline"]
    base = seeds[0]["per_query"][baseline_name]
    languages = sorted(base)
    for seed in seeds[1:]:  # every seed starts from the same baseline, so its values must agree
      if seed["per_query"][baseline_name] != base:
        raise ValueError(f"{seed['workdir']}: its baseline {baseline_name} differs from {seeds[0]['workdir']}'s; "
                         "the seeds of a variant must share one supervised baseline")
    values = lambda per_language: {l: np.array([per_language[l][q][measure] for q in base[l]]) for l in languages}
    system_values = [values(seed["per_query"][seed["system"]]) for seed in seeds]
    averaged = {l: np.mean([v[l] for v in system_values], axis=0) for l in languages}
    test = significance.paired_test(averaged, values(base), resamples=resamples)["avg"]
    macro = [np.mean([v[l].mean() for l in languages]) for v in system_values]
    base_macro = np.mean([values(base)[l].mean() for l in languages])
    spread = np.std(macro, ddof=1) if len(macro) > 1 else 0.0
    kept = np.mean([seed["kept"] for seed in seeds], axis=0)
    lines.append(f"| {variant} ({seeds[0]['system']}) | {len(seeds)} | {np.mean(macro):.3f} ± {spread:.3f} | "
                 f"{base_macro:.3f} | {test['diff']:+.3f}{significance.mark(test['p'])} "
                 f"[{test['ci_low']:+.3f}, {test['ci_high']:+.3f}] | {test['p']:.3g} | "
                 f"{sum(seed['p'] < 0.05 for seed in seeds)} of {len(seeds)} | "
                 f"{' / '.join(f'{k:.0f}' for k in kept)} |")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  runs = []
  for argument in argv:
    variant, equals, workdir = argument.partition("=")
    if not equals:
      raise SystemExit(f"expected VARIANT=WORKDIR, got {argument!r}")
    runs.append((variant, workdir))
  print(summarize(runs))


if __name__ == "__main__":
  main(sys.argv[1:])
