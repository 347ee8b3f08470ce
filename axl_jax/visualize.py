"""The ``visualize`` stage: cluster plots, margin histograms, metric bars and one report page.

- ``clusters.png``: t-SNE projections of query, positive, BM25-negative and adversarial-negative
  embeddings of a sample of training queries, under the model before the adversarial rounds and
  after them, coloured by language and by role;
- ``margins.png``: histograms of s(q,pos) - s(q,neg) of each round's candidates, before and after filtering;
- ``metrics.png``: per-language MRR@100 of every system in ``evaluate/results.json``;
- ``report.md``: the three pictures with the metric tables and the rounds' statistics.

``points.json`` records how many points of each role were drawn (the tests check it).
"""
from __future__ import annotations

import json
import os

import numpy as np

from axl_jax import checkpoints, data, stages

ROLES = ("query", "positive", "bm25_negative", "adversarial_negative")


def _sample(ctx: stages.Context, decisions: list[dict]) -> list[tuple[str, str, str]]:
  """``(language, role, text)`` of the plotted points: queries with a kept adversarial negative first."""
  config = ctx.config
  per_language = config.visualize.queries_per_language
  languages = data.parse_languages(config.finetune.languages, "finetune.languages") or [""]
  examples = {e.query_id: (language, e) for language in languages
              for e in data.read_train(ctx.spec(config.finetune.train_data, language, "train"))}
  adversarial = {}
  for decision in decisions:
    if decision["kept"] or decision["query_id"] not in adversarial:
      adversarial[decision["query_id"]] = decision["text"]
  chosen: dict[str, list[str]] = {}
  for query_id in list(adversarial) + list(examples):
    language, example = examples[query_id]
    if query_id not in chosen.setdefault(language, []) and len(chosen[language]) < per_language:
      chosen[language].append(query_id)
  points = []
  for language, query_ids in chosen.items():
    for query_id in query_ids:
      _, example = examples[query_id]
      points.append((language, "query", example.query))
      points.append((language, "positive", data.passage_text(example.positives[0], config.data.title_separator)))
      if example.negatives:
        points.append((language, "bm25_negative", data.passage_text(example.negatives[0], config.data.title_separator)))
      if query_id in adversarial:
        points.append((language, "adversarial_negative", adversarial[query_id]))
  return points


def _project(vectors: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
  from sklearn.manifold import TSNE
  perplexity = min(perplexity, max(2.0, (len(vectors) - 1) / 3))
  return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)


def _scatter(axis, xy, labels, title):
  import seaborn as sns
  palette = "tab10" if len(set(labels)) <= 10 else "husl"
  sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=labels, s=12, linewidth=0, ax=axis, palette=palette)
  axis.set_title(title)
  axis.set_xticks([])
  axis.set_yticks([])
  axis.legend(fontsize=6, markerscale=0.8, loc="best")


