"""The pipeline's bookkeeping: ids keyed by language, stage fingerprints and staleness, barriers, content keys."""
import ast
import os
import shutil

import numpy as np
import pytest

from axl_jax import batching, io
from axl_jax.data import Passage, TrainExample
from tests.helpers import REPO
from tests.test_batching import CharTokenizer


def _colliding_examples():
  """Mr.TyDi style: query "1" and passage "25267#12" exist in both languages with different texts."""
  return [TrainExample("1", f"{language} query", (Passage("25267#12", "", f"{language} positive"),),
                       (Passage("25267#13", "", f"{language} negative"),), language)
          for language in ("ar", "en")]


def _tokens(text, max_length=40):
  return CharTokenizer()([text], True, max_length, True)["input_ids"][0]


def test_passages_are_keyed_by_language_and_id():
  examples = _colliding_examples()
  shape = batching.BatchShape(2, 2, (16,), (40,))
  batches = batching.SupervisedBatches(examples, CharTokenizer(), shape, 0, 16, 40, " ")
  for step in range(3):
    batch = batches.batch(step)
    for row in range(2):
      query = batch["query_ids"][row][:batch["query_lengths"][row]].tolist()
      language = "ar" if query == _tokens("ar query", 16) else "en"
      assert query == _tokens(f"{language} query", 16)
      positive = batch["passage_ids"][2 * row][:batch["passage_lengths"][2 * row]].tolist()
      negative = batch["passage_ids"][2 * row + 1][:batch["passage_lengths"][2 * row + 1]].tolist()
      assert positive == _tokens(f"{language} positive") and negative == _tokens(f"{language} negative")


def test_adversarial_negatives_attach_to_their_own_languages_query():
  shape = batching.BatchShape(2, 2, (16,), (40,))
  adversarial = {("ar", "1"): (Passage("round_1-adv-0", "", "ar adversarial"),)}
  batches = batching.SupervisedBatches(_colliding_examples(), CharTokenizer(), shape, 0, 16, 40, " ",
                                       adversarial=adversarial, adversarial_per_group=1)
  batch = batches.batch(0)
  for row in range(2):
    query = batch["query_ids"][row][:batch["query_lengths"][row]].tolist()
    negative = batch["passage_ids"][2 * row + 1][:batch["passage_lengths"][2 * row + 1]].tolist()
    if query == _tokens("ar query", 16):
      assert negative == _tokens("ar adversarial")
    else:
      assert negative == _tokens("en negative")


def test_groups_take_generated_then_mined_then_bm25_negatives():
  # Group of 4: the positive, 1 generated, 1 mined (of 2, rotating over epochs), then the BM25 negative.
  shape = batching.BatchShape(2, 4, (16,), (40,))
  adversarial = {("ar", "1"): (Passage("round_1-adv-0", "", "ar adversarial"),)}
  mined = {("ar", "1"): (Passage("9#1", "", "ar mined a"), Passage("9#2", "", "ar mined b"))}
  batches = batching.SupervisedBatches(_colliding_examples(), CharTokenizer(), shape, 0, 16, 40, " ",
                                       adversarial=adversarial, adversarial_per_group=1, mined=mined,
                                       mined_per_group=1)
  example = _colliding_examples()[0]
  groups = [[p.text for p in batches.group(epoch, 0, example)] for epoch in (0, 1)]
  assert groups[0][:2] == ["ar positive", "ar adversarial"] and groups[1][:2] == ["ar positive", "ar adversarial"]
  assert {groups[0][2], groups[1][2]} == {"ar mined a", "ar mined b"}
  assert groups[0][3] == groups[1][3] == "ar negative"
  # The other language's query "1" gets none of them.
  other = [p.text for p in batches.group(0, 1, _colliding_examples()[1])]
  assert other[:2] == ["en positive", "en negative"]


