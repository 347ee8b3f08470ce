"""The embedded demo: a tiny encoder trained from scratch on tydi-mini, minutes on two CPU cores.

ICT on the 11-language corpus -> English supervised pairs (the MS MARCO stand-in) -> multilingual
supervised training on tydi-mini train -> evaluation on tydi-mini dev (BM25, ICT-only and final
model side by side) -> embedding export.
"""
import os

from configs import default

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "tydi-mini")


def get_config():
  config = default.get_config()
  config.tokenizer.name_or_path = ""          # train a BPE tokenizer on the corpus
  config.tokenizer.vocab_size = 8000
  config.tokenizer.train_docs_per_language = 3000

  config.model.update(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                      max_position_embeddings=128, type_vocab_size=0, position_offset=0,
                      layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.0,
                      pooling="mean", normalize=True)

  config.data.root = DATA
  config.data.corpus = "{root}/corpus/{lang}.jsonl.gz"
  config.data.queries = "{root}/{split}/{lang}.jsonl.gz"
  config.data.qrels = "{root}/qrels/{split}.{lang}.tsv"
  config.data.query_max_length = 32
  config.data.passage_max_length = 96
  config.data.passage_length_buckets = "64,96"

  # Normalised embeddings need a temperature well below 1 for the softmax to be sharp.
  common = dict(temperature=0.05, weight_decay=0.01, checkpoint_every=200, log_every=50, keep_checkpoints=1)
  config.ict.update(num_steps=400, batch_size=64, group_size=1, learning_rate=1e-3, warmup_steps=40, **common)
  config.pretrain.update(train_data="{root}/pretrain-en/train*.jsonl.gz", languages="", num_steps=150,
                         batch_size=32, group_size=3, learning_rate=5e-4, warmup_steps=20, **common)
  config.finetune.update(train_data="{root}/train/{lang}*.jsonl.gz", languages=default.LANGUAGES,
                         num_steps=500, batch_size=32, group_size=3, learning_rate=2e-4, warmup_steps=50,
                         **common)

  config.stages = "ict,pretrain,finetune,round_1,round_2,evaluate,visualize,export"
  # Adversarial rounds with the rules backend: candidates for every training query each round.
  config.adversarial.rounds = 2
  config.adversarial.train.update(num_steps=100, batch_size=32, group_size=4, learning_rate=1e-4, warmup_steps=10,
                                  **common)
  # Rule-made negatives and the model's own mined ones (non-relevant ranks 4-13 of each query); groups of 4:
  # the positive, 1 generated, 2 mined. The ablations (README) measure each source alone.
  config.adversarial.sources = "generated,mined"
  config.adversarial.mine_depth = 13
  config.adversarial.mined_per_group = 2
  config.generator.backend = "rules"
  config.generator.shard_size = 512
  config.visualize.queries_per_language = 20

  config.evaluate.split = "dev"
  config.evaluate.also_checkpoints = "ict,finetune"  # BM25, ICT only, the supervised baseline and AXL
  config.evaluate.encode_batch_size = 128
  config.evaluate.shard_size = 1000            # several shards per language exercise the merge
  config.export.splits = "dev"
  return config
