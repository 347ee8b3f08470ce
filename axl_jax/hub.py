"""The hub's raw files behind ``hf:`` data specs, fetched with ``huggingface_hub`` (never a loading script).

Mr.TyDi (``castorini/mr-tydi``, ``castorini/mr-tydi-corpus``) and Tevatron's MS MARCO sets are loading
scripts on the hub, which current ``datasets`` refuses to run. The files those scripts point to are plain
JSON Lines (gzip) in the Tevatron schema; ``RAW_FILES`` names them, and ``local_file`` finds one:

1. in ``data.hub_dir``, a folder laid out like the hub (``<hub_dir>/<repo id>/<file>``), e.g. copied from
   another machine, or
2. in the Hugging Face cache, downloading it when ``data.download`` allows (``hf_hub_download``).

Offline and missing, the error names every file to fetch and where to put it. Specs of other hub data
sets (parquet) are read through ``datasets`` as before.
"""
from __future__ import annotations

import dataclasses
import os

# repo id -> the raw file of (config, split). Mr.TyDi configs are language names ("english").
RAW_FILES = {
    "castorini/mr-tydi-corpus": lambda config, split: f"mrtydi-v1.1-{config}/corpus.jsonl.gz",
    "castorini/mr-tydi": lambda config, split: f"mrtydi-v1.1-{config}/{split}.jsonl.gz",
    "Tevatron/msmarco-passage-corpus": lambda config, split: "corpus.jsonl.gz",
    "Tevatron/msmarco-passage": lambda config, split: f"{split}.jsonl.gz",
}


@dataclasses.dataclass
class Settings:
  hub_dir: str = ""        # a folder laid out like the hub, searched first
  download: bool = True    # fetch missing files from the hub (into the Hugging Face cache)


settings = Settings()


def configure(config) -> None:
  """Takes ``data.hub_dir`` and ``data.download`` from a run's config (every process of a run calls it)."""
  settings.hub_dir, settings.download = config.data.hub_dir, bool(config.data.download)


class MissingFile(FileNotFoundError):
  """A hub file that is neither in ``data.hub_dir`` nor in the cache, and may not be downloaded."""


def parse(spec: str) -> tuple[str, str, str]:
  parts = spec[3:].split(":")
  if not spec.startswith("hf:") or len(parts) != 3:
    raise ValueError(f"data spec {spec!r}: expected hf:NAME:CONFIG:SPLIT (CONFIG may be empty)")
  return parts[0], parts[1], parts[2]


def raw_file(spec: str) -> tuple[str, str] | None:
  """``(repo id, file)`` behind an ``hf:`` spec, or None for hub data sets read through ``datasets``."""
  name, config_name, split = parse(spec)
  files = RAW_FILES.get(name)
  return (name, files(config_name, split)) if files else None


def destination(repo_id: str, filename: str, hub_dir: str = "") -> str:
  return os.path.join(hub_dir or settings.hub_dir or "<hub_dir>", repo_id, filename)


def local_file(spec: str) -> str:
  """The local path of the raw file behind ``spec`` (downloaded when allowed), or ``MissingFile``."""
  repo_id, filename = raw_file(spec)
  if settings.hub_dir:
    path = destination(repo_id, filename)
    if os.path.exists(path):
      return path
  try:
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=not settings.download)
  except Exception as error:  # Offline, gated, missing: all mean the file is not here.
    raise MissingFile(
        f"data spec {spec!r}: the hub file {repo_id}/{filename} is not on this machine ({type(error).__name__}). "
        f"Fetch it where the hub is reachable (`huggingface-cli download --repo-type dataset {repo_id} {filename} "
        f"--local-dir HUB_DIR/{repo_id}`) and copy it to {destination(repo_id, filename)}, then run with "
        f"--config.data.hub_dir=HUB_DIR") from None
