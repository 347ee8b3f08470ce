"""A run: the configured stages in order, each in its own directory, each knowing what it was made from.

``<workdir>/<stage>/`` holds what the stage writes, ``fingerprint.json`` (written when it starts),
``manifest.json`` (its fingerprint, the config fields and input stages behind it, metrics, checkpoint)
and ``COMPLETE``. A stage's *fingerprint* hashes the config fields that decide its output (each stage
module names them), the tokenizer and the fingerprints of the stages it reads. Before anything runs,
every configured stage is planned:

- complete with the same fingerprint: skipped (a second run of the same command is instant);
- interrupted with the same fingerprint: resumed from its latest checkpoint;
- made with another fingerprint (complete or not): recomputed from scratch when it is cheap (evaluation,
  export, plots) or when a stage it reads is recomputed; a training stage (hours of work) is recomputed
  only when ``--config.recompute`` names it (or is ``all``). Otherwise the run stops before doing
  anything, naming the changed fields.

Before any stage runs, process 0 prepares every data set the stages read and trains the tokenizer, and
each stage to run that has an ``offline(ctx)`` step (a round's negatives generator) runs it on every host:
that work happens in subprocesses before this process opens the accelerators, so they can own them.

Stages are found by name as modules of ``axl_jax.stages`` (``round_<k>`` is ``axl_jax.stages.round``):
adding a stage is adding one module. Beyond what every stage shares (model, tokenizer, lengths, seed), this
module does not know what a stage computes.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import os
import pkgutil
import re
import shutil
import time
from types import ModuleType

from absl import logging

from axl_jax import data, distributed, hf_checkpoint, hub, io, prepared, stages, tokenization


def stage_module(name: str) -> ModuleType | None:
  """The module of stage ``name`` (``round_3`` -> ``axl_jax.stages.round``), or None for an unknown name."""
  if name.startswith("round"):
    if not re.fullmatch(r"round_[1-9][0-9]*", name):
      return None
    module_name = "round"
  else:
    module_name = name
  if not re.fullmatch(r"[a-z][a-z_]*", module_name) or module_name not in known_modules():
    return None
  return importlib.import_module(f"axl_jax.stages.{module_name}")


def known_modules() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(stages.__path__) if not m.name.startswith("_")
                and m.name not in stages.HELPERS)


class Workdir:
  """Where a run keeps each stage's files, and what it says about them."""

  def __init__(self, root: str):
    self.root = root

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.root, name)

  def checkpoints(self, name: str) -> str:
    # From the workdir, not a manifest's absolute path, so a moved or copied workdir still works.
    return os.path.abspath(os.path.join(self.stage_dir(name), "checkpoints"))

  def manifest(self, name: str) -> dict | None:
    """The manifest of a completed stage, else None."""
    if not os.path.exists(os.path.join(self.stage_dir(name), "COMPLETE")):
      return None
    return io.read_json(os.path.join(self.stage_dir(name), "manifest.json"))

  def started(self, name: str) -> dict | None:
    """What an unfinished stage was started with (``{"fingerprint", "fields"}``), if it left anything."""
    directory = self.stage_dir(name)
    if not os.path.isdir(directory) or not os.listdir(directory):
      return None
    path = os.path.join(directory, "fingerprint.json")
    return io.read_json(path) if os.path.exists(path) else {"fingerprint": None, "fields": {}}

  def start(self, name: str, fingerprint: str, fields: dict, inputs: dict):
    if distributed.process_index() == 0:
      io.write_json(os.path.join(self.stage_dir(name), "fingerprint.json"),
                    {"fingerprint": fingerprint, "fields": fields, "inputs": inputs})
    distributed.barrier(f"{name} starts")

  def complete(self, name: str, manifest: dict):
    """Once every process has finished the stage, writes the manifest and ``COMPLETE`` (process 0); no
    process goes on before they are written."""
    distributed.barrier(f"{name} finished")
    if distributed.process_index() == 0:
      io.write_json(os.path.join(self.stage_dir(name), "manifest.json"), manifest)
      io.write_text(os.path.join(self.stage_dir(name), "COMPLETE"), manifest["finished"] + "\n")
    # No process may start the next stage before this one is marked complete for all of them.
    distributed.barrier(f"{name} complete")

  def discard(self, name: str):
    if distributed.process_index() == 0:
      shutil.rmtree(self.stage_dir(name), ignore_errors=True)
    distributed.barrier(f"{name} discarded")