def test_no_import_circle_in_the_package():
  edges = {}
  root = os.path.join(REPO, "axl_jax")
  for directory, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path[:-3], REPO).replace(os.sep, ".").removesuffix(".__init__")
      targets = set()
      for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("axl_jax"):
          targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
          targets |= {alias.name for alias in node.names if alias.name.startswith("axl_jax")}
      edges[module] = targets
  edges = {module: {t for t in targets if t in edges and t != module} for module, targets in edges.items()}

  def reaches(start, goal, seen):
    return any(t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in edges[start])
  circles = [module for module in edges if reaches(module, module, {module})]
  assert not circles


# --- Stage fingerprints: the plan decides skip / resume / recompute / stop before anything runs.

NAMES = ["ict", "pretrain", "finetune", "round_1", "evaluate", "visualize", "export"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  from axl_jax import tokenization
  texts = ["a few words of text", "другой текст", "テキスト"] * 20
  return tokenization.train_tokenizer(texts, 80, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def _config(**changes):
  import tests.configs.tiny as tiny
  config = tiny.get_config()
  for dotted, value in changes.items():
    section, field = dotted.rsplit(".", 1)
    parent = config
    for part in section.split("."):
      parent = parent[part]
    parent[field] = value
  return config


def _finish(workdir, steps, only=None):
  """Marks planned stages complete as a run would have left them."""
  for step in steps:
    if only is None or step.name in only:
      workdir.complete(step.name, {"stage": step.name, "fingerprint": step.fingerprint, "fields": step.fields,
                                   "metrics": {}, "finished": "now"})


def _actions(steps):
  return {step.name: step.action for step in steps}


def test_plan_skips_up_to_date_stages_and_recomputes_cheap_stale_ones(tmp_path, tokenizer):
  from axl_jax import pipeline
  workdir = pipeline.Workdir(str(tmp_path))
  steps = pipeline.plan(_config(), workdir, NAMES, tokenizer)
  assert set(_actions(steps).values()) == {"run"}
  _finish(workdir, steps)
  assert set(_actions(pipeline.plan(_config(), workdir, NAMES, tokenizer)).values()) == {"skip"}
  # A cheap stage made with another config is recomputed, and so are the stages that read it.
  steps = pipeline.plan(_config(**{"evaluate.depth": 50}), workdir, NAMES, tokenizer)
  assert _actions(steps) == dict.fromkeys(NAMES, "skip") | {"evaluate": "recompute", "visualize": "recompute"}
  assert "evaluate.depth: 100 -> 50" in next(s.reason for s in steps if s.name == "evaluate")


def test_plan_stops_before_throwing_training_away(tmp_path, tokenizer):
  from axl_jax import pipeline
  workdir = pipeline.Workdir(str(tmp_path))
  _finish(workdir, pipeline.plan(_config(), workdir, NAMES, tokenizer))
  changed = _config(**{"finetune.learning_rate": 3e-4})
  with pytest.raises(ValueError) as error:
    pipeline.plan(changed, workdir, NAMES, tokenizer)
  message = str(error.value)
  assert "finetune (complete): finetune.learning_rate: 0.0002 -> 0.0003" in message
  assert "--config.recompute=finetune " in message and "round_1 (complete)" not in message
  # Accepted: finetune and every stage after it that reads it are recomputed; earlier ones are skipped.
  changed.recompute = "finetune"
  actions = _actions(pipeline.plan(changed, workdir, NAMES, tokenizer))
  assert actions == {"ict": "skip", "pretrain": "skip", "finetune": "recompute", "round_1": "recompute",
                     "evaluate": "recompute", "visualize": "recompute", "export": "recompute"}
  # The data a stage reads is part of what it was made from.
  moved = _config(**{"finetune.train_data": "{root}/train/{lang}.jsonl.gz", "finetune.languages": "bn"})
  with pytest.raises(ValueError, match=r"finetune.rows"):
    pipeline.plan(moved, workdir, NAMES, tokenizer)


def test_plan_checks_an_interrupted_stage_too(tmp_path, tokenizer):
  from axl_jax import pipeline
  workdir = pipeline.Workdir(str(tmp_path))
  steps = pipeline.plan(_config(), workdir, NAMES, tokenizer)
  _finish(workdir, steps, only={"ict", "pretrain"})
  finetune = next(s for s in steps if s.name == "finetune")
  workdir.start("finetune", finetune.fingerprint, finetune.fields, finetune.inputs)
  assert _actions(pipeline.plan(_config(), workdir, NAMES, tokenizer))["finetune"] == "resume"
  with pytest.raises(ValueError, match=r"finetune \(interrupted\): finetune.num_steps: 6 -> 7"):
    pipeline.plan(_config(**{"finetune.num_steps": 7}), workdir, NAMES, tokenizer)
  # Checkpoint-writing cadence does not change what is trained.
  assert _actions(pipeline.plan(_config(**{"finetune.checkpoint_every": 1}), workdir, NAMES, tokenizer))[
      "finetune"] == "resume"


def test_round_fingerprint_covers_the_filter_and_the_generator(tmp_path, tokenizer):
  from axl_jax import pipeline
  workdir = pipeline.Workdir(str(tmp_path))
  _finish(workdir, pipeline.plan(_config(), workdir, NAMES, tokenizer))
  for field in ("adversarial.keep_fraction", "adversarial.selection", "adversarial.guard", "generator.seed"):
    value = {"adversarial.keep_fraction": 0.5, "adversarial.selection": "random", "adversarial.guard": False,
             "generator.seed": 9}[field]
    with pytest.raises(ValueError, match=rf"round_1 \(complete\): .*{field}"):
      pipeline.plan(_config(**{field: value}), workdir, NAMES, tokenizer)


def test_complete_is_written_before_every_process_passes_the_barrier(tmp_path, monkeypatch):
  from axl_jax import distributed, pipeline
  seen = []
  monkeypatch.setattr(distributed, "barrier",
                      lambda label: seen.append((label, os.path.exists(tmp_path / "ict" / "COMPLETE"))))
  pipeline.Workdir(str(tmp_path)).complete("ict", {"finished": "now", "metrics": {}})
  # Every process finished before COMPLETE is written; none goes on before it is written.
  assert seen == [("ict finished", False), ("ict complete", True)]


def test_checkpoint_digest_follows_content_not_path(tmp_path):
  import jax

  from axl_jax import checkpoints
  from tests.helpers import tiny_model_config
  from axl_jax import encoder
  config = tiny_model_config()
  directory = str(tmp_path / "checkpoints")
  digests = []
  for seed in (0, 1):
    shutil.rmtree(directory, ignore_errors=True)  # a stage retrained in place: same path, other parameters
    params = encoder.init_params(config, jax.random.key(seed))
    manager = checkpoints.checkpoint_manager(directory, 1)
    checkpoints.save(manager, 5, params, {"count": np.zeros(())}, {"step": 5, "model": config.to_dict()})
    manager.wait_until_finished()
    digests.append(checkpoints.digest(directory))
    digests.append(checkpoints.digest(directory))
  assert digests[0] == digests[1] and digests[2] == digests[3] and digests[0] != digests[2]


def test_embedding_shards_are_rewritten_when_their_key_changes(tmp_path):
  from axl_jax import embeddings
  calls = []

  def embed(value):
    def fn(texts, progress):
      calls.append(value)
      return np.full((len(texts), 2), value, np.float32)
    return fn
  ids = [f"d{i}" for i in range(5)]
  read = lambda start, stop: (ids[start:stop], [f"text of {i}" for i in ids[start:stop]])
  embeddings.export_shards(str(tmp_path), "corpus", 5, read, embed(1.0), 2, {"key": "a"}, dtype="float16")
  embeddings.export_shards(str(tmp_path), "corpus", 5, read, embed(2.0), 2, {"key": "a"}, dtype="float16")
  assert calls == [1.0] * 3  # same key: nothing encoded again
  embeddings.export_shards(str(tmp_path), "corpus", 5, read, embed(3.0), 2, {"key": "b"}, dtype="float16")
  shards = list(embeddings.load_shards(str(tmp_path), "corpus"))
  vectors = np.concatenate([v for _, v in shards])
  assert calls == [1.0] * 3 + [3.0] * 3 and (vectors == 3.0).all() and vectors.dtype == np.float16
  assert [i for shard_ids, _ in shards for i in shard_ids] == ids
  assert io.read_json(str(tmp_path / "corpus.manifest.json"))["key"] == "b"


def test_shards_are_encoded_a_chunk_at_a_time_in_corpus_order(tmp_path):
  from axl_jax import embeddings
  reads = []
  ids = [f"d{i}" for i in range(10)]

  def read(start, stop):
    reads.append((start, stop))
    return ids[start:stop], ids[start:stop]
  embed = lambda texts, progress: np.asarray([[float(t[1:]), 1.0] for t in texts], np.float32)
  embeddings.export_shards(str(tmp_path), "corpus", 10, read, embed, 4, {"key": "a"}, chunk_size=3)
  assert reads == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 10)]  # never more than a chunk in memory
  shards = list(embeddings.load_shards(str(tmp_path), "corpus"))
  assert [len(i) for i, _ in shards] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([v for _, v in shards])[:, 0], np.arange(10))


