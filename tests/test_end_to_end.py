"""One tiny run through every stage, its outputs, resuming a finished run, and restore-and-evaluate."""
import collections
import glob
import json
import math
import os
import shutil
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
  # Every other row against the supervised baseline: per-query samples that average to the table's values,
  # and a paired test per language and for the macro average, shown in results.md.
  with open(os.path.join(workdir, "evaluate", "per_query.json")) as file:
    per_query = json.load(file)
  with open(os.path.join(workdir, "evaluate", "significance.json")) as file:
    significance = json.load(file)
  assert significance["baseline"] == "finetune"
  for system in ("BM25", "ict", "round_1"):
    for language in ("bn", "th"):
      values = [v["MRR@100"] for v in per_query[system][language].values()]
      assert np.mean(values) == pytest.approx(results[system][language]["MRR@100"])
      diff = results[system][language]["MRR@100"] - results["finetune"][language]["MRR@100"]
      test = significance["tests"]["MRR@100"][system][language]
      assert test["diff"] == pytest.approx(diff) and 0 < test["p"] <= 1
      assert test["ci_low"] <= test["diff"] <= test["ci_high"]
    assert significance["tests"]["MRR@100"][system]["avg"]["queries"] == 17 + 109
  assert "finetune" not in significance["tests"]["MRR@100"]
  table = open(os.path.join(workdir, "evaluate", "results.md")).read()
  assert "| finetune (baseline) |" in table and "| MRR@100: system - finetune |" in table


def test_results_equal_trec_eval_on_the_written_run_files(finished_run):
  from axl_jax import data, metrics
  workdir, _ = finished_run
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    results = json.load(file)
  for system, per_language in results.items():
    for language, values in per_language.items():
      qrels = data.read_qrels(os.path.join(REPO, "data", "tydi-mini", "qrels", f"dev.{language}.tsv"))
      from_file = metrics.evaluate_run_file(qrels, os.path.join(workdir, "evaluate", "runs",
                                                                f"{system}.{language}.dev.trec"))
      for measure in metrics.MEASURES:
        assert abs(from_file[measure] - values[measure]) <= 1e-6, (system, language, measure)


def test_exported_shards_load_with_numpy(finished_run):
  workdir, _ = finished_run
  directory = os.path.join(workdir, "export", "th")
  with open(os.path.join(directory, "corpus.manifest.json")) as file:
    manifest = json.load(file)
  assert manifest["count"] == 439 and len(manifest["shards"]) == 9  # 50 per shard
  assert manifest["checkpoint"].startswith(os.path.join(workdir, "round_1"))
  vectors = np.concatenate([np.load(os.path.join(directory, s["embeddings"])) for s in manifest["shards"]])
  assert vectors.shape == (439, 32) and vectors.dtype == np.float16  # half the bytes of float32
  # normalize=True, to float16's precision (a relative step of 2**-11 per element).
  np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, rtol=2e-3)


def test_evaluate_with_an_index_and_bm25_run_files(finished_run, tmp_path):
  """evaluate.index=hnsw reports the index's recall (shards this small are searched exactly: runs unchanged);
  evaluate.bm25_run reads BM25 from TREC files (here the first run's own) with the same metrics."""
  workdir, _ = finished_run
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  runs = os.path.join(workdir, "evaluate", "runs")
  _main(copy, "--config.stages=evaluate", "--config.evaluate.index=hnsw",
        f"--config.evaluate.bm25_run={runs}/BM25.{{lang}}.{{split}}.trec", "--config.evaluate.bm25_max_passages=0")
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    before = json.load(file)
  with open(os.path.join(copy, "evaluate", "results.json")) as file:
    after = json.load(file)
  for language in ("bn", "th"):
    assert after["BM25"][language] == before["BM25"][language]
    for system in ("ict", "finetune", "round_1"):
      assert after[system][language]["index Recall@100 vs exact"] == 1.0
      with open(os.path.join(runs, f"{system}.{language}.dev.trec")) as flat, \
           open(os.path.join(copy, "evaluate", "runs", f"{system}.{language}.dev.trec")) as indexed:
        assert flat.read() == indexed.read()