@dataclasses.dataclass
class Context:
  """What a stage gets: the config, the workdir, the tokenizer and the stages it reads."""
  config: object
  workdir: Workdir
  tokenizer: object
  name: str
  inputs: list[str]
  fingerprint: str

  @property
  def stage_dir(self) -> str:
    return self.workdir.stage_dir(self.name)

  @property
  def languages(self) -> list[str]:
    return data.parse_languages(self.config.data.languages)


class StaleStagesError(ValueError):
  """Stages in the workdir were made from another config or data, and recomputing them was not asked for."""


STALE_ERRORS = (StaleStagesError, tokenization.StaleTokenizerError)


@dataclasses.dataclass
class Planned:
  name: str
  module: ModuleType
  inputs: dict[str, str]       # input stage -> its fingerprint
  fields: dict
  fingerprint: str
  action: str = "run"          # run | resume | skip | recompute | stale (stops the run)
  reason: str = ""


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(value, prefix: str = "") -> dict:
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
  return {prefix: value}


def changed_fields(old: dict, new: dict) -> list[str]:
  """``field: old -> new`` for every flattened field that differs."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  return [f"{key}: {old_flat.get(key, '(absent)')!r} -> {new_flat.get(key, '(absent)')!r}"
          for key in sorted(set(old_flat) | set(new_flat)) if old_flat.get(key) != new_flat.get(key)]


# Model fields that change how the same function is computed, not which function: memory and kernels.
_MODEL_IMPLEMENTATION = ("remat", "attention_impl")


def common_fields(config, tokenizer) -> dict:
  """What every stage's output depends on: the model, the tokenizer, the lengths, the seed."""
  data_config = config.data
  model = {k: v for k, v in config.model.to_dict().items() if k not in _MODEL_IMPLEMENTATION}
  return {"model": model, "tokenizer": tokenization.fingerprint(tokenizer), "seed": config.seed,
          "data.query_max_length": data_config.query_max_length,
          "data.passage_max_length": data_config.passage_max_length,
          "data.passage_length_buckets": data_config.passage_length_buckets,
          "data.title_separator": data_config.title_separator}


def _planned(config, workdir: Workdir, name: str, available, base: dict, planned: dict[str, Planned]) -> Planned:
  """The fingerprint stage ``name`` has under ``config``, its inputs planned first (in ``planned``, or as
  they would be made now when they are complete in the workdir but not configured to run)."""
  module = stage_module(name)
  input_fingerprints = {}
  for needed in module.inputs(config, name, available):
    if needed in planned:
      input_fingerprints[needed] = planned[needed].fingerprint
      continue
    manifest = workdir.manifest(needed)
    if manifest is None:
      raise FileNotFoundError(f"stage {name} reads stage {needed}, which is neither configured to run before it "
                              f"(--config.stages) nor complete in {workdir.root}")
    expected = _planned(config, workdir, needed, available, base, {})
    if manifest.get("fingerprint") != expected.fingerprint:
      # Not configured to run, so not recomputed: said out loud, never used silently.
      logging.warning("Stage %s reads %s as it is in %s, made with another config or data than the current one "
                      "(%s); add %s to --config.stages to bring it up to date", name, needed, workdir.root,
                      "; ".join(changed_fields(manifest.get("fields", {}), expected.fields)) or "its inputs changed",
                      needed)
    input_fingerprints[needed] = manifest.get("fingerprint")
  fields = dict(base, **module.fingerprint_fields(config, name))
  fields = json.loads(json.dumps(fields, sort_keys=True, default=str))
  return Planned(name, module, input_fingerprints, fields, _digest([fields, input_fingerprints]))