def test_rows_are_read_from_the_shards_in_the_order_asked(tmp_path):
  # A round scores a mined passage's positive and BM25 negatives from the corpus shards by row: rows in any
  # order, repeated, across shards; float16 rows come back as float32; a row past the end is refused.
  from axl_jax import embeddings
  ids = [f"d{i}" for i in range(10)]
  embed = lambda texts, progress: np.asarray([[int(t[1:]) + 0.25, -1.0] for t in texts], np.float32)
  embeddings.export_shards(str(tmp_path), "corpus", 10, lambda a, b: (ids[a:b], ids[a:b]), embed, 4, {"key": "a"},
                           dtype="float16")
  got_ids, vectors = embeddings.read_rows(str(tmp_path), "corpus", [9, 0, 5, 4, 5])
  assert got_ids == ["d9", "d0", "d5", "d4", "d5"] and vectors.dtype == np.float32
  np.testing.assert_array_equal(vectors, [[9.25, -1], [0.25, -1], [5.25, -1], [4.25, -1], [5.25, -1]])
  assert embeddings.read_rows(str(tmp_path), "corpus", [])[0] == []
  no_ids, same = embeddings.read_rows(str(tmp_path), "corpus", [9, 0, 5, 4, 5], with_ids=False)
  assert no_ids is None and (same == vectors).all()
  for outside in (10, -1):
    with pytest.raises(IndexError, match="rows must be in"):
      embeddings.read_rows(str(tmp_path), "corpus", [outside])


