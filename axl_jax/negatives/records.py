"""Reading the generator's output (kept apart from ``generate``, whose module defines command-line flags)."""
import json
import os


def read_records(output: str) -> list[dict]:
  """All records of a finished (or partial) output directory, in work order."""
  with open(os.path.join(output, "manifest.json"), encoding="utf-8") as file:
    manifest = json.load(file)
  records = []
  for name in sorted(manifest["shards"]):
    with open(os.path.join(output, name), encoding="utf-8") as file:
      records.extend(json.loads(line) for line in file)
  return records
