"""Defaults shared by every launch config; variants import ``get_config`` and override a few fields."""
import ml_collections

LANGUAGES = "ar,bn,en,fi,id,ja,ko,ru,sw,te,th"


def train_stage(rows: bool = True, **overrides) -> ml_collections.ConfigDict:
  """Fields of one contrastive training stage; ``rows`` for stages that read training rows of their own."""
  stage = ml_collections.ConfigDict()
  if rows:
    stage.train_data = ""          # training rows: a glob of JSON Lines ({lang} expands) or hf:NAME:CONFIG:SPLIT
    stage.languages = ""           # comma-separated language codes for {lang}; "" = no expansion
  stage.num_steps = 1000           # optimiser steps
  stage.batch_size = 32            # queries per step, over all devices of all hosts
  stage.group_size = 8             # passages per query: 1 positive + (group_size - 1) hard negatives
  stage.optimizer = "adamw"        # adamw | sgd
  stage.learning_rate = 2e-5       # peak learning rate
  stage.warmup_steps = 100         # linear warmup, then linear decay to zero
  stage.weight_decay = 0.01        # AdamW decay; never applied to biases and LayerNorm
  stage.grad_clip_norm = 1.0       # global-norm clipping; 0 = off
  stage.temperature = 1.0          # scores are dot products divided by this
  # GradCache: each device's batch in this many sub-batches, one sub-batch's activations in memory at a time
  # (the same gradient; 512 x 8 passages of 256 tokens on one device). 1 = off.
  stage.grad_cache_chunks = 1
  stage.checkpoint_every = 500     # steps between orbax checkpoints (the last step is always saved)
  stage.keep_checkpoints = 2       # how many checkpoints the stage keeps
  stage.log_every = 50             # steps between metric writes
  stage.init_checkpoint = ""       # start from this checkpoint directory instead of the previous stage
  stage.update(overrides)
  return stage


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                                      # every random choice derives from (seed, step)
  config.stages = "ict,pretrain,finetune,evaluate,export"  # run in this order; up-to-date ones are skipped
  # Stale training stages (made with another config or data) to retrain, with the stages after them:
  # comma-separated names or "all". Without it a run that would throw training away stops first.
  config.recompute = ""
  # Share of each GPU's memory JAX preallocates; the rest is FAISS's (GPU search).
  config.jax_memory_fraction = 0.75

  config.model = ml_collections.ConfigDict()
  config.model.vocab_size = 250002            # filled from the tokenizer when trained from scratch
  config.model.hidden_size = 768
  config.model.num_layers = 12
  config.model.num_heads = 12
  config.model.intermediate_size = 3072
  config.model.max_position_embeddings = 514
  config.model.type_vocab_size = 1            # 2 for BERT, 1 for XLM-R, 0 = no token types
  config.model.position_offset = 2            # XLM-R counts positions from pad_token_id + 1; BERT: 0
  config.model.layer_norm_eps = 1e-5          # XLM-R 1e-5, BERT 1e-12
  config.model.hidden_dropout = 0.1
  config.model.attention_dropout = 0.1
  config.model.initializer_range = 0.02
  config.model.pooling = "cls"                # cls | mean
  config.model.projection_dim = 0             # 0 = no projection head
  config.model.normalize = False              # L2-normalise embeddings
  config.model.tied = True                    # one encoder for queries and passages
  config.model.dtype = "float32"              # compute dtype (bfloat16 on accelerators); params stay float32
  config.model.attention_impl = "xla"         # xla | cudnn (flash attention on NVIDIA) | auto
  config.model.remat = False                  # rematerialise each layer (long passages, big batches)
  config.model.init_from = ""                 # HF encoder (hub id or dir) the first training stage starts from

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.name_or_path = "xlm-roberta-base"  # HF hub id or local dir; "" = train one on the corpus
  config.tokenizer.vocab_size = 8000          # for a tokenizer trained from scratch
  config.tokenizer.train_docs_per_language = 5000

  config.data = ml_collections.ConfigDict()
  config.data.root = ""                       # expands as {root} in every data path
  config.data.languages = LANGUAGES           # languages of the corpus, evaluation and export
  config.data.corpus = "hf:castorini/mr-tydi-corpus:{lang_name}:train"  # or a glob of JSON Lines
  config.data.queries = "hf:castorini/mr-tydi:{lang_name}:{split}"      # dev/test query rows
  config.data.qrels = ""                      # TREC qrels file ("" = read positives from the query rows)
  config.data.query_max_length = 64
  config.data.passage_max_length = 256
  config.data.passage_length_buckets = "64,128,256"  # pad each batch to the smallest bucket that fits
  config.data.title_separator = " "           # passage text = title + separator + text (Tevatron)
  # Where the TFDS ArrayRecord datasets prepared from the files above live ("" = <workdir>/prepared); share
  # one between runs on the same data. Datasets are keyed by the source files' content, never reused stale.
  config.data.prepared_dir = ""
  config.data.hub_dir = ""                    # a folder laid out like the hub (<repo id>/<file>), searched first
  config.data.download = True                 # fetch missing hub files (axl_jax/hub.py) into the HF cache
  config.data.loader_threads = 2              # host threads reading and tokenizing the next batches

  # ICT reads the corpus (ict.corpus or data.corpus of data.languages), not training rows.
  config.ict = train_stage(rows=False, num_steps=10000, batch_size=256, group_size=1, learning_rate=1e-4,
                           warmup_steps=1000, temperature=1.0)
  config.ict.corpus = ""                      # passages for pseudo pairs ("" = data.corpus)
  config.ict.remove_sentence_prob = 0.9       # ORQA: the query sentence leaves its passage 90% of the time
  config.ict.min_sentence_chars = 5           # shorter pieces are not used as pseudo-queries

  config.pretrain = train_stage(train_data="hf:Tevatron/msmarco-passage::train", num_steps=10000)
  config.finetune = train_stage(train_data="hf:castorini/mr-tydi:{lang_name}:train",
                                languages=LANGUAGES, num_steps=50000)

  config.evaluate = ml_collections.ConfigDict()
  config.evaluate.split = "dev"               # query split: dev | test
  config.evaluate.checkpoint = ""             # evaluate this checkpoint dir ("" = the last trained stage)
  config.evaluate.checkpoint_name = "model"   # its row in the tables
  config.evaluate.depth = 100                 # hits kept per query
  # flat (exact inner product) | ivf (IVF-PQ) | hnsw. Approximate indexes are built once per checkpoint and
  # shard, saved beside its embeddings, and their Recall@depth against exact search is reported.
  config.evaluate.index = "flat"
  config.evaluate.ivf_lists = 4096
  config.evaluate.pq_subquantizers = 64       # PQ bytes per vector; 0 = IVF,Flat
  config.evaluate.nprobe = 64                 # IVF lists searched per query
  config.evaluate.hnsw_neighbors = 32
  config.evaluate.hnsw_ef_construction = 80
  config.evaluate.hnsw_ef_search = 256
  config.evaluate.recall_queries = 1000       # queries also searched exactly to measure an index's recall
  config.evaluate.encode_batch_size = 256
  config.evaluate.shard_size = 1000000        # passages per exported shard; FAISS searches shard by shard
  config.evaluate.embedding_dtype = "float16"  # corpus shards on disk (float32 doubles the size)
  config.evaluate.bm25 = True                 # report BM25 on the same data beside the dense model
  # bm25s holds its character-trigram index in memory (~72 KB a passage while indexing, bench/RESULTS.md):
  # above this many passages a language's BM25 row comes from evaluate.bm25_run (or is left out, with a warning).
  config.evaluate.bm25_max_passages = 500000
  config.evaluate.bm25_run = ""               # TREC run files of BM25 ({lang}, {lang_name}, {split} expand)
  config.evaluate.also_checkpoints = ""       # extra stages to evaluate for the table, e.g. "ict"
  # Every other row is tested against this one (paired randomization test and bootstrap intervals over the
  # queries, per language and for the macro average); "" or a system not in the table = no tests.
  config.evaluate.baseline = "finetune"
  config.evaluate.significance_resamples = 10000

  config.export = ml_collections.ConfigDict()
  config.export.checkpoint = ""               # export this checkpoint dir ("" = the last trained stage)
  config.export.splits = "dev"                # query splits to export beside the corpus

  config.generator = ml_collections.ConfigDict()
  config.generator.backend = "qwen"           # qwen (an LLM rewrites) | rules (no model)
  config.generator.checkpoint = "Qwen/Qwen2.5-3B-Instruct"  # hub id or local dir of a Qwen2-architecture model
  config.generator.dtype = "bfloat16"         # weights and compute of the generator
  config.generator.batch_size = 64            # prompts per generate call
  config.generator.max_new_tokens = 512
  config.generator.temperature = 0.7          # 0 = greedy
  config.generator.top_p = 0.9
  config.generator.seed = 0
  config.generator.techniques = "entity_substitution,numerical_perturbation,logical_negation"
  # The standalone generator's rows; in a run, the rounds generate for finetune's rows and languages.
  config.generator.languages = LANGUAGES
  config.generator.train_data = ""            # training rows whose positives are rewritten ("" = finetune's)
  config.generator.max_queries_per_language = 0  # 0 = all
  config.generator.shard_size = 512           # records per output shard (the unit of resumption)
  # Environment of the generator process, "NAME=value NAME=value": e.g. on a multi-host TPU slice, the
  # variables that make each host's generator a one-host slice of its own chips (README: many hosts).
  config.generator.env = ""

  config.adversarial = ml_collections.ConfigDict()
  config.adversarial.rounds = 2               # stages round_1 .. round_N: generate -> filter -> train -> dev eval
  config.adversarial.keep_fraction = 0.25     # share of the eligible candidates kept, per language and round
  config.adversarial.selection = "hardest"    # hardest | random | all (ablations)
  config.adversarial.guard = True             # false-negative guard: drop s(q,neg) >= s(q,pos) - guard_margin
  config.adversarial.guard_margin = 0.0
  config.adversarial.adversarial_per_group = 1  # kept adversarial negatives in each training group
  # Where the rounds' negatives come from: generated (the generator's rewrites), mined (the current model's
  # top-ranked passages that are not judged relevant, ANCE/Tevatron-style) or both: "generated,mined".
  config.adversarial.sources = "generated"
  config.adversarial.mine_skip = 3            # non-relevant hits skipped at the top (likely unjudged positives)
  config.adversarial.mine_depth = 30          # mined candidates: non-relevant hits mine_skip+1 .. mine_depth
  config.adversarial.mined_keep_fraction = 1.0  # of the mined candidates past the guard (hardest first)
  config.adversarial.mined_per_group = 1      # kept mined negatives in each training group
  config.adversarial.score_batch_size = 256   # encoding batch when scoring candidates
  config.adversarial.seed = 0                 # varies the rounds' batches and filter alone (seeds of ablations)
  # The rounds train on finetune's rows (and generate for them); init_checkpoint applies to round_1 only.
  config.adversarial.train = train_stage(rows=False, num_steps=2000, batch_size=128, group_size=8,
                                         learning_rate=5e-6, warmup_steps=100, checkpoint_every=500)

  config.visualize = ml_collections.ConfigDict()
  config.visualize.queries_per_language = 30  # queries whose query/positive/BM25/adversarial points are plotted
  config.visualize.perplexity = 30.0          # t-SNE perplexity

  config.logging = ml_collections.ConfigDict()
  config.logging.wandb = False                # also log to Weights & Biases (needs `pip install wandb`)
  config.logging.wandb_project = "axl-jax"
  return config
