"""The ICT-P baseline on Mr.TyDi: ICT on the 11 Mr.TyDi corpora, MS MARCO (10K steps), Mr.TyDi (50K steps).

Starts from ``xlm-roberta-base`` (``model.init_from``: a hub id or a local directory; the checkpoint's
config.json sets the architecture) with its tokenizer. Swap in ``intfloat/multilingual-e5-base``
(with ``model.pooling=mean``), ``castorini/mdpr-tied-pft-msmarco`` or ``facebook/mcontriever`` the same way.
Data: the raw files of the hub's ``castorini/mr-tydi``, ``castorini/mr-tydi-corpus`` and
``Tevatron/msmarco-passage`` (downloaded, or from ``--config.data.hub_dir``: ``axl_jax/hub.py``), prepared
once into TFDS ArrayRecord datasets (``python -m axl_jax.prepare``); or local JSON Lines in the same schema:

  --config.data.corpus='/data/mrtydi/corpus/{lang}.jsonl.gz' --config.data.queries=...

BM25 on 58.7M passages is not a job for bm25s in memory: above ``evaluate.bm25_max_passages`` the table's
BM25 row comes from TREC run files at ``evaluate.bm25_run`` where they exist, e.g. Pyserini's Mr.TyDi BM25
(``python -m pyserini.search.lucene --index mrtydi-v1.1-{lang_name} --topics mrtydi-v1.1-{lang_name}-test
--output run.bm25.mrtydi-v1.1-{lang_name}.test.txt --bm25 --hits 100``).
"""
from configs import default


def get_config():
  config = default.get_config()
  config.tokenizer.name_or_path = "xlm-roberta-base"
  config.model.init_from = "xlm-roberta-base"
  # Shapes of xlm-roberta-base (init_from overwrites them from its config.json).
  config.model.update(vocab_size=250002, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                      max_position_embeddings=514, type_vocab_size=1, position_offset=2, layer_norm_eps=1e-5,
                      pooling="cls", normalize=False, dtype="bfloat16", attention_impl="auto")
  config.data.languages = default.LANGUAGES
  config.data.query_max_length = 64
  config.data.passage_max_length = 256

  config.ict.update(num_steps=10000, batch_size=256, group_size=1, learning_rate=1e-4, warmup_steps=1000,
                    checkpoint_every=1000)
  config.pretrain.update(train_data="hf:Tevatron/msmarco-passage::train", languages="", num_steps=10000,
                         batch_size=128, group_size=8, learning_rate=2e-5, warmup_steps=1000,
                         checkpoint_every=1000)
  config.finetune.update(train_data="hf:castorini/mr-tydi:{lang_name}:train", languages=default.LANGUAGES,
                         num_steps=50000, batch_size=128, group_size=8, learning_rate=1e-5, warmup_steps=1000,
                         checkpoint_every=2000)
  config.evaluate.split = "test"
  config.evaluate.bm25_run = "{root}/bm25/run.bm25.mrtydi-v1.1-{lang_name}.{split}.txt"
  config.evaluate.also_checkpoints = "ict"
  config.evaluate.encode_batch_size = 1024
  config.export.splits = "dev,test"
  return config
