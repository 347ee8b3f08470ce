"""The Qwen2 / Qwen2.5 decoder in Flax, with an explicit KV cache, and its PyTorch-free loader.

RMSNorm, rotary embeddings (HF's rotate-half layout, ``rope_theta`` from the config), grouped-query
attention with q/k/v biases, SwiGLU MLP, tied or untied output embeddings. Parameter names mirror the
HF module tree (``layers_3/self_attn/q_proj``), so ``load`` needs one rule per kind of tensor.

The module is cache-in, cache-out: ``__call__`` writes the keys and values of its ``T`` new tokens at
``cache_index`` and attends over every valid slot, so one function serves prefill (T = prompt length)
and decode (T = 1). It does not sample or loop: see ``decode.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from axl_jax import hf_checkpoint


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  dtype: str = "float32"        # compute and weight dtype; norms and softmax stay float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, hf_config: dict, dtype: str = "float32") -> "Qwen2Config":
    if hf_config.get("model_type") not in ("qwen2",):
      raise ValueError(f"config.json: model_type {hf_config.get('model_type')!r} is not a Qwen2 checkpoint")
    if hf_config.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json: hidden_act {hf_config['hidden_act']!r} is not supported (Qwen2 uses silu)")
    _check_unscaled_rope(hf_config)
    return cls(vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
               intermediate_size=hf_config["intermediate_size"], num_layers=hf_config["num_hidden_layers"],
               num_heads=hf_config["num_attention_heads"],
               num_kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
               rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
               rope_theta=_rope_theta(hf_config),
               tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
               max_position_embeddings=hf_config.get("max_position_embeddings", 32768), dtype=dtype)


def _rope_sections(hf_config: dict) -> list[tuple[str, dict]]:
  """Every ``(field name, rope dict)`` of a config: ``rope_scaling`` (transformers 4) and ``rope_parameters``
  (transformers 5, either one dict or one per attention type, e.g. ``{"full_attention": {...}}``)."""
  sections = []
  for field in ("rope_scaling", "rope_parameters"):
    value = hf_config.get(field)
    if value is None:
      continue
    if not isinstance(value, dict):
      raise ValueError(f"config.json: {field} {value!r} is not a dict")
    if value and all(isinstance(entry, dict) for entry in value.values()):
      sections += [(f"{field}.{name}", entry) for name, entry in value.items()]
    else:
      sections.append((field, value))
  return sections


def _check_unscaled_rope(hf_config: dict) -> None:
  """Only plain RoPE is implemented: a yarn/linear/dynamic/llama3 config would load and then silently
  compute wrong angles, so it is refused. ``rope_type`` is the current key, ``type`` the older one."""
  for field, section in _rope_sections(hf_config):
    for key in ("rope_type", "type"):
      if section.get(key) not in (None, "default"):
        raise ValueError(f"config.json: {field}.{key} {section[key]!r} is not supported (only the default, "
                         f"unscaled RoPE is implemented); {field} = {section}")


def _rope_theta(hf_config: dict) -> float:
  """``rope_theta`` at the top level (transformers 4) or inside ``rope_parameters`` (transformers 5)."""
  if "rope_theta" in hf_config:
    return float(hf_config["rope_theta"])
  thetas = {float(section["rope_theta"]) for field, section in _rope_sections(hf_config)
            if field.startswith("rope_parameters") and "rope_theta" in section}
  if len(thetas) > 1:  # One rotary table serves every layer here.
    raise ValueError(f"config.json: rope_parameters has several rope_theta values {sorted(thetas)}")
  # transformers' Qwen2Config falls back to 10000 (not Qwen2.5's 1e6) when a config names no theta.
  return thetas.pop() if thetas else 10000.0


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before the weight multiply.
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rotary(x, positions, theta: float):
  """HF rotate-half rotary embedding of ``x`` [B, T, N, D] at integer ``positions`` [B, T]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]     # [B, T, 1, D]
  x32 = x.astype(jnp.float32)
  half = head_dim // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def _dense(features, config, name, bias):
  return nn.Dense(features, use_bias=bias, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.dtype),
                  name=name)


class Attention(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x, positions, cache_k, cache_v, cache_index, key_mask):
    config = self.config
    batch, length, _ = x.shape
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    q = _dense(heads * head_dim, config, "q_proj", True)(x).reshape(batch, length, heads, head_dim)
    k = _dense(kv_heads * head_dim, config, "k_proj", True)(x).reshape(batch, length, kv_heads, head_dim)
    v = _dense(kv_heads * head_dim, config, "v_proj", True)(x).reshape(batch, length, kv_heads, head_dim)
    q, k = rotary(q, positions, config.rope_theta), rotary(k, positions, config.rope_theta)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, cache_index, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, cache_index, 0, 0))
    # Grouped-query attention: each KV head serves `groups` query heads.
    groups = heads // kv_heads
    q = q.reshape(batch, length, kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, cache_k, preferred_element_type=jnp.float32) / np.sqrt(head_dim)
    slots = jnp.arange(cache_k.shape[1])
    causal = slots[None, :] <= cache_index + jnp.arange(length)[:, None]              # [T, S]
    mask = causal[None, None, None] & key_mask[:, None, None, None, :]                 # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(cache_v.dtype)
    context = jnp.einsum("bkgts,bskd->btkgd", weights, cache_v).reshape(batch, length, heads * head_dim)
    return _dense(config.hidden_size, config, "o_proj", False)(context), cache_k, cache_v


