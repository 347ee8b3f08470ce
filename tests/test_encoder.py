"""The Flax encoder: padding never leaks into embeddings, pooling is what it says, options hold."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axl_jax import encoder
from tests.helpers import tiny_model_config


def _embed(config, ids, lengths, params=None, tower="passage"):
  model = encoder.BiEncoder(config)
  params = params if params is not None else encoder.init_params(config, jax.random.key(0))
  method = encoder.BiEncoder.encode_passages if tower == "passage" else encoder.BiEncoder.encode_queries
  return model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(lengths), method=method), params


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_embeddings(pooling):
  config = tiny_model_config(pooling=pooling)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 97, (3, 7)).astype(np.int32)
  lengths = np.array([7, 4, 1], np.int32)
  short, params = _embed(config, ids, lengths)
  padded = np.concatenate([ids, rng.integers(5, 97, (3, 9))], axis=1).astype(np.int32)  # junk after lengths
  long, _ = _embed(config, padded, lengths, params)
  np.testing.assert_allclose(short, long, atol=1e-5)
  # The junk inside the first 7 positions of the shorter rows must not matter either.
  ids_changed = ids.copy()
  ids_changed[1, 4:] = 3
  changed, _ = _embed(config, ids_changed, lengths, params)
  np.testing.assert_allclose(short, changed, atol=1e-5)


def test_mean_pooling_by_hand():
  hidden = jnp.asarray(np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2))
  pooled = encoder.pool(hidden, jnp.array([2, 3]), "mean")
  np.testing.assert_allclose(pooled, [[1.0, 2.0], [8.0, 9.0]])
  np.testing.assert_allclose(encoder.pool(hidden, jnp.array([2, 3]), "cls"), [[0.0, 1.0], [6.0, 7.0]])


def test_normalize_and_projection():
  config = tiny_model_config(projection_dim=8, normalize=True)
  embeddings, params = _embed(config, np.ones((2, 5), np.int32), np.array([5, 3], np.int32))
  assert embeddings.shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)
  assert "projection" in params["query_encoder"]


def test_untied_towers_have_their_own_parameters():
  config = tiny_model_config(tied=False)
  params = encoder.init_params(config, jax.random.key(0))
  assert set(params) == {"query_encoder", "passage_encoder"}
  ids, lengths = np.ones((1, 4), np.int32), np.array([4], np.int32)
  query, _ = _embed(config, ids, lengths, params, tower="query")
  passage, _ = _embed(config, ids, lengths, params, tower="passage")
  assert not np.allclose(query, passage)
  assert set(encoder.init_params(tiny_model_config(), jax.random.key(0))) == {"query_encoder"}


def test_remat_and_bfloat16_match_float32():
  rng = np.random.default_rng(1)
  ids = rng.integers(5, 97, (4, 12)).astype(np.int32)
  lengths = np.array([12, 9, 5, 2], np.int32)
  reference, params = _embed(tiny_model_config(), ids, lengths)
  remat, _ = _embed(tiny_model_config(remat=True), ids, lengths, params)
  np.testing.assert_allclose(reference, remat, atol=1e-6)
  half, _ = _embed(tiny_model_config(dtype="bfloat16"), ids, lengths, params)
  assert half.dtype == jnp.float32  # pooled output is float32 whatever the compute dtype
  np.testing.assert_allclose(reference, half, atol=0.05)  # bfloat16 has 8 bits of mantissa


def test_parameter_names_follow_the_hugging_face_tree():
  params = encoder.init_params(tiny_model_config(), jax.random.key(0))["query_encoder"]["transformer"]
  assert {"word_embeddings", "position_embeddings", "token_type_embeddings", "embeddings_LayerNorm",
          "layer_0", "layer_1"} <= set(params)
  assert set(params["layer_0"]) == {"attention_self", "attention_output_dense", "attention_output_LayerNorm",
                                    "intermediate_dense", "output_dense", "output_LayerNorm"}
  assert params["layer_0"]["attention_self"]["query"]["kernel"].shape == (16, 16)