def test_shard_vectors_are_each_docids_own_corpus_row(tmp_path):
  # Mined negatives are guarded with their positive's score from the shards: each docid's own row, a docid
  # the corpus lacks left out (its query gets no mined negatives), shards out of the corpus's order refused.
  from axl_jax import embeddings
  from axl_jax.stages import round as rounds
  ids = [f"25267#{i}" for i in range(6)]
  embed = lambda texts, progress: np.asarray([[float(t.split("#")[1]), 1.0] for t in texts], np.float32)
  embeddings.export_shards(str(tmp_path), "corpus", 6, lambda a, b: (ids[a:b], ids[a:b]), embed, 4, {"key": "a"},
                           dtype="float16")

  class Corpus:
    def __init__(self, order):
      self.order = order

    def index_of(self, docids):
      return np.asarray([self.order.index(d) if d in self.order else -1 for d in docids], np.int64)
  vectors = rounds._shard_vectors(Corpus(ids), str(tmp_path), ["25267#5", "gone", "25267#1"])
  assert sorted(vectors) == ["25267#1", "25267#5"]
  np.testing.assert_array_equal(vectors["25267#5"], [5.0, 1.0])
  np.testing.assert_array_equal(vectors["25267#1"], [1.0, 1.0])
  with pytest.raises(RuntimeError, match="not in the order of the prepared corpus"):
    rounds._shard_vectors(Corpus(ids[::-1]), str(tmp_path), ["25267#5"])
  # Later chunks of a language skip reading the id lists (checked on its first chunk).
  unchecked = rounds._shard_vectors(Corpus(ids[::-1]), str(tmp_path), ["25267#5"], check_order=False)
  np.testing.assert_array_equal(unchecked["25267#5"], [0.0, 1.0])


