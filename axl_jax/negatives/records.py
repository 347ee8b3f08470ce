"""Reading the generator's output (kept apart from ``generate``, whose module defines command-line flags)."""
import os

from axl_jax import io


def read_records(output: str) -> list[dict]:
  """All records of a finished output directory, in work order; a missing shard is an error."""
  manifest = io.read_json(os.path.join(output, "manifest.json"))
  names = [f"shard-{shard:05d}" for shard in range(manifest["num_shards"])]
  missing = [name for name in names if not os.path.exists(os.path.join(output, f"{name}.done.json"))]
  if missing:
    raise FileNotFoundError(f"{output}: {len(missing)} of {len(names)} generator shards are not done "
                            f"(first: {missing[0]}.jsonl); run the generator again to finish them")
  return [record for name in names for record in io.read_jsonl(os.path.join(output, f"{name}.jsonl"))]
