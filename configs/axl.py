"""The full AXL-ICT method on real data.

ICT on the Mr.TyDi corpora -> MS MARCO 10K steps -> Mr.TyDi 50K steps (the ICT-P baseline of
``ict_p.py``) -> adversarial rounds with Qwen2.5-3B-Instruct rewriting Mr.TyDi training positives,
filtered by the current retriever -> evaluation on the Mr.TyDi test sets of all 11 languages
(BM25, ICT only, the ICT-P baseline and AXL side by side) -> cluster plots and report -> export.
"""
from configs import ict_p


def get_config():
  config = ict_p.get_config()
  config.adversarial.rounds = 3
  config.stages = ",".join(["ict", "pretrain", "finetune"] + [f"round_{i}" for i in range(1, 4)]
                           + ["evaluate", "visualize", "export", "export_hf"])
  config.adversarial.train.update(num_steps=5000, batch_size=128, group_size=8, learning_rate=5e-6,
                                  warmup_steps=200, checkpoint_every=1000)
  config.adversarial.adversarial_per_group = 2
  config.generator.backend = "qwen"
  config.generator.checkpoint = "Qwen/Qwen2.5-3B-Instruct"
  config.generator.dtype = "bfloat16"
  config.generator.batch_size = 64
  config.generator.temperature = 0.7
  config.generator.shard_size = 2048
  config.evaluate.also_checkpoints = "ict,finetune"
  return config
