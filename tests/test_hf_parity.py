"""Hugging Face encoders load into the Flax encoder exactly, and trained encoders export back exactly.

Reference: ``transformers`` on PyTorch (a test-only dependency; axl_jax never imports torch).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from axl_jax import encoder, hf_checkpoint  # noqa: E402
from tests.helpers import tiny_model_config  # noqa: E402

LENGTHS = np.array([11, 7, 3, 1], np.int32)
BF16_TOLERANCE = 6e-2  # bfloat16 keeps 8 mantissa bits: ~4e-3 relative per op, two layers deep


def _hf_model(family, tmp_path):
  common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  torch.manual_seed(0)
  if family == "bert":
    model = transformers.BertModel(transformers.BertConfig(max_position_embeddings=64, type_vocab_size=2,
                                                           layer_norm_eps=1e-12, **common))
  else:
    model = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, **common))
  # Random init leaves LayerNorms at 1/0 and biases at 0: perturb them so every tensor is tested.
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        parameter.add_(0.1 * torch.randn_like(parameter))
  model.eval()
  directory = str(tmp_path / family)
  # XLM-R is saved in several shards, as large hub checkpoints are.
  model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB" if family != "bert" else "1GB")
  return model, directory


def _inputs(family):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, (len(LENGTHS), LENGTHS.max())).astype(np.int32)
  pad_id = 0 if family == "bert" else 1
  mask = np.arange(ids.shape[1])[None, :] < LENGTHS[:, None]
  ids = np.where(mask, ids, pad_id).astype(np.int32)
  token_types = np.zeros_like(ids)
  if family == "bert":
    token_types[:, 4:] = 1
    token_types = np.where(mask, token_types, 0)
  return ids, mask, token_types


def _torch_hidden(model, ids, mask, token_types):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.tensor(token_types, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _flax_hidden(config, transformer_params, ids, token_types, lengths=LENGTHS):
  return np.asarray(encoder.Transformer(config).apply({"params": transformer_params}, jnp.asarray(ids),
                                                       jnp.asarray(lengths), jnp.asarray(token_types)),
                    dtype=np.float32)


def _max_valid_difference(a, b, mask):
  return float(np.abs(a - b)[mask].max())


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_import_matches_transformers(family, tmp_path):
  model, directory = _hf_model(family, tmp_path)
  config, params = hf_checkpoint.load_encoder(directory, tiny_model_config(pooling="cls"))
  shards = [name for name in os.listdir(directory) if name.endswith(".safetensors")]
  assert (len(shards) == 1) if family == "bert" else (len(shards) > 1)
  assert config.num_layers == 2 and config.position_offset == (0 if family == "bert" else 2)
  ids, mask, token_types = _inputs(family)
  reference = _torch_hidden(model, ids, mask, token_types)
  hidden = _flax_hidden(config, params["query_encoder"]["transformer"], ids, token_types)
  assert _max_valid_difference(hidden, reference, mask) <= 1e-5

  for pooling in ("cls", "mean"):
    pooled_config = config.copy_and_resolve_references()
    pooled_config.pooling = pooling
    embeddings = np.asarray(encoder.Encoder(pooled_config).apply(
        {"params": params["query_encoder"]}, jnp.asarray(ids), jnp.asarray(LENGTHS), jnp.asarray(token_types)))
    expected = reference[:, 0] if pooling == "cls" else (reference * mask[..., None]).sum(1) / LENGTHS[:, None]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)

  half = config.copy_and_resolve_references()
  half.dtype = "bfloat16"
  hidden_bf16 = _flax_hidden(half, params["query_encoder"]["transformer"], ids, token_types)
  assert _max_valid_difference(hidden_bf16, reference, mask) <= BF16_TOLERANCE


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_import_matches_transformers_with_cudnn_attention(tmp_path):
  model, directory = _hf_model("bert", tmp_path)
  config, params = hf_checkpoint.load_encoder(directory, tiny_model_config())
  config.update(attention_impl="cudnn", dtype="bfloat16")
  ids, mask, token_types = _inputs("bert")
  hidden = _flax_hidden(config, params["query_encoder"]["transformer"], ids, token_types)
  assert _max_valid_difference(hidden, _torch_hidden(model, ids, mask, token_types), mask) <= BF16_TOLERANCE


def test_errors_name_the_problem(tmp_path):
  model, directory = _hf_model("bert", tmp_path)
  with pytest.raises(ValueError, match=r"tensor word_embeddings/embedding: checkpoint shape \(99, 32\) != encoder shape \(99, 16\)"):
    transformer = hf_checkpoint.hf_to_flax(hf_checkpoint.read_safetensors(directory),
                                           hf_checkpoint.model_config_from_hf(
                                               hf_checkpoint.read_hf_config(directory), tiny_model_config()))
    expected = encoder.init_params(tiny_model_config(hidden_size=16, vocab_size=99), jax.random.key(0))
    hf_checkpoint.check_shapes(transformer, expected["query_encoder"]["transformer"])
  os.remove(os.path.join(directory, "model.safetensors"))
  open(os.path.join(directory, "pytorch_model.bin"), "wb").close()
  with pytest.raises(FileNotFoundError, match="only pytorch_model.bin.*safe_serialization=True"):
    hf_checkpoint.load_encoder(directory, tiny_model_config())
  with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
    hf_checkpoint.load_encoder(str(tmp_path / "no-such-dir"), tiny_model_config())


def _texts():
  return ["the capital of france is paris", "東京は日本の首都です。", "short", "ঢাকা বাংলাদেশের রাজধানী।"]


@pytest.mark.parametrize("pooling, projection_dim, normalize", [("mean", 0, True), ("cls", 8, False)])
def test_export_round_trip_with_trained_tokenizer(tmp_path, pooling, projection_dim, normalize):
  sentence_transformers = pytest.importorskip("sentence_transformers")
  from axl_jax.tokenization import tokenize, train_tokenizer
  tokenizer = train_tokenizer(_texts() * 20, vocab_size=200, directory=str(tmp_path / "tokenizer"))
  config = tiny_model_config(vocab_size=len(tokenizer), pooling=pooling, projection_dim=projection_dim,
                             normalize=normalize, type_vocab_size=0)
  params = encoder.init_params(config, jax.random.key(3))
  directory = str(tmp_path / "exported")
  # The passage length of training, below the 64 positions the model has: sentence-transformers must
  # truncate where training did, not at the end of the position table.
  trained_length = 40
  hf_checkpoint.export_encoder(params["query_encoder"], config, tokenizer, directory, max_seq_length=trained_length)
  with open(os.path.join(directory, "sentence_bert_config.json")) as file:
    assert json.load(file)["max_seq_length"] == trained_length

  tokens = tokenize(tokenizer, _texts(), 32)
  lengths = np.array([len(t) for t in tokens], np.int32)
  ids = np.zeros((len(tokens), lengths.max()), np.int32)
  for row, t in enumerate(tokens):
    ids[row, :len(t)] = t
  ours = np.asarray(encoder.BiEncoder(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(lengths),
                                                    method=encoder.BiEncoder.encode_passages))

  hf_model = transformers.AutoModel.from_pretrained(directory).eval()
  mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]
  hidden = _torch_hidden(hf_model, ids, mask, np.zeros_like(ids))
  ours_hidden = _flax_hidden(config, params["query_encoder"]["transformer"], ids, np.zeros_like(ids), lengths)
  assert _max_valid_difference(hidden, ours_hidden, mask) <= 1e-5

  st_model = sentence_transformers.SentenceTransformer(directory, device="cpu")
  assert st_model.max_seq_length == trained_length
  theirs = st_model.encode(_texts(), convert_to_numpy=True)
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
  with open(os.path.join(directory, "1_Pooling", "config.json")) as file:
    assert json.load(file)[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'mean_tokens'}"]


def test_export_refuses_a_length_the_model_cannot_take(tmp_path):
  config = tiny_model_config(type_vocab_size=0)
  params = encoder.init_params(config, jax.random.key(0))
  for bad in (0, 65, 64.0, None):
    with pytest.raises(ValueError, match=rf"max_seq_length {bad!r} must be an integer in 1\.\.64"):
      hf_checkpoint.export_encoder(params["query_encoder"], config, None, str(tmp_path / "bad"), max_seq_length=bad)
  assert not os.path.exists(str(tmp_path / "bad"))
  with pytest.raises(TypeError, match="max_seq_length"):  # no default that could hide a forgotten length
    hf_checkpoint.export_encoder(params["query_encoder"], config, None, str(tmp_path / "bad"))


def test_pipeline_starts_from_init_from_and_exports_it_back(tmp_path):
  """model.init_from -> a training stage at learning rate 0 -> export_hf gives back the same tensors."""
  import subprocess
  import sys
  from axl_jax.tokenization import train_tokenizer
  from tests.helpers import REPO
  directory = str(tmp_path / "hf")
  tokenizer = train_tokenizer(_texts() * 20, vocab_size=120, directory=directory + "-tokenizer")
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
      max_position_embeddings=128, type_vocab_size=2, hidden_act="gelu"))
  model.save_pretrained(directory, safe_serialization=True)
  tokenizer.save_pretrained(directory)
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
             "--config.stages=finetune,export_hf", f"--config.model.init_from={directory}",
             f"--config.tokenizer.name_or_path={directory}", "--config.finetune.learning_rate=0",
             "--config.finetune.num_steps=2", "--config.model.pooling=cls", "--config.model.normalize=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "finetune", "manifest.json")) as file:
    manifest = json.load(file)
  assert manifest["metrics"]["initialised_from"] == directory
  assert manifest["config"]["model"]["hidden_size"] == 24  # the checkpoint's architecture, not tiny.py's
  exported = hf_checkpoint.read_safetensors(os.path.join(workdir, "export_hf", "model"))
  original = hf_checkpoint.read_safetensors(directory)
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)
  assert set(original) - set(exported) == {"pooler.dense.weight", "pooler.dense.bias"}
