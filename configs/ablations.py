"""Ablations of the adversarial filter on the demo data: ``--config=configs/ablations.py:<variant>``.

  full       the method: false-negative guard, then the hardest 25% per language (the demo's setting)
  no_filter  every generated negative that passed the generator's checks
  random     a random 25%, no guard
  no_guard   the hardest 25% without the false-negative guard

Each variant runs only the adversarial rounds and the evaluation: ``launch/ablations.sh`` copies the
demo's ICT, pretraining and fine-tuning stages into one workdir per variant so all start from the same
supervised baseline.
"""
from configs import demo

VARIANTS = {
    "full": dict(selection="hardest", guard=True),
    "no_filter": dict(selection="all", guard=False),
    "random": dict(selection="random", guard=False),
    "no_guard": dict(selection="hardest", guard=False),
}


def get_config(variant: str = "full"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown ablation {variant!r}; expected one of {sorted(VARIANTS)}")
  config = demo.get_config()
  config.adversarial.update(VARIANTS[variant])
  config.stages = "round_1,round_2,evaluate"
  config.evaluate.also_checkpoints = "finetune"
  config.evaluate.bm25 = False
  return config
