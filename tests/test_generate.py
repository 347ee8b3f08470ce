"""The negatives subprocess: records and counts, no torch in the process, and kill-and-restart safety."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from axl_jax.negatives import prompts
from tests.helpers import REPO

QWEN_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
BASE = ["--config=tests/configs/tiny.py", "--config.generator.languages=bn,th",
        "--config.generator.max_queries_per_language=10"]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _records(output):
  from axl_jax.negatives.records import read_records
  return read_records(output)


@pytest.mark.parametrize("backend", ["rules", "qwen"])
def test_generation_runs_in_a_torch_free_process(tmp_path, backend):
  output = str(tmp_path / "negatives")
  extra = ["--config.generator.backend=rules"]
  if backend == "qwen":
    _tiny_qwen(str(tmp_path / "qwen"))
    extra = _qwen_command(output, str(tmp_path / "qwen"))[4 + len(BASE):] + ["--config.generator.shard_size=64"]
  argv = ["generate", f"--output={output}", *BASE, *extra]
  code = ("import runpy, sys\n"
          f"sys.argv = {argv!r}\n"
          "try:\n  runpy.run_module('axl_jax.negatives.generate', run_name='__main__')\n"
          "except SystemExit as exit:\n  assert not exit.code, exit.code\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "print('TORCH-FREE')\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "TORCH-FREE" in result.stdout
  records = _records(output)
  queries = 10 if backend == "rules" else 6
  assert len(records) == 2 * queries * 3
  assert {r["technique"] for r in records} == {"entity_substitution", "numerical_perturbation", "logical_negation"}
  assert all(r["backend"] == backend and r["prompt_version"] == prompts.PROMPT_VERSION for r in records)
  with open(os.path.join(output, "manifest.json")) as file:
    manifest = json.load(file)
  assert manifest["complete"] and sum(manifest["counts"].values()) == len(records)
  if backend == "rules":
    accepted = [r for r in records if r["accepted"]]
    assert accepted and all(r["text"] and r["reject_reason"] is None for r in accepted)
    assert manifest["counts"].get("accepted", 0) == len(accepted)
  else:  # A random tiny model writes no JSON: every record is kept, and rejected as unparsable.
    assert all(r["reject_reason"] == "unparsable" and r["new_tokens"] > 0 for r in records)


def test_chat_template_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  from axl_jax.negatives import prompts
  from axl_jax.negatives.chat import ChatTokenizer
  directory = str(tmp_path / "qwen")
  _tiny_qwen(directory)
  messages = prompts.messages("logical_negation", "th", "อะไร", "ประเทศไทยมีเมืองหลวง")
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ours = ChatTokenizer(directory)
  assert ours.prompt_ids(messages) == reference(text, add_special_tokens=False)["input_ids"]
  assert ours.end_ids() == sorted({reference.convert_tokens_to_ids("<|im_end|>"),
                                   reference.convert_tokens_to_ids("<|endoftext|>")})


def _tiny_qwen(directory):
  torch = pytest.importorskip("torch")
  import transformers
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
  from axl_jax import data
  texts = [p.text for lang in ("bn", "th") for p in data.read_corpus(f"{REPO}/data/tydi-mini/corpus/{lang}.jsonl.gz")]
  # Byte-level BPE, like Qwen's own tokenizer.
  tokenizer = Tokenizer(models.BPE())
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
  tokenizer.train_from_iterator(texts + ["Answer with JSON only"] * 5, trainers.BpeTrainer(
      vocab_size=1200, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                                 pad_token="<|endoftext|>", unk_token="<unk>",
                                                 additional_special_tokens=["<|im_start|>"])
  wrapped.chat_template = QWEN_TEMPLATE
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(wrapped), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True))
  model.save_pretrained(directory, safe_serialization=True)
  wrapped.save_pretrained(directory)


def _qwen_command(output, checkpoint):
  return [sys.executable, "-m", "axl_jax.negatives.generate", f"--output={output}", *BASE,
          "--config.generator.backend=qwen", f"--config.generator.checkpoint={checkpoint}",
          "--config.generator.dtype=float32", "--config.generator.batch_size=4", "--config.generator.shard_size=4",
          "--config.generator.max_new_tokens=8", "--config.generator.temperature=0.7",
          "--config.generator.max_queries_per_language=6"]


def test_qwen_backend_killed_and_restarted_loses_and_duplicates_nothing(tmp_path):
  checkpoint = str(tmp_path / "qwen")
  _tiny_qwen(checkpoint)
  reference = str(tmp_path / "reference")
  subprocess.run(_qwen_command(reference, checkpoint), cwd=REPO, env=_env(), check=True, timeout=900,
                 capture_output=True)

  interrupted = str(tmp_path / "interrupted")
  process = subprocess.Popen(_qwen_command(interrupted, checkpoint), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first_shard = os.path.join(interrupted, "shard-00000.done.json")
  deadline = time.time() + 600
  while not os.path.exists(first_shard) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  done_before = len(glob.glob(os.path.join(interrupted, "shard-*.done.json")))
  assert 0 < done_before < 9, "the kill should land mid-run (36 records in 9 shards)"
  subprocess.run(_qwen_command(interrupted, checkpoint), cwd=REPO, env=_env(), check=True, timeout=900,
                 capture_output=True)
  first, second = _records(reference), _records(interrupted)
  assert len(first) == 36 and first == second
  assert len({(r["query_id"], r["technique"]) for r in second}) == 36
  assert all(r["model_id"] == checkpoint and r["new_tokens"] > 0 for r in second)


def _rules_config(root, **generator):
  import tests.configs.tiny as tiny
  config = tiny.get_config()
  config.generator.update(backend="rules", languages="en", train_data=f"{root}/train.jsonl", **generator)
  config.data.corpus = f"{REPO}/data/tydi-mini/corpus/{{lang}}.jsonl.gz"
  return config


def _write_rows(path, rows):
  with open(path, "w", encoding="utf-8") as file:
    file.write("".join(json.dumps(row) + "\n" for row in rows))


def test_contains_answer_fires_when_the_rows_carry_answers(tmp_path):
  # An edit that leaves the short answer in the passage is not a negative. The rows must say what the
  # answer is (TyDi QA-style "answers"); Mr.TyDi rows do not, so there the check cannot apply.
  from axl_jax.negatives import generate
  text = "The river is 120 km long. Its source is not far from Lyon, and it ends in the sea."
  rows = [{"query_id": "1", "query": "Where is the source of the river?", "answers": ["Lyon"],
           "positive_passages": [{"docid": "7#1", "title": "River", "text": text}]},
          {"query_id": "2", "query": "Where is the source of the river?",
           "positive_passages": [{"docid": "7#1", "title": "River", "text": text}]}]
  _write_rows(tmp_path / "train.jsonl", rows)
  manifest = generate.run(_rules_config(tmp_path, techniques="numerical_perturbation"), str(tmp_path / "out"))
  records = {r["query_id"]: r for r in _records(str(tmp_path / "out"))}
  assert records["1"]["reject_reason"] == "contains_answer" and "Lyon" in records["1"]["text"]
  assert records["2"]["accepted"] and manifest["counts"]["contains_answer"] == 1


def test_generator_output_belongs_to_its_prompts_and_rows(tmp_path, monkeypatch):
  from axl_jax.negatives import generate, prompts
  rows = [{"query_id": "1", "query": "How long is the river?",
           "positive_passages": [{"docid": "7#1", "title": "River", "text": "The river is 120 km long."}]}]
  _write_rows(tmp_path / "train.jsonl", rows)
  output = str(tmp_path / "out")
  config = _rules_config(tmp_path, techniques="numerical_perturbation")
  generate.run(config, output)
  generate.run(config, output)  # unchanged: the finished shards are reused
  version = prompts.PROMPT_VERSION
  monkeypatch.setattr(prompts, "PROMPT_VERSION", version + "-changed")
  with pytest.raises(ValueError, match="another generator config or data"):
    generate.run(config, output)
  monkeypatch.setattr(prompts, "PROMPT_VERSION", version)
  rows[0]["positive_passages"][0]["text"] = "The river is 121 km long."
  _write_rows(tmp_path / "train.jsonl", rows)  # same file name, other content
  with pytest.raises(ValueError, match="another generator config or data"):
    generate.run(config, output)


def test_hosts_generate_disjoint_shards_that_make_one_set(tmp_path):
  # Three hosts each make every third shard (here one after the other); the set equals one host's, and a
  # set missing a host's shards is refused, not read short.
  from axl_jax.negatives import generate
  from axl_jax.negatives.records import read_records
  rows = [{"query_id": str(i), "query": f"How long is river {i}?",
           "positive_passages": [{"docid": f"{i}#1", "title": "River", "text": f"River {i} is {i + 100} km long."}]}
          for i in range(10)]
  _write_rows(tmp_path / "train.jsonl", rows)
  config = _rules_config(tmp_path, techniques="numerical_perturbation,logical_negation", shard_size=3)
  generate.run(config, str(tmp_path / "one"))
  for host in (2, 0):
    manifest = generate.run(config, str(tmp_path / "three"), host, 3)
    assert not manifest["complete"]
  with pytest.raises(FileNotFoundError, match=r"2 of 7 generator shards are not done \(first: shard-00001"):
    read_records(str(tmp_path / "three"))
  assert generate.run(config, str(tmp_path / "three"), 1, 3)["complete"]
  assert read_records(str(tmp_path / "three")) == read_records(str(tmp_path / "one"))
  assert len(read_records(str(tmp_path / "one"))) == 20


def test_qwen_backend_batches_prompts_by_length_and_answers_each_item(monkeypatch):
  # Prompts are sorted by length into batches; every answer must still land on its own item.
  import json as json_
  import types
  from axl_jax.negatives import decode, generate
  batches = []

  def fake_generate(params, config, prompts, **kwargs):
    batches.append([len(p) for p in prompts])
    return [[len(p)] for p in prompts]  # the "answer" names its prompt's length
  monkeypatch.setattr(decode, "generate_ids", fake_generate)
  backend = object.__new__(generate.QwenBackend)
  backend.params, backend.model_config, backend.eos_ids, backend.pad_id = None, None, [0], 0
  backend.generator = types.SimpleNamespace(batch_size=2, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
  backend.tokenizer = types.SimpleNamespace(
      prompt_ids=lambda messages: list(range(len(json_.dumps(messages)))),
      decode=lambda ids: json_.dumps({"rewrite": f"length {ids[0]}"}))
  # The item of query length 20 has a positive longer than the retriever reads, whose window ends inside a
  # word ("ab cd|efg"): the model sees "ab " and the rest follows its rewrite unchanged. The one of length 2
  # has no character of its text in the window (its title filled it): not prompted at all.
  visible = {20: 5, 2: 0}
  items = [{"technique": "logical_negation", "language": "en", "query": "q" * n, "positive": "ab cdefg",
            "visible": visible.get(n, 8), "query_id": str(n)} for n in (30, 1, 20, 2, 10)]
  results = backend.rewrite(items)
  assert results[3] == (None, 0, "only_outside_window")
  items, results = items[:3] + items[4:], results[:3] + results[4:]
  shown = ["ab " if i["visible"] == 5 else "ab cdefg" for i in items]
  lengths = [len(backend.tokenizer.prompt_ids(generate.prompts.messages(i["technique"], i["language"], i["query"],
                                                                       text))) for i, text in zip(items, shown)]
  assert [text for text, _, _ in results] == [f"length {n}" + ("cdefg" if i["visible"] == 5 else "")
                                              for n, i in zip(lengths, items)]
  ordered = sorted(lengths)  # batches of 2 by length
  assert batches == [ordered[0:2], ordered[2:4]]


def _window_tokenizer(tmp_path):
  from axl_jax import tokenization
  words = ("the river is long and its source lies far from the city which was founded in a year of many "
           "people who have lived by the sea and not far from the hills").split()
  texts = [" ".join(words[i:] + words[:i]) + f" {i} {i * 37}" for i in range(len(words))]
  directory = str(tmp_path / "tokenizer")
  tokenization.train_tokenizer(texts * 5, 300, directory)
  return directory


# Long passages: what the rules can edit lies inside the first 24 tokens for query 1 (a number and " is " up
# front), only beyond them for query 2.
FILLER = "the city grew by the sea and the hills far from the river where people lived " * 3
WINDOW_ROWS = [
    {"query_id": "1", "query": "How long is the river?",
     "positive_passages": [{"docid": "7#1", "title": "River", "text": "The river is 120 km long, " + FILLER + "in 1950."}]},
    {"query_id": "2", "query": "When was the city founded?",
     "positive_passages": [{"docid": "8#1", "title": "City", "text": "The city, " + FILLER + "in 1950 is old."}]}]


def test_rules_edit_inside_the_tokens_the_retriever_reads(tmp_path):
  from axl_jax import tokenization
  from axl_jax.negatives import generate
  from axl_jax.negatives.window import EncoderWindow
  _write_rows(tmp_path / "train.jsonl", WINDOW_ROWS)
  tokenizer_dir = _window_tokenizer(tmp_path)
  window = EncoderWindow(tokenization.load_tokenizer(tokenizer_dir), 24, " ")
  config = _rules_config(tmp_path, techniques="numerical_perturbation,logical_negation")
  config.data.passage_max_length = 24
  config.tokenizer.name_or_path = tokenizer_dir
  manifest = generate.run(config, str(tmp_path / "windowed"))
  records = {(r["query_id"], r["technique"]): r for r in _records(str(tmp_path / "windowed"))}
  assert records[("1", "numerical_perturbation")]["accepted"] and records[("1", "logical_negation")]["accepted"]
  # Query 2's number and "is" lie beyond the window: the rule says so instead of making an invisible edit.
  assert records[("2", "numerical_perturbation")]["reject_reason"] == "only_outside_window"
  assert records[("2", "logical_negation")]["reject_reason"] == "only_outside_window"
  assert manifest["counts"] == {"accepted": 2, "only_outside_window": 2}
  for (query_id, _), record in records.items():
    positive = WINDOW_ROWS[int(query_id) - 1]["positive_passages"][0]
    if record["accepted"]:
      assert not window.same_input(positive["title"], positive["text"], record["text"])
  # Unwindowed (no tokenizer), the same rules edit query 2 where the retriever cannot see it.
  config.tokenizer.name_or_path = ""
  generate.run(config, str(tmp_path / "anywhere"))
  unwindowed = {(r["query_id"], r["technique"]): r for r in _records(str(tmp_path / "anywhere"))}
  text = WINDOW_ROWS[1]["positive_passages"][0]["text"]
  assert unwindowed[("2", "numerical_perturbation")]["accepted"]
  assert window.same_input("City", text, unwindowed[("2", "numerical_perturbation")]["text"])


def test_a_rewrite_beyond_the_window_is_rejected_as_outside_window(tmp_path, monkeypatch):
  # Whatever the backend (a model may ignore its instructions), a candidate the retriever cannot tell from
  # its positive is not kept, and the count says why.
  from axl_jax.negatives import generate
  _write_rows(tmp_path / "train.jsonl", WINDOW_ROWS[1:])
  config = _rules_config(tmp_path, techniques="numerical_perturbation")
  config.data.passage_max_length = 24
  config.tokenizer.name_or_path = _window_tokenizer(tmp_path)
  monkeypatch.setattr(generate.RulesBackend, "rewrite",
                      lambda self, items: [(i["positive"].replace("1950", "1951"), 0, "") for i in items])
  manifest = generate.run(config, str(tmp_path / "out"))
  assert manifest["counts"] == {"outside_window": 1}


def test_window_covers_the_characters_the_encoder_reads(tmp_path):
  from axl_jax import tokenization
  from axl_jax.negatives.window import EncoderWindow, word_cut
  window = EncoderWindow(tokenization.load_tokenizer(_window_tokenizer(tmp_path)), 24, " ")
  text = WINDOW_ROWS[0]["positive_passages"][0]["text"]
  visible = window.visible_chars("River", text)
  assert 10 < visible < len(text)
  assert window.visible_chars("River", "The river is 120 km long.") == len("The river is 120 km long.")
  # Changing the last visible character changes the encoder's input; changing one past the next word start
  # does not (a change right after the window may still retokenize the word the window ends in).
  last, after = visible - 1, text.index(" ", visible) + 1
  assert not window.same_input("River", text, text[:last] + "X" + text[last + 1:])
  assert window.same_input("River", text, text[:after] + "X" + text[after + 1:])
  # The generator's prompt cuts at the start of the word the window ends in.
  cut = word_cut(text, visible)
  assert cut <= visible and (cut == visible or text[cut - 1] == " ")
  assert word_cut("ab cdefg", 5) == 3 and word_cut("ab cdefg", 3) == 3 and word_cut("abcdefg", 3) == 3
  assert word_cut("ab cdefg", 0) == 0 and word_cut("ab cdefg", 8) == 8
  # A longer title leaves less of the text in view.
  assert window.visible_chars("River of many hills and cities", text) < visible
