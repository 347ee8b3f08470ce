"""The JAX Qwen2 decoder against ``transformers``: logits on a padded batch, greedy generation (with a row
that ends early), nucleus sampling against HF's top-p semantics, config checks and the hub download."""
import fnmatch
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from axl_jax import hf_checkpoint  # noqa: E402
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


def _greedy_free_run(params, config, max_new_tokens):
  """Greedy tokens of every prompt with no end id at all (each row runs to ``max_new_tokens``)."""
  return decode.generate_ids(params, config, PROMPTS, max_new_tokens=max_new_tokens, eos_ids=[-1], pad_id=PAD,
                             prompt_bucket=8)


def test_finished_rows_leave_the_batch_without_changing_any_row(tmp_path, monkeypatch):
  # Sampling (per-row keys): six prompts, end ids that four of them sample early; decoding 2 steps a call lets
  # the batch shrink to the rows still going, and every row's tokens equal those of one call with no shrinking.
  _, directory = _hf_model(tmp_path, tie=True)
  config, params = qwen2.load(directory)
  prompts = PROMPTS * 2
  kwargs = dict(max_new_tokens=12, pad_id=PAD, prompt_bucket=8, temperature=1.0, top_p=0.9, seed=3, min_batch=1)
  free = decode.generate_ids(params, config, prompts, eos_ids=[-1], segment=12, **kwargs)
  assert len({tuple(row) for row in free}) == 6  # the same prompt twice samples differently (its own key)
  decode_steps, sizes = decode.decode_steps, []
  monkeypatch.setattr(decode, "decode_steps", lambda *args, **kw: sizes.append(args[4].shape[0]) or decode_steps(
      *args, **kw))
  shrunk_somewhere = False
  for step in range(1, 5):
    ends = sorted({free[row][step] for row in range(4)} - set(free[4]) - set(free[5]))
    whole = decode.generate_ids(params, config, prompts, eos_ids=ends, segment=12, **kwargs)
    sizes.clear()
    shrunk = decode.generate_ids(params, config, prompts, eos_ids=ends, segment=2, **kwargs)
    assert shrunk == whole
    assert whole[4] == free[4] and whole[5] == free[5]  # rows that never meet an end id run to the end
    shrunk_somewhere |= min(sizes) < 6
  assert shrunk_somewhere


def test_row_that_ends_early_is_padded_and_others_continue(tmp_path):
  model, directory = _hf_model(tmp_path, tie=False)
  config, params = qwen2.load(directory)
  steps = 12
  free = _greedy_free_run(params, config, steps)
  # An end id one row emits within its first few tokens and no other row emits at all: that row must stop
  # there while the others run the full length.
  early_row, early_step, eos = next(
      (row, step, free[row][step]) for row in range(len(PROMPTS)) for step in range(2, 5)
      if free[row][step] not in free[row][:step] and free[row][step] != PAD
      and all(free[row][step] not in other for index, other in enumerate(free) if index != row))

  length = max(len(p) for p in PROMPTS)
  tokens, mask = decode.left_pad(PROMPTS, length, PAD)
  with torch.no_grad():
    reference = model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                               attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=steps,
                               do_sample=False, eos_token_id=eos, pad_token_id=PAD).numpy()[:, length:]
  assert reference.shape == (len(PROMPTS), steps)  # the other rows kept HF generating to the end

  cache_k, cache_v, key_mask, logits, positions = decode.prefill(params, jnp.asarray(tokens), jnp.asarray(mask),
                                                                 config=config, slots=length + steps)
  output, lengths, _, _ = decode.decode(params, cache_k, cache_v, key_mask, logits, positions,
                                        decode.row_keys(0, range(len(PROMPTS))),
                                        jnp.asarray([eos], jnp.int32), jnp.int32(PAD), config=config,
                                        max_new_tokens=steps, temperature=0.0, top_p=1.0)
  output, lengths = np.asarray(output), np.asarray(lengths)
  np.testing.assert_array_equal(output, reference)  # token for token, pads included
  assert output[early_row, early_step] == eos
  assert (output[early_row, early_step + 1:] == PAD).all()
  assert lengths[early_row] == early_step + 1
  for row in range(len(PROMPTS)):
    if row != early_row:
      assert lengths[row] == steps and output[row].tolist() == free[row]
  ours = decode.generate_ids(params, config, PROMPTS, max_new_tokens=steps, eos_ids=[eos], pad_id=PAD,
                             prompt_bucket=8)
  assert ours[early_row] == free[early_row][:early_step + 1]
  assert [row for index, row in enumerate(ours) if index != early_row] == \
      [row for index, row in enumerate(free) if index != early_row]


