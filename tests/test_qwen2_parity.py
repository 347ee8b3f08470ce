"""The JAX Qwen2 decoder against ``transformers``: logits on a padded batch, and greedy generation."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from axl_jax.negatives import decode, qwen2  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [77, 12, 9, 100], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
EOS, PAD = 126, 127


def _hf_model(tmp_path, tie):
  torch.manual_seed(1)
  config = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                                    eos_token_id=EOS, pad_token_id=PAD)
  model = transformers.Qwen2ForCausalLM(config)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        parameter.add_(0.2 * torch.randn_like(parameter))
      else:
        parameter.mul_(8.0)  # larger weights: sharper, tie-free argmaxes for the generation test
  model.eval()
  directory = str(tmp_path / f"qwen-tie{tie}")
  model.save_pretrained(directory, safe_serialization=True)
  return model, directory


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers(tmp_path, tie):
  model, directory = _hf_model(tmp_path, tie)
  config, params = qwen2.load(directory)
  assert config.tie_word_embeddings == tie and config.num_kv_heads == 2
  length = max(len(p) for p in PROMPTS)
  tokens, mask = decode.left_pad(PROMPTS, length, PAD)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    reference = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long),
                      position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  cache_k, cache_v = qwen2.init_cache(config, len(PROMPTS), length)
  logits, _, _ = qwen2.Qwen2(config).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                           cache_k, cache_v, 0, jnp.asarray(mask))
  difference = np.abs(np.asarray(logits) - reference)[mask]
  assert difference.max() <= 1e-4


def test_greedy_generation_matches_transformers_generate(tmp_path):
  model, directory = _hf_model(tmp_path, tie=False)
  config, params = qwen2.load(directory)
  length = max(len(p) for p in PROMPTS)
  tokens, mask = decode.left_pad(PROMPTS, length, PAD)
  with torch.no_grad():
    output = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=20,
                            do_sample=False, eos_token_id=EOS, pad_token_id=PAD).numpy()[:, length:]
  expected = []
  for row in output:
    row = row.tolist()
    expected.append(row[:row.index(EOS) + 1] if EOS in row else row)
  ours = decode.generate_ids(params, config, PROMPTS, max_new_tokens=20, eos_ids=[EOS], pad_id=PAD,
                             prompt_bucket=8)
  assert ours == expected
  assert max(len(row) for row in ours) == 20 or any(row[-1] == EOS for row in ours)


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(tmp_path):
  _, directory = _hf_model(tmp_path, tie=True)
  config, params = qwen2.load(directory)
  kwargs = dict(max_new_tokens=12, eos_ids=[EOS], pad_id=PAD, prompt_bucket=8)
  first = decode.generate_ids(params, config, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kwargs)
  again = decode.generate_ids(params, config, PROMPTS, temperature=1.0, top_p=0.9, seed=3, **kwargs)
  other = decode.generate_ids(params, config, PROMPTS, temperature=1.0, top_p=0.9, seed=4, **kwargs)
  assert first == again and first != other
  # A nucleus so small that only the top token survives is greedy decoding.
  assert decode.generate_ids(params, config, PROMPTS, temperature=1.0, top_p=1e-6, seed=5, **kwargs) == \
      decode.generate_ids(params, config, PROMPTS, **kwargs)
