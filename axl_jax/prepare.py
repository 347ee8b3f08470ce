r"""Prepares every data set a config's stages read, once, before any stage runs.

    python -m axl_jax.prepare --config=configs/axl.py --workdir=runs/axl [--config.data.hub_dir=/data/hub]

Gets the source files (local globs; for ``hf:`` specs of Mr.TyDi and MS MARCO the hub's raw files, from
``data.hub_dir`` or downloaded: ``axl_jax.hub``), validates every row (errors name the file, the line and
the field) and writes each corpus, training set and query set as a TFDS ArrayRecord dataset under
``data.prepared_dir`` (default ``<workdir>/prepared``). It prints a table of what it prepared and writes
``prepared.json`` (counts, skipped rows, bytes and the sha256 of every file written).

Running it is optional: a stage prepares what it reads on first use. Running it first finds missing files
and bad rows before hours of training, and on a shared file system prepares once for every host.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from axl_jax import data, hub, io, pipeline, prepared

FLAGS = flags.FLAGS


def datasets_of(config) -> list[tuple[str, str, str]]:
  """``(kind, spec, language)`` of every data set the config's stages read, each once."""
  names = pipeline.validate_config(config)
  languages = data.parse_languages(config.data.languages)
  wanted = [("corpus", prepared.corpus_spec(config, language), language) for language in languages]
  if "ict" in names and config.ict.corpus:
    wanted += [("corpus", data.expand_spec(config.ict.corpus, config.data.root, language), language)
               for language in languages]
  rounds = any(name.startswith("round_") for name in names)
  for section in ("pretrain", "finetune"):
    if section in names or (section == "finetune" and (rounds or "visualize" in names)):
      wanted += [("train", spec, language) for language, spec in data.training_specs(config, config[section])]
  splits = set()
  if "evaluate" in names:
    splits.add(config.evaluate.split)
  if rounds:
    splits.add("dev")
  if "export" in names:
    splits.update(s.strip() for s in config.export.splits.split(",") if s.strip())
  wanted += [("queries", data.expand_spec(config.data.queries, config.data.root, language, split), language)
             for split in sorted(splits) for language in languages]
  return list(dict.fromkeys(wanted))


def missing_hub_files(wanted: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
  """``(spec, where it belongs)`` of the hub files that are not on this machine (checked without fetching)."""
  missing = []
  download, hub.settings.download = hub.settings.download, False
  try:
    for _, spec, _ in wanted:
      if spec.startswith("hf:") and hub.raw_file(spec):
        try:
          hub.local_file(spec)
        except hub.MissingFile:
          missing.append((spec, hub.destination(*hub.raw_file(spec))))
  finally:
    hub.settings.download = download
  return missing


def prepare_all(config, workdir: str) -> list[dict]:
  """Prepares (or finds prepared) every data set of ``config``; returns their manifests."""
  hub.configure(config)
  wanted = datasets_of(config)
  if not config.data.download:
    missing = missing_hub_files(wanted)
    if missing:
      lines = "\n".join(f"  {spec}  ->  {path}" for spec, path in missing)
      raise data.DataError(f"{len(missing)} hub files are not on this machine and data.download is off; "
                           f"fetch them and put them at:\n{lines}")
  store = prepared.store(config, workdir)
  manifests = []
  for kind, spec, language in wanted:
    directory = store.prepared(kind, spec, language)
    manifest = io.read_json(os.path.join(directory, "manifest.json"))
    manifest["directory"] = directory
    manifests.append(manifest)
  io.write_json(os.path.join(store.root, "prepared.json"), manifests)
  return manifests


def table(manifests: list[dict]) -> str:
  rows = ["| kind | language | rows | skipped | MiB | source |", "|---|---|---:|---:|---:|---|"]
  for m in manifests:
    size = sum(f["bytes"] for f in m["files"].values()) / 2**20
    rows.append(f"| {m['kind']} | {m['language'] or '-'} | {m['count']:,} | {sum(m['skipped'].values()):,} | "
                f"{size:,.1f} | {m['spec']} |")
  return "\n".join(rows)


def main(argv):
  del argv
  if not FLAGS.workdir and not FLAGS.config.data.prepared_dir:
    raise app.UsageError("--workdir (or --config.data.prepared_dir) is required")
  manifests = prepare_all(FLAGS.config, FLAGS.workdir or "")
  print(table(manifests), flush=True)
  logging.info("prepared %d data sets", len(manifests))


if __name__ == "__main__":
  # Defined only when run as a command: the library part is imported beside other modules' --config flags.
  config_flags.DEFINE_config_file("config", None, "Launch config (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's directory; its prepared/ holds the data unless data.prepared_dir.")
  app.run(main)
