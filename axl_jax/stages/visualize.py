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

import os

import numpy as np

from axl_jax import data, distributed, embeddings, io, prepared
from axl_jax.stages import StageResult, evaluate, round as rounds, training

EXPENSIVE = False
ROLES = ("query", "positive", "bm25_negative", "adversarial_negative")


def _rounds(config, available) -> list[str]:
  return [name for name in training.training_order(config) if name.startswith("round_") and available(name)]


def inputs(config, name, available):
  """The rounds, the model before them, the final model and the evaluation table, where they exist."""
  round_names = _rounds(config, available)
  # The model before the rounds is what round_1 started from: an init_checkpoint (a path, no stage) or a stage.
  starts_elsewhere = "round_1" in round_names and config.adversarial.train.init_checkpoint
  before = training.previous_stage(config, round_names[0], available) if round_names and not starts_elsewhere else None
  after = training.previous_stage(config, None, available)
  return list(dict.fromkeys(round_names + [n for n in (before, after) if n]
                            + (["evaluate"] if available("evaluate") else [])))


def fingerprint_fields(config, name):
  return {"visualize": config.visualize.to_dict(), **training.rows_fields(config, "finetune", config.finetune)}


def check_config(config, name):
  return training.rows_specs(config, config.finetune)


def _sample(config, rows, decisions: list[dict]) -> list[tuple[str, str, str]]:
  """``(language, role, text)`` of the plotted points: queries with a kept adversarial negative first.

  ``rows`` (prepared training rows) are scanned a chunk at a time; only the chosen queries' rows are kept.
  """
  per_language = config.visualize.queries_per_language
  adversarial = {}
  # The generated negatives (mined ones are corpus passages, named by id in the decisions).
  for decision in (d for d in decisions if d.get("technique") != "mined"):
    key = (decision["language"], decision["query_id"])
    if decision["kept"] or key not in adversarial:
      adversarial[key] = decision["text"]
  chosen: dict[str, list[tuple[str, str]]] = {}
  for key in adversarial:
    if len(chosen.setdefault(key[0], [])) < per_language:
      chosen[key[0]].append(key)
  wanted = {key for keys in chosen.values() for key in keys}
  examples = {}
  for chunk in prepared.example_chunks(rows):
    for example in chunk:
      language = example.language
      if example.key not in wanted and len(chosen.setdefault(language, [])) < per_language:
        chosen[language].append(example.key)
        wanted.add(example.key)
      if example.key in wanted:
        examples[example.key] = example
  points = []
  for language, keys in chosen.items():
    for key in keys:
      example = examples[key]
      points.append((language, "query", example.query))
      points.append((language, "positive", data.passage_text(example.positives[0], config.data.title_separator)))
      if example.negatives:
        points.append((language, "bm25_negative", data.passage_text(example.negatives[0], config.data.title_separator)))
      if key in adversarial:
        points.append((language, "adversarial_negative", adversarial[key]))
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


def run(ctx) -> StageResult:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  config, out, workdir = ctx.config, ctx.stage_dir, ctx.workdir
  os.makedirs(out, exist_ok=True)
  rounds_done = [n for n in ctx.inputs if n.startswith("round_")]
  decisions_by_round = {name: rounds.read_decisions(workdir, name) for name in rounds_done}
  trained = [n for n in ctx.inputs if n != "evaluate" and not n.startswith("round_")] + rounds_done[-1:]
  if not trained:
    raise FileNotFoundError(f"visualize: no completed training stage in {workdir.root}")
  if rounds_done and rounds_done[0] == "round_1" and config.adversarial.train.init_checkpoint:
    before = config.adversarial.train.init_checkpoint
  else:
    before = workdir.checkpoints(trained[0]) if rounds_done and len(trained) > 1 else None
  after = workdir.checkpoints(trained[-1])
  models = {"before the adversarial rounds": before, "after the adversarial rounds": after} if before else {
      "final model": after}

  rows = prepared.training_rows(config, config.finetune, prepared.store(config, workdir.root))
  points = _sample(config, rows, decisions_by_round[rounds_done[-1]] if rounds_done else [])
  languages = [p[0] for p in points]
  roles = [p[1] for p in points]
  figure, axes = plt.subplots(len(models), 2, figsize=(12, 5.5 * len(models)), squeeze=False)
  for row, (title, checkpoint) in enumerate(models.items()):
    encoder = embeddings.Encoder(checkpoint, config, ctx.tokenizer)
    queries = [i for i, r in enumerate(roles) if r == "query"]
    passages = [i for i, r in enumerate(roles) if r != "query"]
    query_vectors = encoder.encode([points[i][2] for i in queries], "query")
    passage_vectors = encoder.encode([points[i][2] for i in passages], "passage")
    vectors = np.zeros((len(points), query_vectors.shape[1]), np.float32)
    vectors[queries], vectors[passages] = query_vectors, passage_vectors
    xy = _project(vectors, config.visualize.perplexity, config.seed)
    _scatter(axes[row, 0], xy, languages, f"{title}: by language")
    _scatter(axes[row, 1], xy, roles, f"{title}: by role")
  counts = {role: roles.count(role) for role in ROLES}
  metrics = {"points": len(points), **{f"points/{r}": c for r, c in counts.items()}}
  if distributed.process_index() > 0:  # Every process encodes (as restoring a checkpoint wants); process 0 draws.
    plt.close(figure)
    return StageResult(metrics)
  figure.tight_layout()
  figure.savefig(os.path.join(out, "clusters.png"), dpi=110)
  plt.close(figure)

  figure, axes = plt.subplots(1, max(1, len(rounds_done)), figsize=(6 * max(1, len(rounds_done)), 4), squeeze=False)
  for column, name in enumerate(rounds_done):
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

  results = evaluate.read_results(workdir) if "evaluate" in ctx.inputs else None
  if results:
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

  io.write_json(os.path.join(out, "points.json"), {"total": len(points), "by_role": counts, "models": list(models)})
  lines = ["# Run report", "", f"Workdir: `{workdir.root}`", ""]
  if results:
    lines += [f"## Retrieval ({config.evaluate.split})", "", evaluate.tables(results, ctx.languages), "",
              "![per-language MRR@100](metrics.png)", ""]
  if rounds_done:
    lines += ["## Adversarial rounds", "", "| round | candidates | passed checks | kept | margin before (median) | "
              "margin after (median) | dev MRR@100 |", "|---|---|---|---|---|---|---|"]
    for name in rounds_done:
      stats = rounds.read_statistics(workdir, name)
      lines.append(f"| {name} | {stats['candidates']} | {stats['accepted_by_checks']} | {stats['kept']} | "
                   f"{stats.get('margin_before/q50', float('nan')):.3f} | "
                   f"{stats.get('margin_after/q50', float('nan')):.3f} | {stats['dev/avg/MRR@100']:.3f} |")
    lines += ["", "![score margins before and after filtering](margins.png)", ""]
  lines += ["## Embedding space", "", f"{len(points)} points: " + ", ".join(f"{c} {r}" for r, c in counts.items()),
            "", "![t-SNE of the embedding space](clusters.png)", ""]
  io.write_text(os.path.join(out, "report.md"), "\n".join(lines))
  return StageResult(metrics)

