"""The stages of a run, one module each, found by name by ``axl_jax.pipeline``.

A stage module defines:

- ``EXPENSIVE``: True when recomputing it throws away training (the pipeline then asks before it does);
- ``inputs(config, name, available) -> list[str]``: the stages whose outputs it reads, given which
  stages are available (configured to run, or complete in the workdir);
- ``fingerprint_fields(config, name) -> dict``: the config values and data identities that decide its
  output (the pipeline adds the model, tokenizer, lengths and seed);
- ``check_config(config, name) -> list[str]``: validates its config fields at launch and returns the
  local data specs it will read, which must exist;
- ``run(ctx) -> StageResult``.

``training`` holds what the training stages share; it is not a stage.
"""
from __future__ import annotations

import dataclasses

HELPERS = ("training",)


@dataclasses.dataclass
class StageResult:
  metrics: dict
  checkpoint: str | None = None     # final checkpoint directory (training stages)
