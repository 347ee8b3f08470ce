"""The contrastive loss over all passages on all devices (Tevatron's JAX loss, per device).

Each device holds ``q`` queries and their ``q * n`` passages (positive first in each group). Passage
embeddings are all-gathered over ``axis_name``, so every query is scored against every passage of the
global batch; its label is its own positive, offset by the device's position in the gathered array.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def contrastive_loss(query_embeddings, passage_embeddings, temperature: float = 1.0, axis_name=None):
  """Mean softmax cross-entropy of this device's queries; returns ``(loss, accuracy)``."""
  num_queries = query_embeddings.shape[0]
  group_size = passage_embeddings.shape[0] // num_queries
  offset = 0
  all_passages = passage_embeddings
  if axis_name is not None:
    all_passages = jax.lax.all_gather(passage_embeddings, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * passage_embeddings.shape[0]
  scores = jnp.einsum("qd,pd->qp", query_embeddings, all_passages,
                      preferred_element_type=jnp.float32) / temperature
  labels = offset + jnp.arange(num_queries) * group_size
  losses = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
  accuracy = jnp.mean(jnp.argmax(scores, axis=-1) == labels)
  return jnp.mean(losses), accuracy
