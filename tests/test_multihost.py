"""Real multi-process runs on this machine: ``jax.distributed`` with a local coordinator, gloo collectives
between CPU processes, each process with simulated devices. A pod slice is this, with hosts for processes."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.helpers import REPO, tiny_model_config

WORKER = r'''
import sys
coordinator, num_processes, process_id, workdir, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
from axl_jax import distributed
distributed.initialize(coordinator, num_processes, process_id) if num_processes > 1 else None
import jax
from absl import logging
logging.set_verbosity(logging.INFO)  # the trainer says when it resumes
import configs.default
from axl_jax import batching, checkpoints, encoder, trainer
from axl_jax.data import Passage, TrainExample
from tests.helpers import tiny_model_config


class CharTokenizer:
  def __call__(self, texts, truncation, max_length, add_special_tokens):
    return {"input_ids": [([2] + [5 + ord(c) % 90 for c in t] + [3])[:max_length] for t in texts]}

  def get_vocab(self):
    return {chr(i): i for i in range(97)}


config = configs.default.get_config()
config.model = tiny_model_config()
config.data.update(query_max_length=16, passage_max_length=24, passage_length_buckets="16,24")
# Plain SGD without clipping: a gradient scaled by the host count (or missing a host's rows) changes the result.
# train[:steps:checkpoint_every:seconds to wait before each batch] (a slow run gives a test time to kill it)
steps, every, wait = (int(mode.split(":")[1]), int(mode.split(":")[2]), float(mode.split(":")[3])) \
    if mode.startswith("train:") else (5, 5, 0.0)
stage = configs.default.train_stage(num_steps=steps, batch_size=8, group_size=2, optimizer="sgd", learning_rate=0.05,
                                    warmup_steps=1, grad_clip_norm=0.0, weight_decay=0.0, checkpoint_every=every,
                                    log_every=every, temperature=0.5, keep_checkpoints=10)
# Short and long rows (other length buckets), so the hosts' own rows often pad differently: only agreeing
# on the global batch's lengths gives every host the same shapes.
examples = [TrainExample(f"q{i}", f"question {i} about {chr(97 + i)}" if i % 4 == 0 else f"q{i}",
                         (Passage(f"p{i}", "", f"answer {i} {chr(97 + i)} " * (2 if i % 3 == 0 else 1)),),
                         (Passage(f"n{i}", "", f"other text {i * 7}"),), "en") for i in range(24)]
if mode.startswith("export:"):  # export:<checkpoint>: bn's corpus and dev queries, 6 corpus shards
  import os
  from axl_jax import embeddings, prepared
  from tests.helpers import DEMO_DATA
  config.data.update(root=DEMO_DATA, corpus="{root}/corpus/{lang}.jsonl.gz", queries="{root}/{split}/{lang}.jsonl.gz")
  config.evaluate.update(encode_batch_size=8, shard_size=20)
  encoder = embeddings.Encoder(mode[len("export:"):], config, CharTokenizer())
  store = prepared.Store(os.path.join(os.path.dirname(workdir), "prepared"))
  embeddings.export_language(encoder, workdir, "bn", ["dev"], config.evaluate.shard_size, store)
  sys.exit(0)
if mode.startswith("evaluate:"):  # evaluate:<checkpoint>: dense retrieval on bn dev, 6 corpus shards searched
  import os, types
  from axl_jax import pipeline
  from axl_jax.stages import evaluate
  from tests.helpers import DEMO_DATA
  config.data.update(root=DEMO_DATA, corpus="{root}/corpus/{lang}.jsonl.gz", queries="{root}/{split}/{lang}.jsonl.gz",
                     qrels="{root}/qrels/{split}.{lang}.tsv", prepared_dir=os.path.join(os.path.dirname(workdir), "prepared"))
  config.evaluate.update(encode_batch_size=8, shard_size=20)
  ctx = types.SimpleNamespace(config=config, workdir=pipeline.Workdir(workdir), tokenizer=CharTokenizer(),
                              languages=["bn"])
  evaluate.retrieval_results(ctx, {"model": mode[len("evaluate:"):]}, "dev", os.path.join(workdir, "out"), False)
  sys.exit(0)
shape = batching.batch_shape(config, stage, jax.process_index(), jax.process_count())
batches = batching.SupervisedBatches(examples, CharTokenizer(), shape, 0, 16, 24, " ")
if wait:
  import time
  make_batch = batches.batch
  batches.batch = lambda step: (time.sleep(wait), make_batch(step))[1]
params = encoder.init_params(config.model, jax.random.key(0))
final, directory = trainer.train("multihost", stage, config, workdir, batches,
                                 lambda: jax.device_put(params, checkpoints.replicated_sharding()))
print("final loss", final["loss"], flush=True)
'''


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def _start(workdir: str, processes: int, devices_per_process: int, mode: str = "train") -> list:
  coordinator = f"127.0.0.1:{_free_port()}"
  return [subprocess.Popen([sys.executable, "-c", WORKER, coordinator, str(processes), str(index), workdir, mode],
                           env=_env(devices_per_process), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for index in range(processes)]


def _wait(running: list) -> list[str]:
  outputs = [process.communicate(timeout=600) for process in running]
  for process, (_, stderr) in zip(running, outputs):
    assert process.returncode == 0, stderr[-4000:]
  return [stderr for _, stderr in outputs]


def _run(workdir: str, processes: int, devices_per_process: int, mode: str = "train") -> list[str]:
  return _wait(_start(workdir, processes, devices_per_process, mode))


def _params(workdir):
  from axl_jax import checkpoints
  return checkpoints.restore_params(os.path.join(workdir, "multihost", "checkpoints"), tiny_model_config())[0]


def test_two_processes_of_two_devices_train_like_one_process_of_four(tmp_path):
  _run(str(tmp_path / "one"), 1, 4)
  _run(str(tmp_path / "two"), 2, 2)
  model = tiny_model_config()
  one, two = _params(str(tmp_path / "one")), _params(str(tmp_path / "two"))
  import jax
  initial = None
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=str(path[0]))
  # And the steps did train: the parameters moved away from their initialisation.
  from axl_jax import encoder
  initial = encoder.init_params(model, jax.random.key(0))
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(initial)))
  assert moved > 1e-3


def test_export_by_two_processes_equals_export_by_one(tmp_path):
  from axl_jax import embeddings
  _run(str(tmp_path / "train"), 1, 2)
  checkpoint = str(tmp_path / "train" / "multihost" / "checkpoints")
  _run(str(tmp_path / "one"), 1, 4, f"export:{checkpoint}")  # prepares bn's data for both runs
  _run(str(tmp_path / "two"), 2, 2, f"export:{checkpoint}")
  for name in ("corpus", "queries-dev"):
    one = list(embeddings.load_shards(str(tmp_path / "one"), name))
    two = list(embeddings.load_shards(str(tmp_path / "two"), name))
    assert len(one) == len(two) == (6 if name == "corpus" else 1)
    for (ids_one, vectors_one), (ids_two, vectors_two) in zip(one, two):
      assert ids_one == ids_two
      np.testing.assert_allclose(vectors_two.astype(np.float32), vectors_one.astype(np.float32), rtol=1e-3, atol=1e-3)
  manifest = embeddings.read_shards_manifest(str(tmp_path / "two"), "corpus")
  assert manifest["count"] == 117 and manifest["dtype"] == "float16"


def test_evaluate_by_two_processes_equals_evaluate_by_one(tmp_path):
  _run(str(tmp_path / "train"), 1, 2)
  checkpoint = str(tmp_path / "train" / "multihost" / "checkpoints")
  # Two devices a process in both runs: the same per-device shapes, so the same float32 query vectors (XLA's
  # CPU matmuls of other shapes differ in the last bits, which the ranks would show).
  _run(str(tmp_path / "one"), 1, 2, f"evaluate:{checkpoint}")
  _run(str(tmp_path / "two"), 2, 2, f"evaluate:{checkpoint}")  # each process searches 3 of the 6 shards
  one = open(tmp_path / "one" / "out" / "runs" / "model.bn.dev.trec").read()
  two = open(tmp_path / "two" / "out" / "runs" / "model.bn.dev.trec").read()
  assert one == two and len(one.splitlines()) == 17 * 100
  partials = sorted(os.listdir(tmp_path / "two" / "out" / "partial"))
  assert partials == ["model.bn.dev.0.json", "model.bn.dev.1.json", "results.dev.json"]


def test_a_killed_process_and_both_restarted_train_like_an_uninterrupted_run(tmp_path):
  import jax
  _run(str(tmp_path / "whole"), 2, 2, "train:12:3:0")
  interrupted = str(tmp_path / "interrupted")
  running = _start(interrupted, 2, 2, "train:12:3:0.5")
  saved = os.path.join(interrupted, "multihost", "checkpoints", "6")  # orbax renames a finished save to its step
  deadline = time.time() + 300
  while not os.path.isdir(saved) and time.time() < deadline and all(p.poll() is None for p in running):
    time.sleep(0.05)
  assert os.path.isdir(saved), "the run ended or stalled before its step-6 checkpoint"
  running[1].send_signal(signal.SIGKILL)  # one host dies mid-stage...
  time.sleep(1)
  running[0].send_signal(signal.SIGKILL)  # ...and the launcher stops the other (it would wait in a collective)
  for process in running:
    process.communicate(timeout=60)
  assert not os.path.isdir(os.path.join(interrupted, "multihost", "checkpoints", "12"))
  logs = _run(interrupted, 2, 2, "train:12:3:0")
  assert all("resuming from step" in log for log in logs)
  for a, b in zip(jax.tree.leaves(_params(str(tmp_path / "whole"))), jax.tree.leaves(_params(interrupted))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def _pipeline(workdir: str, processes: int, devices_per_process: int) -> None:
  """``axl_jax.main`` on the tiny config (finetune, a round with rule-made and mined negatives, the plots), as
  each host of a launch runs it."""
  coordinator = f"127.0.0.1:{_free_port()}"
  flags = [f"--coordinator_address={coordinator}", f"--num_processes={processes}"] if processes > 1 else []
  running = [subprocess.Popen(
      [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
       "--config.stages=finetune,round_1,visualize", "--config.generator.backend=rules", "--config.generator.shard_size=8",
       "--config.adversarial.sources=generated,mined", "--config.adversarial.mine_depth=5",
       *flags, *([f"--process_id={index}"] if processes > 1 else [])],
      env=_env(devices_per_process), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for index in range(processes)]
  for index, log in enumerate(_wait(running)):
    # The generator ran before this process opened the devices (on a TPU it could not open them otherwise).
    assert log.index("round_1: generating negatives") < log.index("Stage finetune starts")
    assert "JAX opened its devices before the offline steps" not in log
    if processes > 1:  # each host generated its own share
      assert f"negatives (host {index} of {processes})" in log


def test_a_round_on_two_processes_keeps_the_negatives_of_one(tmp_path):
  from axl_jax import io
  from axl_jax.negatives.records import read_records
  _pipeline(str(tmp_path / "one"), 1, 4)
  _pipeline(str(tmp_path / "two"), 2, 2)
  one, two = (os.path.join(tmp_path, name, "round_1") for name in ("one", "two"))
  # Each process generated every other shard; together they are the one-process set.
  assert read_records(os.path.join(two, "negatives")) == read_records(os.path.join(one, "negatives"))
  # Each process mined a block of the training queries; together, the one-process list.
  mined_one, mined_two = (io.read_jsonl(os.path.join(d, "mined.jsonl")) for d in (one, two))
  assert len(os.listdir(os.path.join(two, "mined"))) == 2 and not os.path.exists(os.path.join(one, "mined"))
  ranked = lambda mined: [(r["language"], r["query_id"], r["docid"], r["rank"]) for r in mined]
  assert ranked(mined_two) == ranked(mined_one) and mined_one
  for field in ("score_negative", "score_positive"):
    np.testing.assert_allclose([r[field] for r in mined_two], [r[field] for r in mined_one], atol=1e-4)
  decisions_one, decisions_two = (io.read_jsonl(os.path.join(d, "decisions.jsonl")) for d in (one, two))
  assert len(decisions_one) == len(decisions_two) > 20 + len(mined_one)
  kept = lambda decisions: [(d["language"], d["query_id"], d["technique"], d.get("text"), d.get("docid"))
                            for d in decisions if d["kept"]]
  assert kept(decisions_two) == kept(decisions_one)
  assert {d["technique"] for d in decisions_one if d["kept"]} > {"mined"}
  for field in ("score_positive", "score_negative"):
    np.testing.assert_allclose([d[field] for d in decisions_two], [d[field] for d in decisions_one], atol=1e-4)
  # Each process scored a block of the candidates.
  assert len(os.listdir(os.path.join(two, "scores"))) == 2
  stats_one, stats_two = (io.read_json(os.path.join(d, "round_stats.json")) for d in (one, two))
  assert stats_two["kept"] == stats_one["kept"]
  assert abs(stats_two["dev/avg/MRR@100"] - stats_one["dev/avg/MRR@100"]) < 1e-3
  assert os.path.exists(os.path.join(tmp_path, "two", "visualize", "clusters.png"))


def test_bad_data_stops_every_process_not_only_the_one_that_prepares_it(tmp_path):
  import gzip
  import shutil
  from tests.helpers import DEMO_DATA
  root = tmp_path / "data"
  shutil.copytree(DEMO_DATA, root)
  with gzip.open(root / "corpus" / "th.jsonl.gz", "wt") as file:
    file.write('{"docid": "1", "title": "", "text": "fine"}\nnot json\n')
  coordinator = f"127.0.0.1:{_free_port()}"
  running = [subprocess.Popen(
      [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={tmp_path / 'run'}",
       "--config.stages=ict", f"--config.data.root={root}", f"--coordinator_address={coordinator}",
       "--num_processes=2", f"--process_id={index}"],
      env=_env(2), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
  logs = [process.communicate(timeout=300)[1] for process in running]  # neither waits at a barrier for a day
  assert all(process.returncode != 0 for process in running)
  assert "th.jsonl.gz:2: malformed JSON" in logs[0]
  assert "process 0 failed at prepare data, train the tokenizer" in logs[1] and "th.jsonl.gz:2" in logs[1]
