"""A seconds-long config for the tests: the demo's stages and data, a 1-layer model, few steps."""
from configs import demo


def get_config():
  config = demo.get_config()
  config.tokenizer.vocab_size = 600
  config.tokenizer.train_docs_per_language = 200
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
  config.data.languages = "bn,th"
  config.data.query_max_length = 16
  config.data.passage_max_length = 48
  config.data.passage_length_buckets = "32,48"
  config.adversarial.rounds = 1
  config.adversarial.sources = "generated"  # mining has its own test (test_end_to_end)
  config.stages = "ict,pretrain,finetune,round_1,evaluate,visualize,export"
  for name in ("ict", "pretrain", "finetune"):
    getattr(config, name).update(num_steps=6, batch_size=8, checkpoint_every=3, log_every=2, warmup_steps=2)
  config.finetune.languages = "bn,th"
  config.adversarial.train.update(num_steps=4, batch_size=8, group_size=3, checkpoint_every=2, log_every=2,
                                  warmup_steps=1)
  config.visualize.queries_per_language = 5
  config.evaluate.encode_batch_size = 32
  config.evaluate.shard_size = 50
  return config