def test_rerun_skips_completed_stages(finished_run):
  workdir, _ = finished_run
  result = _main(workdir)
  assert result.stderr.count("is complete") == 7 and result.stderr.count("up to date; skipping it") == 7


def test_changed_training_config_stops_before_touching_anything(finished_run):
  workdir, _ = finished_run
  marker = os.path.join(workdir, "finetune", "COMPLETE")
  before = os.stat(marker).st_mtime_ns
  result = _main(workdir, "--config.finetune.learning_rate=3e-4", check=False)
  assert result.returncode == 2
  assert "finetune (complete): finetune.learning_rate: 0.0002 -> 0.0003" in result.stderr
  assert "--config.recompute=finetune" in result.stderr and "Traceback" not in result.stderr
  assert os.stat(marker).st_mtime_ns == before and " starts" not in result.stderr and "resumes" not in result.stderr


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
  eligible = collections.Counter(d["language"] for d in decisions if d["reason"] != "guard")
  kept = collections.Counter(d["language"] for d in decisions if d["kept"])
  assert set(eligible) == {"bn", "th"}
  for language, count in eligible.items():  # exactly the hardest quarter of each language's eligible ones
    assert kept[language] == math.ceil(0.25 * count), language
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


def test_recompute_retrains_the_changed_stage_and_what_follows(finished_run, tmp_path):
  original, _ = finished_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(original, workdir)
  result = _main(workdir, "--config.stages=finetune,round_1,evaluate", "--config.finetune.learning_rate=3e-4",
                 "--config.recompute=finetune")
  assert "Stage finetune is recomputed: finetune.learning_rate: 0.0002 -> 0.0003" in result.stderr
  assert "Stage round_1 is recomputed: its input stage finetune is recomputed" in result.stderr
  with open(os.path.join(workdir, "finetune", "manifest.json")) as file:
    assert file.read().count('"learning_rate": 0.0003') >= 1
  with open(os.path.join(original, "evaluate", "results.json")) as file:
    old = json.load(file)
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    new = json.load(file)
  assert new["ict"] == old["ict"] and new["BM25"] == old["BM25"]   # upstream and lexical results unchanged
  assert new["finetune"] != old["finetune"]                          # re-encoded from the retrained checkpoint
  # Stages not in this run keep their old fingerprint; visualize reads round_1, so it is now stale too.
  result = _main(workdir, "--config.finetune.learning_rate=3e-4", "--config.stages=visualize")
  assert "Stage visualize is recomputed" in result.stderr


@pytest.fixture(scope="module")
def colliding_ids_run(tmp_path_factory):
  """The tiny run's training stages on a copy of the demo data whose ids are renamed the Mr.TyDi way."""
  root = tmp_path_factory.mktemp("mrtydi-style")
  subprocess.run([sys.executable, os.path.join(REPO, "data", "mrtydi_style_ids.py"),
                  os.path.join(REPO, "data", "tydi-mini"), str(root / "data")], check=True, capture_output=True)
  workdir = str(root / "run")
  _main(workdir, f"--config.data.root={root / 'data'}", "--config.stages=ict,pretrain,finetune,round_1,evaluate",
        "--config.evaluate.bm25=False")
  return workdir


