"""Restore any checkpoint and evaluate or export it, without training.

  python -m axl_jax.main --config=configs/evaluate.py:demo --workdir=runs/eval \
      --config.evaluate.checkpoint=runs/demo/finetune/checkpoints \
      --config.tokenizer.name_or_path=runs/demo/tokenizer

The checkpoint carries its model config. The argument after ``:`` picks the data/launch config whose
data fields are used (``demo`` or ``ict_p``). ``--config.stages=export`` exports embedding shards
instead, ``--config.stages=export_hf`` a Hugging Face / sentence-transformers model directory (both
read ``--config.export.checkpoint``).
"""
import importlib


def get_config(base: str = "demo"):
  config = importlib.import_module(f"configs.{base}").get_config()
  config.stages = "evaluate"
  config.evaluate.also_checkpoints = ""
  return config
