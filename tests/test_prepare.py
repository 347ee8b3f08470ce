"""``prepare`` turns a hub-layout folder into TFDS ArrayRecord datasets that read back exactly as the source."""
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from axl_jax import data, hub, prepare, prepared
from tests.helpers import DEMO_DATA, REPO

LANGUAGES = {"bn": "bengali", "th": "thai"}


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
  """tydi-mini's bn and th, with Mr.TyDi-style (colliding) ids, laid out like the hub's raw files."""
  renamed = str(tmp_path_factory.mktemp("renamed"))
  subprocess.run([sys.executable, os.path.join(REPO, "data", "mrtydi_style_ids.py"), DEMO_DATA, renamed + "/d"],
                 check=True, capture_output=True)
  root = str(tmp_path_factory.mktemp("hub"))
  for code, name in LANGUAGES.items():
    files = {f"castorini/mr-tydi-corpus/mrtydi-v1.1-{name}/corpus.jsonl.gz": f"corpus/{code}.jsonl.gz",
             f"castorini/mr-tydi/mrtydi-v1.1-{name}/train.jsonl.gz": f"train/{code}.jsonl.gz",
             f"castorini/mr-tydi/mrtydi-v1.1-{name}/dev.jsonl.gz": f"dev/{code}.jsonl.gz"}
    for target, source in files.items():
      os.makedirs(os.path.dirname(os.path.join(root, target)), exist_ok=True)
      shutil.copy(os.path.join(renamed, "d", source), os.path.join(root, target))
  return root


def _config(hub_dir, prepared_dir):
  import configs.default
  config = configs.default.get_config()
  config.data.languages = ",".join(LANGUAGES)
  config.data.hub_dir, config.data.download, config.data.prepared_dir = hub_dir, False, prepared_dir
  config.finetune.languages = ",".join(LANGUAGES)
  config.stages = "finetune,evaluate"
  return config


def test_prepare_reads_back_the_hub_files_exactly(hub_dir, tmp_path):
  config = _config(hub_dir, str(tmp_path / "prepared"))
  manifests = prepare.prepare_all(config, str(tmp_path))
  assert sorted((m["kind"], m["language"]) for m in manifests) == sorted(
      (kind, code) for kind in ("corpus", "train", "queries") for code in LANGUAGES)
  store = prepared.store(config, str(tmp_path))
  for code, name in LANGUAGES.items():
    source = os.path.join(hub_dir, f"castorini/mr-tydi-corpus/mrtydi-v1.1-{name}/corpus.jsonl.gz")
    corpus = store.corpus(f"hf:castorini/mr-tydi-corpus:{name}:train", code)
    expected = data.read_corpus(source)
    assert [p for _, chunk in corpus.chunks(100) for p in chunk] == expected
    # Mr.TyDi-style ids repeat across languages; lookups stay inside the language's own table.
    assert corpus.index_of([expected[7].docid, "no-such-id"]).tolist() == [7, -1]
    rows = store.rows(f"hf:castorini/mr-tydi:{name}:train", code)
    train = data.read_train(os.path.join(hub_dir, f"castorini/mr-tydi/mrtydi-v1.1-{name}/train.jsonl.gz"), code)
    assert rows.examples(range(len(rows))) == train
    queries = store.queries(f"hf:castorini/mr-tydi:{name}:dev", code)
    assert queries == data.read_queries(os.path.join(hub_dir, f"castorini/mr-tydi/mrtydi-v1.1-{name}/dev.jsonl.gz"))
  manifest = next(m for m in manifests if m["kind"] == "corpus" and m["language"] == "bn")
  assert manifest["count"] == len(data.read_corpus(os.path.join(
      hub_dir, "castorini/mr-tydi-corpus/mrtydi-v1.1-bengali/corpus.jsonl.gz")))
  assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
  assert any(name.split("/")[-1].startswith("axl_corpus-train.array_record") for name in manifest["files"])
  # A second prepare finds everything done and writes nothing.
  mtimes = {path: os.path.getmtime(path) for path in glob.glob(str(tmp_path / "prepared" / "*" / "manifest.json"))}
  prepare.prepare_all(config, str(tmp_path))
  assert mtimes == {path: os.path.getmtime(path) for path in mtimes}


def test_offline_prepare_names_the_missing_files_and_where_they_go(hub_dir, tmp_path):
  partial_hub = str(tmp_path / "hub")
  shutil.copytree(hub_dir, partial_hub)
  os.remove(os.path.join(partial_hub, "castorini/mr-tydi-corpus/mrtydi-v1.1-thai/corpus.jsonl.gz"))
  with pytest.raises(data.DataError) as error:
    prepare.prepare_all(_config(partial_hub, str(tmp_path / "prepared")), str(tmp_path))
  assert "hf:castorini/mr-tydi-corpus:thai:train" in str(error.value)
  assert os.path.join(partial_hub, "castorini/mr-tydi-corpus/mrtydi-v1.1-thai/corpus.jsonl.gz") in str(error.value)
  assert not os.path.exists(tmp_path / "prepared")  # checked before anything is written