def test_colliding_ids_train_like_prefixed_ids(finished_run, colliding_ids_run):
  workdir, _ = finished_run
  # The ids really collide across the two languages of the tiny config.
  from axl_jax import data
  root = os.path.join(os.path.dirname(colliding_ids_run), "data")
  ids = {lang: {e.query_id for e in data.read_train(os.path.join(root, "train", f"{lang}.jsonl.gz"), lang)}
         for lang in ("bn", "th")}
  assert ids["bn"] & ids["th"]
  # Same texts in the same order: training is the same computation whatever the ids are.
  for stage in ("ict", "pretrain", "finetune"):
    manifests = [json.load(open(os.path.join(w, stage, "manifest.json"))) for w in (workdir, colliding_ids_run)]
    assert manifests[0]["metrics"]["loss"] == manifests[1]["metrics"]["loss"], stage
  with open(os.path.join(colliding_ids_run, "evaluate", "results.json")) as file:
    results = json.load(file)
  with open(os.path.join(workdir, "evaluate", "results.json")) as file:
    reference = json.load(file)
  for language in ("bn", "th"):
    assert results["finetune"][language]["MRR@100"] == pytest.approx(reference["finetune"][language]["MRR@100"],
                                                                     abs=1e-6)


def test_a_round_with_colliding_query_ids_keys_by_language(colliding_ids_run):
  from axl_jax import data
  root = os.path.join(os.path.dirname(colliding_ids_run), "data")
  positives = {(lang, e.query_id): {p.docid for p in e.positives}
               for lang in ("bn", "th") for e in data.read_train(os.path.join(root, "train", f"{lang}.jsonl.gz"), lang)}
  decisions = [json.loads(line) for line in open(os.path.join(colliding_ids_run, "round_1", "decisions.jsonl"))]
  assert {d["language"] for d in decisions} == {"bn", "th"}
  for decision in decisions:  # each candidate was made from (and scored against) its own language's positive
    assert decision["source_docid"] in positives[(decision["language"], decision["query_id"])]
  assert sum(d["kept"] for d in decisions) > 0


def finetune_manifests(workdir):
  """The corpus shard manifests of the finetune checkpoint's embeddings, one per language."""
  manifests = [os.path.join(directory, language, "corpus.manifest.json")
               for directory in glob.glob(os.path.join(workdir, "embeddings", "*")) for language in ("bn", "th")]
  return [m for m in manifests if os.path.exists(m) and "/finetune/" in json.load(open(m))["checkpoint"]]