def plan(config, workdir: Workdir, names: list[str], tokenizer) -> list[Planned]:
  """Decides for each configured stage whether it is skipped, resumed, run or recomputed.

  Raises before anything runs when a stale training stage would be thrown away without ``recompute``.
  """
  planned: dict[str, Planned] = {}
  available = lambda name: name in names or workdir.manifest(name) is not None
  base = common_fields(config, tokenizer)
  accepted = {s.strip() for s in config.recompute.split(",") if s.strip()}
  problems, stale = [], []
  for index, name in enumerate(names):
    later = [n for n in stage_module(name).inputs(config, name, available) if n in names[index:]]
    if later:
      raise ValueError(f"config field stages: {name} reads {', '.join(later)}, listed after it")
    step = planned[name] = _planned(config, workdir, name, available, base, planned)
    done, started = workdir.manifest(name), workdir.started(name)
    previous = done or started
    if previous is None:
      continue
    if previous.get("fingerprint") == step.fingerprint:
      step.action = "skip" if done else "resume"
      continue
    changes = changed_fields(previous.get("fields", {}), step.fields)
    # An input that is not skipped is (re)made now: what reads it must be made again too.
    remade_inputs = [n for n in step.inputs if n in planned and planned[n].action != "skip"]
    if previous.get("fingerprint") is None:
      changes = ["(made before stages recorded their fingerprints)"]
    step.reason = "; ".join(changes + [f"its input stage {n} is recomputed" for n in remade_inputs]) or (
        "an input stage changed: " + ", ".join(f"{n} ({previous.get('inputs', {}).get(n)} -> {f})"
                                               for n, f in step.inputs.items()))
    if not step.module.EXPENSIVE or remade_inputs or name in accepted or "all" in accepted:
      step.action = "recompute"
    else:
      step.action = "stale"
      problems.append(f"  {name} ({'complete' if done else 'interrupted'}): {step.reason}")
      stale.append(name)
  if problems:
    raise StaleStagesError(
        f"{workdir.root} holds stages made with another config or data:\n" + "\n".join(problems) +
        f"\nRecomputing them throws their training away. Run with --config.recompute={','.join(stale)} "
        "(or =all) to retrain them and the stages after them, or use a new --workdir.")
  return list(planned.values())