class MLP(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x):
    config = self.config
    gate = _dense(config.intermediate_size, config, "gate_proj", False)(x)
    up = _dense(config.intermediate_size, config, "up_proj", False)(x)
    return _dense(config.hidden_size, config, "down_proj", False)(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  config: Qwen2Config

  @nn.compact
  def __call__(self, x, positions, cache_k, cache_v, cache_index, key_mask):
    attended, cache_k, cache_v = Attention(self.config, name="self_attn")(
        RMSNorm(self.config.rms_norm_eps, name="input_layernorm")(x), positions, cache_k, cache_v, cache_index,
        key_mask)
    x = x + attended
    x = x + MLP(self.config, name="mlp")(RMSNorm(self.config.rms_norm_eps, name="post_attention_layernorm")(x))
    return x, cache_k, cache_v


class Qwen2(nn.Module):
  """``(logits [B, T, V] float32, cache_k, cache_v)`` for ``tokens`` [B, T] at ``positions`` [B, T].

  ``cache_k``/``cache_v``: [layers, B, slots, kv_heads, head_dim]; the new tokens are written at slots
  ``cache_index .. cache_index + T - 1``. ``key_mask`` [B, slots] marks the slots a query may attend to
  (prompt padding is False); causality within the new tokens is applied here.
  """

  config: Qwen2Config

  @nn.compact
  def __call__(self, tokens, positions, cache_k, cache_v, cache_index, key_mask):
    config = self.config
    embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                     param_dtype=jnp.dtype(config.dtype), name="embed_tokens")
    x = embed(tokens)
    new_k, new_v = [], []
    for layer in range(config.num_layers):
      x, layer_k, layer_v = DecoderLayer(config, name=f"layers_{layer}")(
          x, positions, cache_k[layer], cache_v[layer], cache_index, key_mask)
      new_k.append(layer_k)
      new_v.append(layer_v)
    x = RMSNorm(config.rms_norm_eps, name="norm")(x)
    if config.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = _dense(config.vocab_size, config, "lm_head", False)(x)
    return logits.astype(jnp.float32), jnp.stack(new_k), jnp.stack(new_v)


def init_cache(config: Qwen2Config, batch: int, slots: int):
  shape = (config.num_layers, batch, slots, config.num_kv_heads, config.head_dim)
  return jnp.zeros(shape, jnp.dtype(config.dtype)), jnp.zeros(shape, jnp.dtype(config.dtype))


def hf_name_to_path(name: str) -> tuple[tuple[str, ...], bool]:
  """HF tensor name -> (Flax path, transposed). ``model.layers.3.mlp.up_proj.weight`` -> layers_3/mlp/up_proj/kernel."""
  parts = name.split(".")
  if parts[0] == "model":
    parts = parts[1:]
  if parts[0] == "layers":
    parts = [f"layers_{parts[1]}"] + parts[2:]
  leaf = parts[-1]
  module = parts[:-1]
  if module[-1] == "embed_tokens":
    return tuple(module) + ("embedding",), False
  if module[-1].endswith("norm"):
    return tuple(module) + ("scale",), False
  return tuple(module) + ("kernel" if leaf == "weight" else "bias",), leaf == "weight"


def load(name_or_path: str, dtype: str = "float32"):
  """``(Qwen2Config, params)`` from a HF directory or hub id; weights cast to ``dtype`` (norms float32)."""
  directory = hf_checkpoint.resolve(name_or_path)
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as file:
    config = Qwen2Config.from_hf(json.load(file), dtype)
  expected = jax.eval_shape(lambda: Qwen2(config).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32),
      *init_cache(config, 1, 1), 0, jnp.ones((1, 1), bool))["params"])
  params: dict = {}
  unused = []
  for name, value in hf_checkpoint.read_safetensors(directory).items():
    if name == "lm_head.weight" and config.tie_word_embeddings:
      unused.append(name)
      continue
    path, transposed = hf_name_to_path(name)
    target = expected
    try:
      for key in path:
        target = target[key]
    except (KeyError, TypeError):
      unused.append(name)
      continue
    value = np.asarray(value).T if transposed else np.asarray(value)
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"tensor {name}: checkpoint shape {value.shape} != model shape {tuple(target.shape)}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(value, dtype=target.dtype)
  missing = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]
             if _get(params, p) is None]
  if missing:
    raise ValueError(f"{directory}: checkpoint is missing {len(missing)} tensors: {missing[:8]}")
  if unused:
    from absl import logging
    logging.info("Unused Qwen2 checkpoint tensors: %s", unused)
  return config, params


def _get(tree, path):
  for entry in path:
    if not isinstance(tree, dict) or entry.key not in tree:
      return None
    tree = tree[entry.key]
  return tree
