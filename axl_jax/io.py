"""The one place that writes files atomically and reads JSON Lines.

Every artefact of a run (manifests, shards, run files, decisions) is written to ``<path>.partial``,
flushed and fsynced, then renamed over ``path``: a reader (or a resumed run) sees the old file or the
whole new one, never half of one, even after a power loss. Directories are made on demand.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Iterable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator:
  """An open file that replaces ``path`` when the block ends without an error (text modes are UTF-8)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  # One per writer: two processes (on one host or on hosts sharing a file system) never share a temporary file.
  partial = f"{path}.partial-{socket.gethostname()}-{os.getpid()}"
  encoding = None if "b" in mode else "utf-8"
  try:
    with open(partial, mode, encoding=encoding) as file:
      yield file
      file.flush()
      os.fsync(file.fileno())
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)
    raise
  os.replace(partial, path)


def write_text(path: str, text: str) -> None:
  with atomic_open(path) as file:
    file.write(text)


def write_lines(path: str, lines: Iterable[str]) -> None:
  with atomic_open(path) as file:
    file.writelines(line + "\n" for line in lines)


def write_json(path: str, value) -> None:
  with atomic_open(path) as file:
    json.dump(value, file, indent=2, ensure_ascii=False, sort_keys=True)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  with atomic_open(path) as file:
    file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def save_npy(path: str, array: np.ndarray) -> None:
  with atomic_open(path, "wb") as file:
    np.save(file, array)


def read_json(path: str):
  with open(path, encoding="utf-8") as file:
    return json.load(file)


def read_jsonl(path: str) -> list[dict]:
  """Rows of a JSON Lines file this project wrote (blank lines skipped)."""
  with open(path, encoding="utf-8") as file:
    return [json.loads(line) for line in file if line.strip()]


def read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as file:
    return [line.rstrip("\n") for line in file]
