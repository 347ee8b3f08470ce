"""Batched generation with a KV cache: a jitted prefill, then a jitted ``lax.while_loop`` decode.

Prompts of different lengths share a batch by left padding (as HF generate does): position ids count
only real tokens and padded slots are never attended to. The decode loop writes one token per step
into the donated cache, samples greedily or with temperature + top-p from a seeded key, and stops a
row at an end-of-turn id; the loop ends when every row has stopped or ``max_new_tokens`` is reached.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from axl_jax.negatives.qwen2 import Qwen2, Qwen2Config, init_cache


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def prefill(params, tokens, prompt_mask, *, config: Qwen2Config, slots: int):
  """Runs the prompt; returns the cache state and the logits of each row's last prompt token."""
  batch, length = tokens.shape
  cache_k, cache_v = init_cache(config, batch, slots)
  key_mask = jnp.zeros((batch, slots), bool).at[:, :length].set(prompt_mask)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
  logits, cache_k, cache_v = Qwen2(config).apply({"params": params}, tokens, positions, cache_k, cache_v, 0,
                                                 key_mask)
  return cache_k, cache_v, key_mask, logits[:, -1], positions[:, -1] + 1


def top_p_filter(logits, top_p: float):
  """``logits`` [B, V] with every token outside the nucleus set to -inf (HF ``TopPLogitsWarper``).

  The nucleus is the smallest set of most probable tokens whose probabilities sum to at least
  ``top_p``: a token stays when the tokens ranked above it hold less than ``top_p``, so the top token
  always stays. Tokens tied with the least probable kept one all stay (HF keeps an arbitrary subset).
  """
  if top_p >= 1.0:
    # HF skips the warper at top_p = 1. Filtering anyway would drop the far tail, whose float32
    # cumulative sum already rounds to 1.0.
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, rng, temperature: float, top_p: float):
  """Greedy when ``temperature == 0``; else temperature, then nucleus (top-p) sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = top_p_filter(logits / temperature, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_p"),
                   donate_argnames=("cache_k", "cache_v"))
def decode(params, cache_k, cache_v, key_mask, logits, positions, rng, eos_ids, pad_id, *, config: Qwen2Config,
           max_new_tokens: int, temperature: float, top_p: float):
  """``(tokens [B, max_new_tokens], lengths [B], cache_k, cache_v)``: new tokens (pad after a row stops),
  end id included. The cache comes back so its donated buffers are updated in place (and can be reused)."""
  batch = logits.shape[0]
  first_slot = key_mask.shape[1] - max_new_tokens
  model = Qwen2(config)

  def cond(state):
    step, *_, done, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache_k, cache_v, key_mask, logits, positions, output, lengths, done, rng = state
    rng, step_rng = jax.random.split(rng)
    token = jnp.where(done, pad_id, sample(logits, step_rng, temperature, top_p))
    output = output.at[:, step].set(token)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    slot = first_slot + step
    key_mask = key_mask.at[:, slot].set(True)
    logits, cache_k, cache_v = model.apply({"params": params}, token[:, None], positions[:, None], cache_k, cache_v,
                                           slot, key_mask)
    return step + 1, cache_k, cache_v, key_mask, logits[:, 0], positions + 1, output, lengths, done, rng

  state = (jnp.int32(0), cache_k, cache_v, key_mask, logits, positions,
           jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch,), bool), rng)
  state = jax.lax.while_loop(cond, body, state)
  return state[6], state[7], state[1], state[2]


def left_pad(sequences: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), bool)
  for row, sequence in enumerate(sequences):
    sequence = sequence[-length:]
    tokens[row, length - len(sequence):] = sequence
    mask[row, length - len(sequence):] = True
  return tokens, mask


def generate_ids(params, config: Qwen2Config, prompts: list[list[int]], *, max_new_tokens: int, eos_ids: list[int],
                 pad_id: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 prompt_bucket: int = 64) -> list[list[int]]:
  """New token ids for each prompt (end id included when one was produced)."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // prompt_bucket) * prompt_bucket  # Bucketed so few prompt lengths compile.
  tokens, mask = left_pad(prompts, length, pad_id)
  cache_k, cache_v, key_mask, logits, positions = prefill(params, tokens, mask, config=config,
                                                          slots=length + max_new_tokens)
  output, lengths, _, _ = decode(params, cache_k, cache_v, key_mask, logits, positions, jax.random.key(seed),
                           jnp.asarray(eos_ids, jnp.int32), jnp.int32(pad_id), config=config,
                           max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p))
  output, lengths = np.asarray(output), np.asarray(lengths)
  return [output[row, :lengths[row]].tolist() for row in range(len(prompts))]
