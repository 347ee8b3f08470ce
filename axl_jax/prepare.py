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

from absl import app, flags, logging
from ml_collections import config_flags

from axl_jax import pipeline, prepared

FLAGS = flags.FLAGS


def prepare_all(config, workdir: str) -> list[dict]:
  """Prepares (or finds prepared) every data set the config's stages read; returns their manifests."""
  return prepared.prepare_all(config, workdir, pipeline.validate_config(config))


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