def visualize(ctx: stages.Context) -> stages.StageResult:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config, out = ctx.config, ctx.stage_dir("visualize")
  os.makedirs(out, exist_ok=True)
  rounds = [n for n in ctx.training_order if n.startswith("round_") and ctx.completed_manifest(n)]
  decisions_by_round = {}
  for name in rounds:
    with open(os.path.join(ctx.stage_dir(name), "decisions.jsonl"), encoding="utf-8") as file:
      decisions_by_round[name] = [json.loads(line) for line in file]
  before = ctx.last_trained_checkpoint(before=rounds[0]) if rounds else None
  after = ctx.last_trained_checkpoint()
  if not after:
    raise FileNotFoundError(f"visualize: no completed training stage in {ctx.workdir}")
  models = {"before the adversarial rounds": before, "after the adversarial rounds": after} if before else {
      "final model": after}

  points = _sample(ctx, decisions_by_round[rounds[-1]] if rounds else [])
  languages = [p[0] for p in points]
  roles = [p[1] for p in points]
  figure, axes = plt.subplots(len(models), 2, figsize=(12, 5.5 * len(models)), squeeze=False)
  for row, (title, checkpoint) in enumerate(models.items()):
    encode = stages.encoder_for(ctx, checkpoint)
    queries = [i for i, r in enumerate(roles) if r == "query"]
    passages = [i for i, r in enumerate(roles) if r != "query"]
    query_vectors = encode([points[i][2] for i in queries], "query", None)
    passage_vectors = encode([points[i][2] for i in passages], "passage", None)
    vectors = np.zeros((len(points), query_vectors.shape[1]), np.float32)
    vectors[queries], vectors[passages] = query_vectors, passage_vectors
    xy = _project(vectors, config.visualize.perplexity, config.seed)
    _scatter(axes[row, 0], xy, languages, f"{title}: by language")
    _scatter(axes[row, 1], xy, roles, f"{title}: by role")
  figure.tight_layout()
  figure.savefig(os.path.join(out, "clusters.png"), dpi=110)
  plt.close(figure)

  figure, axes = plt.subplots(1, max(1, len(rounds)), figsize=(6 * max(1, len(rounds)), 4), squeeze=False)
  for column, name in enumerate(rounds):
    margins = np.asarray([d["margin"] for d in decisions_by_round[name]])
    kept = np.asarray([d["margin"] for d in decisions_by_round[name] if d["kept"]])
    bins = np.linspace(margins.min(), margins.max(), 40) if len(margins) else 10
    axes[0, column].hist(margins, bins=bins, alpha=0.5, label=f"all candidates ({len(margins)})")
    axes[0, column].hist(kept, bins=bins, alpha=0.7, label=f"kept ({len(kept)})")
    axes[0, column].set_title(f"{name}: s(q,pos) - s(q,neg)")
    axes[0, column].legend()
  figure.tight_layout()
  figure.savefig(os.path.join(out, "margins.png"), dpi=110)
  plt.close(figure)

  results_path = os.path.join(ctx.stage_dir("evaluate"), "results.json")
  results = {}
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as file:
      results = json.load(file)
    languages_evaluated = ctx.languages
    figure, axis = plt.subplots(figsize=(max(8, len(languages_evaluated)), 4))
    width = 0.8 / max(1, len(results))
    for index, (system, per_language) in enumerate(results.items()):
      axis.bar(np.arange(len(languages_evaluated)) + index * width,
               [per_language[l]["MRR@100"] for l in languages_evaluated], width, label=system)
    axis.set_xticks(np.arange(len(languages_evaluated)) + 0.4 - width / 2, languages_evaluated)
    axis.set_ylabel("MRR@100")
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out, "metrics.png"), dpi=110)
    plt.close(figure)

  counts = {role: roles.count(role) for role in ROLES}
  checkpoints.write_json_atomic(os.path.join(out, "points.json"), {"total": len(points), "by_role": counts,
                                                                    "models": list(models)})
  lines = ["# Run report", "", f"Workdir: `{ctx.workdir}`", ""]
  tables_path = os.path.join(ctx.stage_dir("evaluate"), "results.md")
  if os.path.exists(tables_path):
    with open(tables_path, encoding="utf-8") as file:
      lines += [f"## Retrieval ({config.evaluate.split})", "", file.read(), "![per-language MRR@100](metrics.png)", ""]
  if rounds:
    lines += ["## Adversarial rounds", "", "| round | candidates | passed checks | kept | margin before (median) | "
              "margin after (median) | dev MRR@100 |", "|---|---|---|---|---|---|---|"]
    for name in rounds:
      with open(os.path.join(ctx.stage_dir(name), "round_stats.json"), encoding="utf-8") as file:
        stats = json.load(file)
      lines.append(f"| {name} | {stats['candidates']} | {stats['accepted_by_checks']} | {stats['kept']} | "
                   f"{stats.get('margin_before/q50', float('nan')):.3f} | "
                   f"{stats.get('margin_after/q50', float('nan')):.3f} | {stats['dev/avg/MRR@100']:.3f} |")
    lines += ["", "![score margins before and after filtering](margins.png)", ""]
  lines += ["## Embedding space", "", f"{len(points)} points: " + ", ".join(f"{c} {r}" for r, c in counts.items()),
            "", "![t-SNE of the embedding space](clusters.png)", ""]
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as file:
    file.write("\n".join(lines))
  return stages.StageResult({"points": len(points), **{f"points/{r}": c for r, c in counts.items()}})


stages.stage("visualize")(visualize)
