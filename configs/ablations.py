"""Ablations of the adversarial rounds on the demo data: ``--config=configs/ablations.py:<variant>``.

Where the negatives come from (the filter as in the method: false-negative guard, hardest 25% per language):
  none       the rounds' training steps with BM25 negatives only: what more steps alone do (the control)
  full       generated negatives (the demo's rules backend), the method as published
  mined      the current model's own top-ranked non-positives (ANCE/Tevatron-style), no generation
  both       generated and mined, each filtered on its own
  demo       the demo's own rounds (generated and mined, groups of 4: 1 generated + 2 mined negatives), to
             measure the demo's setting at other seeds
How generated negatives are filtered:
  no_filter  every generated negative that passed the generator's checks
  random     a random 25%, no guard
  no_guard   the hardest 25% without the false-negative guard

Each variant runs only the adversarial rounds and the evaluation: ``launch/ablations.sh`` copies the
demo's ICT, pretraining and fine-tuning stages into one workdir per variant and seed, so all start from the
same supervised baseline; ``--config.adversarial.seed`` (with ``--config.generator.seed``, 1000 apart: each round
adds its number to it) varies the rounds.
"""
from configs import demo

VARIANTS = {
    "none": dict(sources="generated", adversarial_per_group=0),
    "full": dict(sources="generated", selection="hardest", guard=True),
    "mined": dict(sources="mined", selection="hardest", guard=True),
    "both": dict(sources="generated,mined", selection="hardest", guard=True),
    "demo": {},
    "no_filter": dict(sources="generated", selection="all", guard=False),
    "random": dict(sources="generated", selection="random", guard=False),
    "no_guard": dict(sources="generated", selection="hardest", guard=False),
}


def get_config(variant: str = "full"):
  if variant not in VARIANTS:
    raise ValueError(f"unknown ablation {variant!r}; expected one of {sorted(VARIANTS)}")
  config = demo.get_config()
  if variant != "demo":
    # The settings of the README's ablation table: groups of 3 with at most one mined negative (the demo
    # trains on groups of 4: 1 generated + 2 mined).
    config.adversarial.train.group_size = 3
    config.adversarial.mined_per_group = 1
  config.adversarial.update(VARIANTS[variant])
  config.stages = "round_1,round_2,evaluate"
  config.evaluate.also_checkpoints = "finetune"
  config.evaluate.bm25 = False
  return config