def _nucleus_reference(logits, top_p):
  """HF ``TopPLogitsWarper`` in numpy (float64): sort ascending, drop tokens whose cumulative probability,
  counted from the least probable, is <= 1 - top_p; the most probable token always stays."""
  logits = np.asarray(logits, np.float64)
  order = np.argsort(logits, axis=-1, kind="stable")
  sorted_logits = np.take_along_axis(logits, order, axis=-1)
  probs = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  remove_sorted = np.cumsum(probs, axis=-1) <= 1 - top_p
  remove_sorted[:, -1] = False
  remove = np.zeros_like(remove_sorted)
  np.put_along_axis(remove, order, remove_sorted, axis=-1)
  return ~remove


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.75, 0.9, 0.95])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_top_p_keeps_the_hf_nucleus(top_p, temperature):
  from transformers.generation.logits_process import TopPLogitsWarper
  rng = np.random.default_rng(7)
  logits = (rng.normal(size=(64, 50)) * 2.0).astype(np.float32)
  scaled = logits / np.float32(temperature)
  kept = _nucleus_reference(scaled, top_p)
  # The reference is HF's rule: check it against HF's own warper on the same scores.
  hf = TopPLogitsWarper(top_p)(None, torch.tensor(scaled)).numpy()
  np.testing.assert_array_equal(np.isfinite(hf), kept)
  # A p that matters: every row loses tokens, and above the smallest p some rows keep several.
  assert (kept.sum(-1) < logits.shape[1]).all() and ((kept.sum(-1) > 1).any() or top_p < 0.1)
  # No row's cumulative mass lies within float32 rounding of p, so a mismatch is a real one.
  probs = np.sort(np.exp(scaled.astype(np.float64) - scaled.max(-1, keepdims=True)), axis=-1)[:, ::-1]
  probs /= probs.sum(-1, keepdims=True)
  assert np.abs(np.cumsum(probs, axis=-1) - top_p).min() > 1e-5
  ours = np.asarray(decode.top_p_filter(jnp.asarray(scaled), top_p))
  np.testing.assert_array_equal(np.isfinite(ours), kept)
  np.testing.assert_array_equal(ours[kept], scaled[kept])  # kept logits are unchanged


def test_top_p_one_keeps_every_token():
  # The tail's float32 cumulative probability already rounds to 1 after the first token; HF does not
  # filter at top_p = 1, so nothing may be dropped.
  logits = jnp.asarray([[30.0, 0.0, -1.0, -2.0]])
  assert np.isfinite(np.asarray(decode.top_p_filter(logits, 1.0))).all()


def _draws(logits, top_p, temperature, count):
  """``count`` tokens sampled from the same logits, each row with its own key."""
  tiled = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (count, 1))
  return np.asarray(decode.sample(tiled, jax.random.key(11), temperature, top_p))


def test_top_p_samples_only_the_nucleus_at_its_renormalised_frequencies():
  # Scrambled so that token order is not probability order.
  probs = np.array([0.06, 0.25, 0.04, 0.4, 0.1, 0.15])
  logits = np.log(probs)
  top_p, count = 0.75, 40000
  nucleus = _nucleus_reference(logits[None], top_p)[0]
  assert nucleus.tolist() == [False, True, False, True, False, True]  # 0.4 + 0.25 + 0.15 >= 0.75 > 0.65
  draws = _draws(logits, top_p, 1.0, count)
  assert set(np.unique(draws)) <= set(np.flatnonzero(nucleus))
  expected = np.where(nucleus, probs, 0.0) / probs[nucleus].sum()
  frequencies = np.bincount(draws, minlength=len(probs)) / count
  tolerance = 5 * np.sqrt(expected * (1 - expected) / count)  # five standard errors per token
  assert (np.abs(frequencies - expected) <= tolerance).all(), (frequencies, expected)
  # A second seed gives other draws: the keys, not the filter, pick among the nucleus.
  assert not np.array_equal(draws, np.asarray(decode.sample(
      jnp.tile(jnp.asarray(logits, jnp.float32)[None], (count, 1)), jax.random.key(12), 1.0, top_p)))


def test_top_p_below_the_top_probability_is_greedy():
  probs = np.array([0.03, 0.02, 0.85, 0.06, 0.04])
  logits = np.log(probs)
  for top_p in (0.5, 0.84):
    assert _nucleus_reference(logits[None], top_p)[0].tolist() == [False, False, True, False, False]
    assert (_draws(logits, top_p, 1.0, 2000) == 2).all()
  # Just above the top probability the runner-up joins, and is drawn.
  assert set(np.unique(_draws(logits, 0.86, 1.0, 2000))) == {2, 3}


