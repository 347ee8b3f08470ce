"""Batched generation with a KV cache: a jitted prefill, then a jitted ``lax.while_loop`` decode.

Prompts of different lengths share a batch by left padding (as HF generate does): position ids count
only real tokens and padded slots are never attended to. The decode loop writes one token per step
into the donated cache, samples greedily or with temperature + top-p from each row's own seeded key, and
stops a row at an end-of-turn id; the loop ends when every row has stopped or its steps are done.
``generate_ids`` decodes a segment of steps per call and drops finished rows between calls.
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


@functools.partial(jax.jit, static_argnames=("config", "steps", "temperature", "top_p"),
                   donate_argnames=("cache_k", "cache_v"))
def decode_steps(params, cache_k, cache_v, key_mask, logits, positions, row_keys, done, start, first_slot, eos_ids,
                 pad_id, *, config: Qwen2Config, steps: int, temperature: float, top_p: float):
  """Up to ``steps`` new tokens per row, generation steps ``start`` .. ``start + steps - 1``; stops early when
  every row is done. Returns ``(tokens [B, steps], emitted [B], done, cache_k, cache_v, key_mask, logits,
  positions)``: a row's tokens are pad after it stops; ``emitted`` counts its tokens up to its end id included.

  Each row samples from its own key (``row_keys``, folded with the step), so a row's tokens do not depend on
  which other rows share its batch: a batch can drop its finished rows between calls.
  """
  batch = logits.shape[0]
  model = Qwen2(config)

  def cond(state):
    step, *_, done = state
    return (step < steps) & ~jnp.all(done)

  def body(state):
    step, cache_k, cache_v, key_mask, logits, positions, output, emitted, done = state
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, start + step)
    sampled = jax.vmap(lambda row_logits, key: sample(row_logits[None], key, temperature, top_p)[0])(logits, keys)
    token = jnp.where(done, pad_id, sampled)
    output = output.at[:, step].set(token)
    emitted = emitted + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, eos_ids)
    slot = first_slot + start + step
    key_mask = key_mask.at[:, slot].set(True)
    logits, cache_k, cache_v = model.apply({"params": params}, token[:, None], positions[:, None], cache_k, cache_v,
                                           slot, key_mask)
    return step + 1, cache_k, cache_v, key_mask, logits[:, 0], positions + 1, output, emitted, done

  state = (jnp.int32(0), cache_k, cache_v, key_mask, logits, positions, jnp.full((batch, steps), pad_id, jnp.int32),
           jnp.zeros((batch,), jnp.int32), done)
  step, cache_k, cache_v, key_mask, logits, positions, output, emitted, done = jax.lax.while_loop(cond, body, state)
  return output, emitted, done, cache_k, cache_v, key_mask, logits, positions


def row_keys(seed: int, rows) -> jax.Array:
  """One sampling key per prompt: ``seed`` folded with the prompt's index."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.asarray(rows, jnp.int32))


def decode(params, cache_k, cache_v, key_mask, logits, positions, keys, eos_ids, pad_id, *, config: Qwen2Config,
           max_new_tokens: int, temperature: float, top_p: float):
  """``(tokens [B, max_new_tokens], lengths [B], cache_k, cache_v)`` of one call to ``decode_steps`` from the
  prefill (``keys``: ``row_keys``); the cache comes back so its donated buffers can be reused."""
  output, emitted, _, cache_k, cache_v, *_ = decode_steps(
      params, cache_k, cache_v, key_mask, logits, positions, keys, jnp.zeros((logits.shape[0],), bool),
      jnp.int32(0), jnp.int32(key_mask.shape[1] - max_new_tokens), eos_ids, pad_id, config=config,
      steps=max_new_tokens, temperature=temperature, top_p=top_p)
  return output, emitted, cache_k, cache_v


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
                 prompt_bucket: int = 64, segment: int = 32, min_batch: int = 8) -> list[list[int]]:
  """New token ids for each prompt (end id included when one was produced).

  Decodes ``segment`` steps per call; between calls, once at most half the batch is still generating, the
  finished rows leave it: the cache and state of the others are gathered into a batch of the next power of
  two (not below ``min_batch``), so long answers do not drag finished rows along. A prompt's tokens do not
  depend on the batch it shares (per-row keys), so the result is the same with or without shrinking.
  """
  longest = max(len(p) for p in prompts)
  length = -(-longest // prompt_bucket) * prompt_bucket  # Bucketed so few prompt lengths compile.
  tokens, mask = left_pad(prompts, length, pad_id)
  cache_k, cache_v, key_mask, logits, positions = prefill(params, tokens, mask, config=config,
                                                          slots=length + max_new_tokens)
  rows = np.arange(len(prompts))  # the prompt in each batch slot (-1: a finished filler)
  keys, done = row_keys(seed, rows), jnp.zeros((len(prompts),), bool)
  eos, pad = jnp.asarray(eos_ids, jnp.int32), jnp.int32(pad_id)
  outputs: list[list[int]] = [[] for _ in prompts]
  step = 0
  while step < max_new_tokens:
    steps = min(segment, max_new_tokens - step)
    new, emitted, done, cache_k, cache_v, key_mask, logits, positions = decode_steps(
        params, cache_k, cache_v, key_mask, logits, positions, keys, done, jnp.int32(step), jnp.int32(length),
        eos, pad, config=config, steps=steps, temperature=float(temperature), top_p=float(top_p))
    new, emitted, finished = np.asarray(new), np.asarray(emitted), np.asarray(done)
    for slot, row in enumerate(rows):
      if row >= 0:
        outputs[row].extend(new[slot, :emitted[slot]].tolist())
    step += steps
    active = np.flatnonzero(~finished & (rows >= 0))
    if not active.size:
      break
    size = max(min_batch, 1 << int(active.size - 1).bit_length())
    if size <= len(rows) // 2:  # shrink: the active rows, then finished fillers up to a power of two
      filler = np.flatnonzero(finished)[:1]
      keep = np.concatenate([active, np.repeat(filler, size - active.size)])
      cache_k, cache_v = cache_k[:, keep], cache_v[:, keep]
      key_mask, logits, positions, keys, done = (x[keep] for x in (key_mask, logits, positions, keys, done))
      rows = np.concatenate([rows[active], np.full(size - active.size, -1)])
  return outputs
