"""One tiny run through every stage, its outputs, resuming a finished run, and restore-and-evaluate."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO


def _main(workdir, *overrides, check=True):
  command = [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
             *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  if check and result.returncode != 0:
    raise AssertionError(result.stderr[-4000:])
  return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  result = _main(workdir)
  return workdir, result


def test_every_stage_completes_with_manifest(finished_run):
  workdir, result = finished_run
  for stage in ("ict", "pretrain", "finetune", "round_1", "evaluate", "visualize", "export"):
    assert os.path.exists(os.path.join(workdir, stage, "COMPLETE")), stage
    with open(os.path.join(workdir, stage, "manifest.json")) as file:
      manifest = json.load(file)
    assert manifest["stage"] == stage and manifest["config"]["model"]["hidden_size"] == 32
  with open(os.path.join(workdir, "pretrain", "manifest.json")) as file:
    pretrain = json.load(file)
  # Each training stage starts from the one before it.
  assert pretrain["metrics"]["initialised_from"].startswith(os.path.join(workdir, "ict"))
  assert os.listdir(os.path.join(workdir, "finetune", "checkpoints"))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "finetune")))
  assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))


def test_evaluation_table_and_run_files(finished_run):
  workdir, result = finished_run
  assert "| MRR@100 | bn | th | avg |" in result.stdout
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    results = json.load(file)
  assert set(results) == {"BM25", "ict", "finetune", "round_1"}
  for system in results.values():
    for language in ("bn", "th"):
      assert 0.0 <= system[language]["MRR@100"] <= 1.0
      assert system[language]["queries"] == {"bn": 17, "th": 109}[language]
  lines = open(os.path.join(workdir, "evaluate", "runs", "round_1.th.dev.trec")).read().splitlines()
  assert len(lines) == 109 * 100 and lines[0].split()[3] == "1"


def test_exported_shards_load_with_numpy(finished_run):
  workdir, _ = finished_run
  directory = os.path.join(workdir, "export", "th")
  with open(os.path.join(directory, "corpus.manifest.json")) as file:
    manifest = json.load(file)
  assert manifest["count"] == 439 and len(manifest["shards"]) == 9  # 50 per shard
  assert manifest["checkpoint"].startswith(os.path.join(workdir, "round_1"))
  vectors = np.concatenate([np.load(os.path.join(directory, s["embeddings"])) for s in manifest["shards"]])
  assert vectors.shape == (439, 32)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)  # normalize=True


def test_rerun_skips_completed_stages(finished_run):
  workdir, _ = finished_run
  result = _main(workdir)
  assert result.stderr.count("is complete") == 7


def test_restore_and_evaluate_any_checkpoint(finished_run, tmp_path):
  workdir, _ = finished_run
  checkpoint = os.path.join(workdir, "ict", "checkpoints")
  _main(str(tmp_path), "--config.stages=evaluate", f"--config.evaluate.checkpoint={checkpoint}",
        "--config.evaluate.also_checkpoints=", "--config.evaluate.bm25=False",
        f"--config.tokenizer.name_or_path={os.path.join(workdir, 'tokenizer')}")
  with open(tmp_path / "evaluate" / "results.json") as file:
    fresh = json.load(file)
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    original = json.load(file)
  # The same ICT checkpoint evaluated from another workdir gives the same numbers.
  assert fresh["model"]["th"]["MRR@100"] == pytest.approx(original["ict"]["th"]["MRR@100"], abs=1e-6)


def test_adversarial_round_audit_trail(finished_run):
  workdir, _ = finished_run
  with open(os.path.join(workdir, "round_1", "round_stats.json")) as file:
    stats = json.load(file)
  decisions = [json.loads(line) for line in open(os.path.join(workdir, "round_1", "decisions.jsonl"))]
  assert stats["candidates"] == 3 * (57 + 366)  # three techniques for every bn and th training query
  assert stats["accepted_by_checks"] == len(decisions) and stats["kept"] == sum(d["kept"] for d in decisions)
  for decision in decisions:  # every decision is explained by its scores and the threshold in force
    assert decision["margin"] == pytest.approx(decision["score_positive"] - decision["score_negative"], abs=1e-6)
    if decision["reason"] == "guard":
      assert decision["score_negative"] >= decision["score_positive"]
    elif decision["reason"] == "kept":
      assert decision["margin"] <= decision["threshold"] + 1e-9
    else:
      assert decision["reason"] == "below_threshold" and decision["margin"] >= decision["threshold"] - 1e-9
  with open(os.path.join(workdir, "round_1", "manifest.json")) as file:
    assert json.load(file)["metrics"]["dev/avg/MRR@100"] > 0


def test_visualize_writes_images_with_the_expected_points(finished_run):
  workdir, _ = finished_run
  directory = os.path.join(workdir, "visualize")
  for name in ("clusters.png", "margins.png", "metrics.png"):
    with open(os.path.join(directory, name), "rb") as file:
      assert file.read(8) == b"\x89PNG\r\n\x1a\n", name
  with open(os.path.join(directory, "points.json")) as file:
    points = json.load(file)
  # 5 queries per language (tiny config), each with its positive, a BM25 and an adversarial negative.
  assert points["by_role"] == {"query": 10, "positive": 10, "bm25_negative": 10, "adversarial_negative": 10}
  report = open(os.path.join(directory, "report.md")).read()
  assert "![t-SNE of the embedding space](clusters.png)" in report and "| round_1 |" in report