_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _hub_repo(tmp_path):
  """A directory laid out like a current Qwen hub repo: sharded weights, the chat template in its own
  chat_template.jinja (not in tokenizer_config.json), slow-tokenizer files and a torch copy."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  model, _ = _hf_model(tmp_path, tie=False)
  repo = str(tmp_path / "hub-repo")
  model.save_pretrained(repo, safe_serialization=True, max_shard_size="60KB")
  words = ["user", "assistant", "hello", "[UNK]"]
  tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.add_special_tokens(_SPECIAL)
  tokenizer.save(os.path.join(repo, "tokenizer.json"))
  with open(os.path.join(repo, "tokenizer_config.json"), "w", encoding="utf-8") as file:
    json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, file)
  with open(os.path.join(repo, "chat_template.jinja"), "w", encoding="utf-8") as file:
    file.write(_CHAT_TEMPLATE)
  for name in ("vocab.json", "merges.txt", "pytorch_model.bin", "README.md"):
    open(os.path.join(repo, name), "w").close()
  return repo, tokenizer


def test_hub_download_patterns_cover_every_file_the_generator_reads(tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub.utils import filter_repo_objects
  from axl_jax.negatives.chat import ChatTokenizer
  repo, tokenizer = _hub_repo(tmp_path)
  shards = sorted(name for name in os.listdir(repo) if name.endswith(".safetensors"))
  assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(repo)
  calls = []

  def snapshot_download(repo_id, allow_patterns=None, **kwargs):
    # The hub's own filter decides which files come down, as snapshot_download does.
    calls.append((repo_id, list(allow_patterns)))
    snapshot = str(tmp_path / "snapshot")
    shutil.rmtree(snapshot, ignore_errors=True)
    os.makedirs(snapshot)
    for name in filter_repo_objects(sorted(os.listdir(repo)), allow_patterns=allow_patterns):
      shutil.copy(os.path.join(repo, name), snapshot)
    return snapshot

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  snapshot = hf_checkpoint.resolve("Qwen/Tiny-Instruct")
  patterns = calls[-1][1]
  needed = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
  for name in needed:
    assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), (name, patterns)
  assert not any(fnmatch.fnmatch("pytorch_model.bin", pattern) for pattern in patterns)
  assert set(shards) | {"config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= \
      set(os.listdir(snapshot))

  # The generator starts from the download alone: weights, end ids and the separate chat template.
  config, _ = qwen2.load("Qwen/Tiny-Instruct")
  assert config.num_layers == 2
  chat = ChatTokenizer(hf_checkpoint.resolve("Qwen/Tiny-Instruct"))
  ids = {token: tokenizer.token_to_id(token) for token in _SPECIAL + ["user", "hello", "assistant"]}
  assert chat.end_ids() == sorted([ids["<|im_end|>"], ids["<|endoftext|>"]])
  assert chat.prompt_ids([{"role": "user", "content": "hello"}]) == [
      ids["<|im_start|>"], ids["user"], ids["hello"], ids["<|im_end|>"], ids["<|im_start|>"], ids["assistant"]]


def _config_json(**rope):
  base = {"model_type": "qwen2", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
  return {**base, **rope}


@pytest.mark.parametrize("rope, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling\.type 'linear'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     r"rope_scaling\.rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     r"rope_parameters\.rope_type 'yarn'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}}},
     r"rope_parameters\.full_attention\.rope_type 'dynamic'"),
])
def test_scaled_rope_is_refused_under_every_key(tmp_path, rope, message):
  with pytest.raises(ValueError, match=r"config\.json: " + message + " is not supported"):
    qwen2.Qwen2Config.from_hf(_config_json(**rope))
  # The same through the loader, from a saved checkpoint whose config.json says so.
  _, directory = _hf_model(tmp_path, tie=True)
  path = os.path.join(directory, "config.json")
  with open(path, encoding="utf-8") as file:
    saved = json.load(file)
  saved.pop("rope_parameters", None)
  with open(path, "w", encoding="utf-8") as file:
    json.dump({**saved, **rope}, file)
  with pytest.raises(ValueError, match=r"config\.json: " + message):
    qwen2.load(directory)


@pytest.mark.parametrize("rope, theta", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, 500000.0),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 250000.0}}}, 250000.0),
    ({"rope_scaling": {"rope_type": "default"}, "rope_theta": 1000000.0}, 1000000.0),
    ({"rope_scaling": {"type": "default"}, "rope_theta": 20000.0}, 20000.0),
    ({"rope_scaling": None, "rope_theta": 1000000.0}, 1000000.0),  # Qwen2.5-3B-Instruct's own config
    ({}, transformers.Qwen2Config().rope_parameters["rope_theta"]),  # no theta: transformers' default
])
def test_default_rope_keeps_its_theta(rope, theta):
  assert qwen2.Qwen2Config.from_hf(_config_json(**rope)).rope_theta == theta


def test_saved_transformers_config_gives_its_theta(tmp_path):
  # transformers 5 writes the theta only inside rope_parameters; the logits test relies on reading it.
  _, directory = _hf_model(tmp_path, tie=True)
  with open(os.path.join(directory, "config.json"), encoding="utf-8") as file:
    saved = json.load(file)
  config, _ = qwen2.load(directory)
  assert config.rope_theta == 10000.0
  if "rope_theta" not in saved:
    assert saved["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