def test_a_round_mines_the_models_own_negatives_by_language(colliding_ids_run, tmp_path):
  # Mr.TyDi-style ids (the same query and passage ids in both languages): the round mines the finetuned model's
  # top-ranked non-positives per (language, query), from corpus embeddings it makes once for that checkpoint.
  from axl_jax import data
  workdir = str(tmp_path / "run")
  shutil.copytree(colliding_ids_run, workdir, symlinks=True)
  shutil.rmtree(os.path.join(workdir, "embeddings"))
  root = os.path.join(os.path.dirname(colliding_ids_run), "data")
  _main(workdir, f"--config.data.root={root}", "--config.stages=round_1,evaluate", "--config.evaluate.bm25=False",
        "--config.adversarial.sources=generated,mined", "--config.adversarial.mine_skip=2",
        "--config.adversarial.mine_depth=6", "--config.recompute=round_1")
  rows = {(lang, e.query_id): e for lang in ("bn", "th")
          for e in data.read_train(os.path.join(root, "train", f"{lang}.jsonl.gz"), lang)}
  corpus = {(lang, p.docid): p for lang in ("bn", "th")
            for p in data.read_corpus(os.path.join(root, "corpus", f"{lang}.jsonl.gz"))}
  mined = [json.loads(line) for line in open(os.path.join(workdir, "round_1", "mined.jsonl"))]
  per_query = collections.defaultdict(list)
  for record in mined:
    key = (record["language"], record["query_id"])
    per_query[key].append(record)
    assert record["docid"] not in {p.docid for p in rows[key].positives}  # never a judged positive
    assert (record["language"], record["docid"]) in corpus and "text" not in record  # ids only
  assert set(per_query) == set(rows)  # every training query of both languages
  for records in per_query.values():  # non-relevant ranks 3..6, best first
    assert [r["rank"] for r in records] == [3, 4, 5, 6]
    assert all(a["search_score"] >= b["search_score"] for a, b in zip(records, records[1:]))
  decisions = [json.loads(line) for line in open(os.path.join(workdir, "round_1", "decisions.jsonl"))]
  mined_decisions = [d for d in decisions if d["technique"] == "mined"]
  assert len(mined_decisions) == len(mined)
  import ml_collections
  from axl_jax import embeddings, tokenization
  with open(os.path.join(workdir, "round_1", "manifest.json")) as file:
    config = ml_collections.ConfigDict(json.load(file)["config"])
  encoder = embeddings.Encoder(os.path.join(workdir, "finetune", "checkpoints"), config,
                               tokenization.load_tokenizer(os.path.join(workdir, "tokenizer")))
  stored = {}  # the finetune checkpoint's float16 corpus vectors, by (language, docid)
  for manifest in finetune_manifests(workdir):
    language = os.path.basename(os.path.dirname(manifest))
    for ids, vectors in embeddings.load_shards(os.path.dirname(manifest), "corpus"):
      stored.update({(language, docid): vector.astype(np.float32) for docid, vector in zip(ids, vectors)})
  fresh, from_shards = {}, {}  # each query's positive and BM25 negatives: encoded again / from the shards
  for key, example in rows.items():
    passages = example.positives[:1] + example.negatives
    query, = encoder.encode([example.query], "query")
    fresh[key] = query @ encoder.encode([data.passage_text(p, config.data.title_separator) for p in passages],
                                        "passage").T
    from_shards[key] = (query, [float(query @ stored[(key[0], p.docid)]) for p in passages])
  for decision, record in zip(mined_decisions, mined):
    key = (record["language"], record["query_id"])
    query, scores = from_shards[key]
    assert (decision["docid"], decision["rank"], decision["title"]) == (record["docid"], record["rank"], None)
    # The mined passage, its positive and its BM25 negatives are scored from the float16 shards of its own
    # language (to 1e-5: not encoded again, which differs by float16 rounding, ~1e-4, while the other
    # language's passage of the same id would score quite differently); the search ranked them alike.
    assert decision["score_negative"] == record["score_negative"]
    assert record["score_negative"] == pytest.approx(float(query @ stored[(key[0], record["docid"])]), abs=1e-5)
    assert record["score_negative"] == pytest.approx(record["search_score"], abs=1e-5)
    assert decision["score_positive"] == record["score_positive"] == pytest.approx(scores[0], abs=1e-5)
    assert decision["score_best_bm25"] == pytest.approx(max(scores[1:]), abs=1e-5)
    assert decision["score_positive"] == pytest.approx(fresh[key][0], abs=2e-3)
  for decision in mined_decisions:  # the guard, then every eligible one (mined_keep_fraction 1.0)
    guarded = decision["score_negative"] >= decision["score_positive"]
    assert decision["reason"] == ("guard" if guarded else "kept")
  assert sum(d["kept"] for d in mined_decisions) > 0
  for language in ("bn", "th"):  # the generated ones keep their own hardest quarter, as without mining
    generated = [d for d in decisions if d["technique"] != "mined" and d["language"] == language]
    eligible = sum(d["reason"] != "guard" for d in generated)
    assert sum(d["kept"] for d in generated) == math.ceil(0.25 * eligible) > 0
  with open(os.path.join(workdir, "round_1", "round_stats.json")) as file:
    stats = json.load(file)
  assert stats["technique/mined/candidates"] == len(mined)
  # The finetune checkpoint's corpus was encoded once, in the round, before its decisions; evaluate reused it.
  finetune = finetune_manifests(workdir)
  assert len(finetune) == 2
  decided = os.path.getmtime(os.path.join(workdir, "round_1", "decisions.jsonl"))
  assert all(os.path.getmtime(m) < decided for m in finetune)
