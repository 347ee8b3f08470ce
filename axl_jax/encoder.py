"""The Flax bi-encoder: a BERT / XLM-RoBERTa-family Transformer plus pooling.

Parameter names follow the Hugging Face module tree (``embeddings/word_embeddings``,
``encoder/layer_0/attention/self/query``, ...) so that a table from HF names to this tree can load
real checkpoints (mBERT, XLM-R, mDPR, mContriever, mE5) without touching the module. Post-LN blocks,
learned absolute positions (offset by ``position_offset``: 0 for BERT, ``pad_token_id + 1`` = 2 for
XLM-R), optional token types, exact GELU, the family's LayerNorm epsilon.

Padding is always on the right and is described by sequence lengths, which is what the cuDNN flash
attention kernel wants; the XLA implementation builds the same mask from them. This module does not
tokenize, load checkpoints or know about training.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any


def _dense(features: int, config, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(config.initializer_range),
      name=name,
  )


def _layer_norm(config, name: str) -> nn.LayerNorm:
  # LayerNorm statistics in float32 even when the matmuls run in bfloat16.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32, name=name)


class SelfAttention(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, hidden, lengths, deterministic: bool):
    config = self.config
    batch, seq_len, _ = hidden.shape
    head_dim = config.hidden_size // config.num_heads
    shape = (batch, seq_len, config.num_heads, head_dim)
    query = _dense(config.hidden_size, config, "query")(hidden).reshape(shape)
    key = _dense(config.hidden_size, config, "key")(hidden).reshape(shape)
    value = _dense(config.hidden_size, config, "value")(hidden).reshape(shape)
    implementation = None if config.attention_impl == "auto" else config.attention_impl
    context = jax.nn.dot_product_attention(
        query,
        key,
        value,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )
    context = context.reshape(batch, seq_len, config.hidden_size)
    # HF applies dropout to the attention probabilities; the fused kernels do not expose them, so we
    # drop on the attention output instead (identical at inference, where parity matters).
    return nn.Dropout(config.attention_dropout)(context, deterministic=deterministic)


class TransformerLayer(nn.Module):
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, hidden, lengths, deterministic: bool):
    config = self.config
    dropout = functools.partial(nn.Dropout(config.hidden_dropout), deterministic=deterministic)
    context = SelfAttention(config, name="attention_self")(hidden, lengths, deterministic)
    attended = _dense(config.hidden_size, config, "attention_output_dense")(context)
    hidden = _layer_norm(config, "attention_output_LayerNorm")(dropout(attended) + hidden)
    intermediate = _dense(config.intermediate_size, config, "intermediate_dense")(hidden)
    intermediate = jax.nn.gelu(intermediate, approximate=False)
    output = _dense(config.hidden_size, config, "output_dense")(intermediate)
    return _layer_norm(config, "output_LayerNorm")(dropout(output) + hidden).astype(hidden.dtype)


class Transformer(nn.Module):
  """Embeddings plus ``num_layers`` post-LN blocks; returns the last hidden state [B, T, H]."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, input_ids, lengths, token_type_ids=None, deterministic: bool = True):
    config = self.config
    compute_dtype = jnp.dtype(config.dtype)
    embed = functools.partial(
        nn.Embed, features=config.hidden_size, param_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(config.initializer_range))
    seq_len = input_ids.shape[1]
    positions = jnp.arange(seq_len)[None, :] + config.position_offset
    hidden = embed(config.vocab_size, name="word_embeddings")(input_ids)
    hidden = hidden + embed(config.max_position_embeddings, name="position_embeddings")(positions)
    if config.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      hidden = hidden + embed(config.type_vocab_size, name="token_type_embeddings")(token_type_ids)
    hidden = _layer_norm(config, "embeddings_LayerNorm")(hidden)
    hidden = nn.Dropout(config.hidden_dropout)(hidden, deterministic=deterministic).astype(compute_dtype)
    layer_cls = TransformerLayer
    if config.remat:
      layer_cls = nn.remat(TransformerLayer, static_argnums=(3,))
    for index in range(config.num_layers):
      hidden = layer_cls(config, name=f"layer_{index}")(hidden, lengths, deterministic)
    return hidden


def pool(hidden, lengths, pooling: str):
  """CLS (first token) or mean over the first ``lengths`` tokens, in float32."""
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
    return jnp.einsum("bth,bt->bh", hidden, mask) / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)
  raise ValueError(f"model.pooling must be 'cls' or 'mean', got {pooling!r}")


class Encoder(nn.Module):
  """Transformer -> pooling -> optional projection -> optional L2 normalisation."""

  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, input_ids, lengths, token_type_ids=None, deterministic: bool = True):
    config = self.config
    hidden = Transformer(config, name="transformer")(input_ids, lengths, token_type_ids, deterministic)
    embedding = pool(hidden, lengths, config.pooling)
    if config.projection_dim:
      embedding = nn.Dense(config.projection_dim, dtype=jnp.float32, name="projection")(embedding)
    if config.normalize:
      embedding = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=-1, keepdims=True), 1e-12)
    return embedding


class BiEncoder(nn.Module):
  """Query and passage towers: one shared encoder (tied, the default) or two."""

  config: ml_collections.ConfigDict

  def setup(self):
    self.query_encoder = Encoder(self.config)
    if not self.config.tied:
      self.passage_encoder = Encoder(self.config)

  def encode_queries(self, input_ids, lengths, deterministic: bool = True):
    return self.query_encoder(input_ids, lengths, None, deterministic)

  def encode_passages(self, input_ids, lengths, deterministic: bool = True):
    encoder = self.query_encoder if self.config.tied else self.passage_encoder
    return encoder(input_ids, lengths, None, deterministic)

  def __call__(self, query_ids, query_lengths, passage_ids, passage_lengths, deterministic: bool = True):
    return (self.encode_queries(query_ids, query_lengths, deterministic),
            self.encode_passages(passage_ids, passage_lengths, deterministic))


def init_params(config: ml_collections.ConfigDict, rng: jax.Array):
  """Float32 parameters of a ``BiEncoder`` built from ``config`` (the ``model`` section)."""
  model = BiEncoder(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  lengths = jnp.full((1,), 8, jnp.int32)
  return model.init(rng, ids, lengths, ids, lengths)["params"]
