"""Readers: local JSON Lines and the ``hf:`` path through ``datasets`` give the same examples."""
import gzip
import json

from axl_jax import data

ROWS = [
    {"query_id": "q1", "query": "where is x", "positive_passages": [{"docid": "d1", "title": "X", "text": "x is here"}],
     "negative_passages": [{"docid": "d2", "title": "", "text": "not here"}, {"docid": "d3", "title": "", "text": ""}]},
    {"query_id": 7, "query": "what is y", "positive_passages": [{"docid": 5, "title": None, "text": "y is that"}],
     "negative_passages": []},
]


def test_local_gzip_and_hub_reader_agree(tmp_path):
  path = tmp_path / "train.jsonl.gz"
  with gzip.open(path, "wt", encoding="utf-8") as file:
    file.write("\n".join(json.dumps(row) for row in ROWS) + "\n")
  local = data.read_train(str(path))
  hub_dir = tmp_path / "hub"
  hub_dir.mkdir()
  (hub_dir / "train.jsonl").write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
  # A local folder is a valid `datasets` name: this runs the same code a hub id does, offline.
  hub = data.read_train(f"hf:{hub_dir}::train")
  assert local == hub
  assert local[0].negatives == (data.Passage("d2", "", "not here"),)  # the empty negative was dropped
  assert local[1].query_id == "7" and local[1].positives[0].docid == "5" and local[1].positives[0].title == ""


def test_spec_expansion_and_passage_text():
  spec = data.expand_spec("{root}/train/{lang}-{lang_name}.{split}.jsonl", "/data", "sw", "dev")
  assert spec == "/data/train/sw-swahili.dev.jsonl"
  assert data.passage_text(data.Passage("d", "Title", "Body"), " ") == "Title Body"
  assert data.passage_text(data.Passage("d", "", "Body"), " ") == "Body"


def test_queries_and_qrels_from_positives(tmp_path):
  path = tmp_path / "dev.jsonl"
  path.write_text(json.dumps({"query_id": "q", "query": "z?", "positive_passages": [{"docid": "a", "title": "",
                                                                                    "text": ""}]}) + "\n")
  queries = data.read_queries(str(path))
  assert data.qrels_from_queries(queries) == {"q": {"a": 1}}