def test_mined_records_by_hand_and_the_same_in_any_chunk_size():
  # Five queries' hits (best first). q2's positive is not in the corpus: no guard, so no mined negatives.
  # "gone" is a hit the corpus lacks (left out, the ranks close up); judged positives are removed before ranking.
  from axl_jax.stages import round as rounds
  corpus = {"p0": [1.0, 0.0], "p1": [0.0, 1.0], "p3": [1.0, 1.0], "p4": [0.5, 0.5], "a": [2.0, 0.0],
            "b": [0.0, 3.0], "c": [1.0, 2.0], "d": [0.25, 0.0], "n0": [0.5, 0.0]}
  items = [(10, "q0", "p0", {"p0"}, ["n0"]), (11, "q1", "p1", {"p1", "b"}, []), (12, "q2", "p2", {"p2"}, ["n0"]),
           (13, "q3", "p3", {"p3"}, ["gone"]), (14, "q4", "p4", {"p4"}, ["n0", "d"])]
  queries = np.asarray([[1, 0], [0, 1], [1, 1], [2, 1], [1, -1]], np.float32)
  docids = [["p0", "a", "gone", "c", "d"], ["b", "c", "p1", "a", "d"], ["a", "b", "c", "d", "p0"],
            ["c", "p3", "b", "a", "d"], ["a", "p4", "d", "c", "b"]]
  scores = -np.arange(25, dtype=np.float32).reshape(5, 5)  # ranks only: the stored vectors give the scores
  calls = []

  def vectors_of(wanted, first):
    calls.append((wanted, first))
    return {d: np.asarray(corpus[d], np.float32) for d in wanted if d in corpus}
  records, unguarded = rounds._mined_records("sw", items, queries, scores, docids, 1, 3, vectors_of)
  assert unguarded == 1 and len(calls) == 1 and calls[0][1] is True
  got = [(r["query_id"], r["docid"], r["rank"], r["search_score"], r["score_negative"], r["score_positive"],
          r["score_best_bm25"]) for r in records]
  assert got == [("q0", "c", 2, -3.0, 1.0, 1.0, 0.5), ("q0", "d", 3, -4.0, 0.25, 1.0, 0.5),
                 ("q1", "a", 2, -8.0, 0.0, 1.0, None), ("q1", "d", 3, -9.0, 0.0, 1.0, None),
                 ("q3", "b", 2, -17.0, 3.0, 3.0, None), ("q3", "a", 3, -18.0, 4.0, 3.0, None),
                 ("q4", "d", 2, -22.0, 0.25, 0.0, 0.5),
                 ("q4", "c", 3, -23.0, -1.0, 0.0, 0.5)]
  assert all(r["language"] == "sw" and r["technique"] == "mined" and r["accepted"] for r in records)
  assert [r["row"] for r in records] == [10, 10, 11, 11, 13, 13, 14, 14]
  # In chunks of 2 queries (Mr.TyDi's 4,096 at a time): the same records, the order check on the first only.
  calls.clear()
  assert rounds._mined_records("sw", items, queries, scores, docids, 1, 3, vectors_of, chunk=2) == (records, 1)
  assert [first for _, first in calls] == [True, False, False]
  assert calls[2][0] == ["p4", "n0", "d", "a", "c", "b"]  # the last chunk asks for its own query's passages only