def _write_jsonl(path, rows):
  with gzip.open(path, "wt", encoding="utf-8") as file:
    for row in rows:
      file.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
      file.write("\n")


@pytest.mark.parametrize("bad_row, message", [
    ('{"docid": "3", "title": "t", "text": ', ":3: malformed JSON"),
    ({"docid": "1", "title": "t", "text": "again"}, ":3: field 'docid': '1' appears twice"),
    ({"docid": "3", "title": "t"}, ":3: field 'text' is missing"),
    ({"docid": "1", "title": "t", "text": ""}, ":3: field 'docid': '1' appears twice"),  # even when empty
])
def test_a_bad_corpus_row_names_its_line_and_leaves_nothing_behind(tmp_path, bad_row, message):
  path = str(tmp_path / "corpus.jsonl.gz")
  good = [{"docid": "1", "title": "t", "text": "one."}, {"docid": "2", "title": "t", "text": "two."}]
  _write_jsonl(path, good + [bad_row, {"docid": "4", "title": "", "text": "four."}])
  store = prepared.Store(str(tmp_path / "prepared"))
  with pytest.raises(data.DataError, match=message) as error:
    store.corpus(path, "en")
  assert path in str(error.value)
  assert os.listdir(tmp_path / "prepared") == []  # no partial dataset a later run could take for finished


def test_changed_source_files_are_prepared_again(tmp_path):
  path = str(tmp_path / "corpus.jsonl.gz")
  _write_jsonl(path, [{"docid": "1", "title": "", "text": "one."}])
  store = prepared.Store(str(tmp_path / "prepared"))
  first = store.corpus(path, "en")
  _write_jsonl(path, [{"docid": "1", "title": "", "text": "one, edited."}])
  second = store.corpus(path, "en")
  assert first.directory != second.directory and second.passages([0])[0].text == "one, edited."


def test_hub_specs_map_to_the_raw_files_of_the_loading_scripts():
  assert hub.raw_file("hf:castorini/mr-tydi-corpus:english:train") == (
      "castorini/mr-tydi-corpus", "mrtydi-v1.1-english/corpus.jsonl.gz")
  assert hub.raw_file("hf:castorini/mr-tydi:swahili:test") == ("castorini/mr-tydi", "mrtydi-v1.1-swahili/test.jsonl.gz")
  assert hub.raw_file("hf:Tevatron/msmarco-passage::train") == ("Tevatron/msmarco-passage", "train.jsonl.gz")
  assert hub.raw_file("hf:someone/parquet-set::train") is None


def test_prepare_command_prints_what_it_prepared(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, "-m", "axl_jax.prepare", "--config=configs/demo.py", f"--workdir={tmp_path}",
       "--config.data.languages=bn,th", "--config.finetune.languages=bn,th", "--config.stages=finetune,evaluate"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| corpus | bn | 117 | 0 |" in result.stdout and "| train | th |" in result.stdout
  manifests = json.load(open(tmp_path / "prepared" / "prepared.json"))
  assert sorted({m["kind"] for m in manifests}) == ["corpus", "queries", "train"] and len(manifests) == 6


def test_the_pipeline_runs_from_hub_files(hub_dir, tmp_path):
  """ICT, finetune, a rules round, evaluate and export on hf: specs served from a hub-layout folder."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
       "--config.stages=ict,finetune,round_1,evaluate,export", "--config.data.root=",
       "--config.data.corpus=hf:castorini/mr-tydi-corpus:{lang_name}:train",
       "--config.data.queries=hf:castorini/mr-tydi:{lang_name}:{split}", "--config.data.qrels=",
       "--config.finetune.train_data=hf:castorini/mr-tydi:{lang_name}:train",
       f"--config.data.hub_dir={hub_dir}", "--config.data.download=false"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, "evaluate", "results.json")))
  assert set(results) == {"BM25", "ict", "finetune", "round_1"}
  assert results["round_1"]["bn"]["queries"] == 17  # the dev rows' positives are the judgements
  kinds = sorted(name.split("-")[0] for name in os.listdir(os.path.join(workdir, "prepared")) if "." not in name)
  assert kinds == ["corpus", "corpus", "queries", "queries", "train", "train"]
  # All of them prepared by the run before its first stage, and listed.
  assert len(json.load(open(os.path.join(workdir, "prepared", "prepared.json")))) == 6


def test_a_corpus_of_empty_passages_is_bad_input(tmp_path):
  path = str(tmp_path / "corpus.jsonl.gz")
  _write_jsonl(path, [{"docid": "1", "title": "", "text": ""}])
  with pytest.raises(data.DataError, match=r"no usable rows \(1 with an empty 'text'\)"):
    prepared.Store(str(tmp_path / "prepared")).corpus(path, "en")
