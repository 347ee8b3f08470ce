"""Bad input names the file, the line and the field; config mistakes fail at launch."""
import gzip
import json
import os
import subprocess
import sys

import pytest

from axl_jax import data
from tests.helpers import REPO


def _write(path, lines):
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wt", encoding="utf-8") as file:
    file.write("\n".join(lines) + "\n")
  return str(path)


def test_malformed_json_names_file_and_line(tmp_path):
  path = _write(tmp_path / "train.jsonl.gz", ['{"query_id": "q1", "query": "x", "positive_passages": []}', "{oops"])
  with pytest.raises(data.DataError, match=r"train.jsonl.gz:2: malformed JSON"):
    data.read_train(path)


def test_missing_field_names_file_line_and_field(tmp_path):
  row = {"query_id": "q1", "query": "x", "positive_passages": [{"docid": "d1", "title": "t"}]}
  path = _write(tmp_path / "train.jsonl", [json.dumps(row)])
  with pytest.raises(data.DataError, match=r"train.jsonl:1: field 'positive_passages\[0\]': field 'text' is missing"):
    data.read_train(path)


def test_empty_passages_are_skipped_and_counted(tmp_path, caplog):
  path = _write(tmp_path / "corpus.jsonl", [json.dumps({"docid": "a", "title": "", "text": "hello"}),
                                            json.dumps({"docid": "b", "title": "t", "text": "  "})])
  passages = data.read_corpus(path)
  assert [p.docid for p in passages] == ["a"]
  assert "skipped 1 rows with an empty 'text' (first at" in caplog.text and "corpus.jsonl:2" in caplog.text


def test_qrels_docid_missing_from_corpus(tmp_path):
  path = _write(tmp_path / "dev.tsv", ["q1 0 d1 1", "q2 0 d404 1"])
  with pytest.raises(data.DataError, match=r"dev.tsv:2: field 'docid': 'd404' \(query 'q2'\) is not in the corpus"):
    data.check_qrels(data.read_qrels(path), {"d1"}, path, qrels_file=True)


def test_positives_of_query_rows_missing_from_corpus(tmp_path):
  # Judgements taken from the query rows of a plain local file (data.qrels = ""): the check used to
  # read that file as TREC qrels, find no 4-field line and pass.
  rows = [{"query_id": "q1", "query": "a", "positive_passages": [{"docid": "d1"}]},
          {"query_id": "q2", "query": "b", "positive_passages": [{"docid": "d404"}]}]
  path = _write(tmp_path / "dev.jsonl", [json.dumps(row) for row in rows])
  queries = data.read_queries(path)
  with pytest.raises(data.DataError, match=r"dev.jsonl:2: field 'positive_passages.docid': 'd404'"):
    data.check_qrels(data.qrels_from_queries(queries), {"d1"}, path, qrels_file=False)


def test_unknown_language_code():
  with pytest.raises(data.DataError, match=r"data.languages: unknown language code 'xx'"):
    data.parse_languages("en,xx")


def _launch(*overrides):
  return subprocess.run([sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py",
                         "--workdir=/tmp/axl-never-written", *overrides], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), timeout=300)


@pytest.mark.parametrize("override, message", [
    ("--config.finetune.learning_rat=1", "learning_rat"),
    ("--config.stages=ict,finetuen", "unknown stage 'finetuen'"),
    ("--config.stages=ict,round_3", "round_3 but adversarial.rounds is 1"),
    ("--config.stages=ict,round", "unknown stage 'round'"),
    ("--config.recompute=finetuen", "config field recompute: unknown stage 'finetuen'"),
    # ICT reads the corpus and the rounds finetune's rows: fields that nothing would read do not exist.
    ("--config.ict.train_data=x.jsonl", "train_data"),
    ("--config.adversarial.train.languages=en", "languages"),
    ("--config.data.languages=en,zz", "unknown language code 'zz'"),
    ("--config.data.root=/nonexistent", "does not exist"),
    ("--config.generator.env=TPU_PROCESS_BOUNDS", "generator.env: 'TPU_PROCESS_BOUNDS' is not NAME=value"),
])
def test_config_mistakes_fail_at_launch(override, message):
  result = _launch(override)
  assert result.returncode != 0 and message in result.stderr
  assert not os.path.exists("/tmp/axl-never-written/ict")


def test_every_shipped_config_loads_and_validates_its_fields():
  import importlib
  from axl_jax import pipeline
  from configs import ablations
  for name, args in [("demo", ()), ("ict_p", ()), ("axl", ()), ("evaluate", ()), ("minilm_en", ())] + [
      ("ablations", (variant,)) for variant in ablations.VARIANTS]:
    config = importlib.import_module(f"configs.{name}").get_config(*args)
    names = pipeline.validate_config(config)  # the launch-time validation, data files included
    assert names == config.stages.split(",") and all(pipeline.stage_module(n) for n in names), name
  config = importlib.import_module("configs.demo").get_config()
  config.adversarial.selection = "hardest_first"
  with pytest.raises(ValueError, match="adversarial.selection must be one of hardest,random,all"):
    pipeline.validate_config(config)
  config = importlib.import_module("configs.demo").get_config()
  config.adversarial.sources = "generated,minded"
  with pytest.raises(ValueError, match="adversarial.sources must name one or both of generated,mined"):
    pipeline.validate_config(config)
  with pytest.raises(ValueError, match="unknown ablation 'bogus'"):
    importlib.import_module("configs.ablations").get_config("bogus")


def test_a_batch_that_does_not_split_over_the_devices_fails_before_any_stage(tmp_path):
  # Checked once the devices are open (after the rounds' generators, which may own them), before a stage runs.
  result = subprocess.run([sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py",
                           f"--workdir={tmp_path}", "--config.stages=ict,finetune", "--config.finetune.batch_size=6"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                                   XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert result.returncode != 0
  assert "finetune.batch_size (6) must be a multiple of the device count (4)" in result.stderr
  assert not os.path.exists(tmp_path / "ict")
