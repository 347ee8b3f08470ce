"""Reading the generator's output (kept apart from ``generate``, whose module defines command-line flags)."""
import os

from axl_jax import io


def read_records(output: str) -> list[dict]:
  """All records of a finished (or partial) output directory, in work order."""
  manifest = io.read_json(os.path.join(output, "manifest.json"))
  return [record for name in sorted(manifest["shards"]) for record in io.read_jsonl(os.path.join(output, name))]