def test_tokenizer_fingerprint_ignores_the_last_calls_truncation(tokenizer):
  from axl_jax import tokenization
  before = tokenization.fingerprint(tokenizer)
  tokenization.tokenize(tokenizer, ["a few words"], 7)
  assert tokenization.fingerprint(tokenizer) == before


def test_rounds_init_checkpoint_applies_to_the_first_round_only():
  from axl_jax.stages import round as rounds
  config = _config(**{"adversarial.rounds": 3, "adversarial.train.init_checkpoint": "/somewhere/checkpoints"})
  available = lambda name: True
  assert rounds.inputs(config, "round_1", available) == []
  assert rounds.inputs(config, "round_2", available) == ["round_1"]
  assert rounds.inputs(config, "round_3", available) == ["round_2"]


def test_candidates_are_scored_in_batches_of_score_batch_size():
  from axl_jax.stages import round as rounds
  sizes = []

  class RecordingEncoder:
    def encode(self, texts, tower, batch_size=None, progress=None):
      sizes.append(batch_size)
      return np.ones((len(texts), 2), np.float32)
  records = [{"language": "ar", "query_id": "1", "source_docid": "25267#12", "text": "edited",
              "technique": "entity_substitution"}]
  rows = batching.ExampleList(_colliding_examples())  # "1" in ar and en: only ar's row has a candidate
  positive, negative, bm25, titles = rounds._score(RecordingEncoder(), records, rows, " ", 7)
  assert sizes == [7, 7, 7] and positive.tolist() == [2.0] and negative.tolist() == [2.0] and bm25 == [2.0]
  assert titles == [""]


def test_a_trained_tokenizer_is_not_reused_with_other_settings(tmp_path):
  from axl_jax import tokenization
  config = _config()
  words = [f"{a}{b}{c}" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
  texts = lambda: iter([" ".join(words[i:i + 20]) for i in range(0, len(words), 7)])
  settings = {"vocab_size": 60, "corpus": ["abc"]}
  config.tokenizer.vocab_size = 60
  first = tokenization.get_tokenizer(config, str(tmp_path), texts, settings)
  again = tokenization.get_tokenizer(config, str(tmp_path), lambda: pytest.fail("retrained"), settings)
  assert tokenization.fingerprint(again) == tokenization.fingerprint(first)
  config.tokenizer.vocab_size = 90
  changed = dict(settings, vocab_size=90)
  with pytest.raises(tokenization.StaleTokenizerError, match="vocab_size changed"):
    tokenization.get_tokenizer(config, str(tmp_path), texts, changed)
  retrained = tokenization.get_tokenizer(config, str(tmp_path), texts, changed, retrain=True)
  assert tokenization.fingerprint(retrained) != tokenization.fingerprint(first)
  assert tokenization.get_tokenizer(config, str(tmp_path), lambda: pytest.fail("retrained"), changed)


def test_an_interrupted_export_links_its_shards_again(tmp_path):
  from axl_jax.stages import export
  (tmp_path / "source.npy").write_bytes(b"x")
  for _ in range(2):  # the second call is what a resumed export does
    export._link(str(tmp_path / "source.npy"), str(tmp_path / "target.npy"))
  assert os.path.samefile(tmp_path / "source.npy", tmp_path / "target.npy")


def test_stages_must_come_after_the_stages_they_read(tmp_path, tokenizer):
  from axl_jax import pipeline
  with pytest.raises(ValueError, match="stages: evaluate reads finetune, listed after it"):
    pipeline.plan(_config(), pipeline.Workdir(str(tmp_path)), ["ict", "evaluate", "finetune"], tokenizer)