def validate_config(config) -> list[str]:
  """Fails at launch on what would otherwise fail an hour in; returns the stage names to run."""
  names = [s.strip() for s in config.stages.split(",") if s.strip()]
  known = ",".join(m if m != "round" else "round_<k>" for m in known_modules())
  for name in names:
    if stage_module(name) is None:
      raise ValueError(f"config field stages: unknown stage {name!r}; known: {known}")
    if name.startswith("round_") and int(name[6:]) > config.adversarial.rounds:
      raise ValueError(f"config field stages: {name} but adversarial.rounds is {config.adversarial.rounds}")
  for accepted in [s.strip() for s in config.recompute.split(",") if s.strip()]:
    if accepted != "all" and stage_module(accepted) is None:
      raise ValueError(f"config field recompute: unknown stage {accepted!r}; known: {known}")
  data.parse_languages(config.data.languages)
  model = config.model
  checks = [
      (model.pooling in ("cls", "mean"), "model.pooling must be cls or mean"),
      (model.attention_impl in ("xla", "cudnn", "auto"), "model.attention_impl must be xla, cudnn or auto"),
      (model.hidden_size % model.num_heads == 0, "model.hidden_size must be a multiple of model.num_heads"),
      (config.data.passage_max_length + model.position_offset <= model.max_position_embeddings,
       "data.passage_max_length + model.position_offset must not exceed model.max_position_embeddings"),
      (config.data.query_max_length + model.position_offset <= model.max_position_embeddings,
       "data.query_max_length + model.position_offset must not exceed model.max_position_embeddings"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"config: {message}")
  specs = []
  if not config.tokenizer.name_or_path:
    specs += [data.expand_spec(config.data.corpus, config.data.root, lang) for lang in data.parse_languages(
        config.data.languages)]
  for name in dict.fromkeys(names):
    specs += stage_module(name).check_config(config, name)
  # Local data must exist now, not when the stage that reads it starts.
  for spec in specs:
    if not spec.startswith("hf:") and not glob.glob(spec):
      raise FileNotFoundError(f"config: data file {spec!r} does not exist (check data.root and the data fields)")
  return names


def _tokenizer_settings(config) -> dict:
  """What decides a tokenizer trained on the corpus."""
  return {"vocab_size": config.tokenizer.vocab_size,
          "train_docs_per_language": config.tokenizer.train_docs_per_language,
          "corpus": [[language, data.spec_identity(data.expand_spec(config.data.corpus, config.data.root, language))]
                     for language in data.parse_languages(config.data.languages)]}


def _tokenizer_texts(config, workdir_root: str):
  """The first ``train_docs_per_language`` passages of each language's prepared corpus."""
  per_language = config.tokenizer.train_docs_per_language
  store = prepared.store(config, workdir_root)
  for language in data.parse_languages(config.data.languages):
    corpus = store.corpus(prepared.corpus_spec(config, language), language)
    for _, passages in corpus.chunks(4096, stop=min(per_language, len(corpus))):
      yield from (data.passage_text(passage, " ") for passage in passages)


def run(config, workdir_path: str) -> dict[str, dict]:
  """Plans, then runs the configured stages in order; returns each stage's metrics."""
  if config.model.init_from:
    # The checkpoint decides the architecture; the config keeps pooling, projection, dtype and the rest.
    hf_config = hf_checkpoint.read_hf_config(hf_checkpoint.resolve(config.model.init_from))
    config.model.update(hf_checkpoint.model_config_from_hf(hf_config, config.model).to_dict())
  hub.configure(config)
  names = validate_config(config)
  os.makedirs(workdir_path, exist_ok=True)
  workdir = Workdir(workdir_path)
  get_tokenizer = lambda: tokenization.get_tokenizer(
      config, workdir_path, lambda: _tokenizer_texts(config, workdir_path), _tokenizer_settings(config),
      retrain="all" in config.recompute.split(","))
  def prepare_data_and_tokenizer():
    prepared.prepare_all(config, workdir_path, names)
    return get_tokenizer()
  # One process prepares the data and trains a tokenizer; the others load what it wrote. Nothing before the
  # stages opens an accelerator (``distributed`` talks to the coordinator, not the devices).
  tokenizer = distributed.run_on_process_zero("prepare data, train the tokenizer", prepare_data_and_tokenizer)
  if tokenizer is None:
    tokenizer = get_tokenizer()
  if not config.tokenizer.name_or_path:
    with config.unlocked():
      config.model.vocab_size = len(tokenizer)
  steps = plan(config, workdir, names, tokenizer)
  distributed.barrier("planned")  # every process planned from the same workdir before any of it changes
  context = lambda step: Context(config, workdir, tokenizer, step.name, list(step.inputs), step.fingerprint)
  for step in steps:
    if step.action == "recompute":
      logging.warning("Stage %s is recomputed: %s", step.name, step.reason)
      workdir.discard(step.name)
  offline = [step for step in steps if step.action != "skip" and hasattr(step.module, "offline")]
  if offline and distributed.backends_started():
    logging.warning("JAX opened its devices before the offline steps of %s (a run inside a process that used JAX "
                    "already): their subprocesses share the accelerators with it", ", ".join(s.name for s in offline))
  for step in offline:
    workdir.start(step.name, step.fingerprint, step.fields, step.inputs)
    step.module.offline(context(step))
  if offline:
    distributed.barrier("offline work done")  # every host's share, before a stage reads it
  import jax
  logging.info("Process %d of %d opens its devices: %s", jax.process_index(), jax.process_count(), jax.local_devices())
  distributed.check_devices()
  validate_config(config)  # again, now that the batch sizes can be checked against the devices
  outcome = {}
  for step in steps:
    if step.action == "skip":
      logging.info("Stage %s is complete (%s) and up to date; skipping it", step.name, workdir.stage_dir(step.name))
      outcome[step.name] = workdir.manifest(step.name)["metrics"]
      continue
    logging.info("Stage %s %s", step.name, "resumes" if step.action == "resume" else "starts")
    started = time.time()
    workdir.start(step.name, step.fingerprint, step.fields, step.inputs)
    result = step.module.run(context(step))
    manifest = {"stage": step.name, "fingerprint": step.fingerprint, "fields": step.fields, "inputs": step.inputs,
                "config": json.loads(config.to_json_best_effort()), "metrics": result.metrics,
                "checkpoint": result.checkpoint, "seconds": round(time.time() - started, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    workdir.complete(step.name, manifest)
    outcome[step.name] = result.metrics
  return outcome
