"""The ``finetune`` stage: supervised contrastive training on ``finetune.train_data`` (Mr.TyDi train).

Groups of a query's positive and its hard (BM25) negatives, rows of every language in ``finetune.languages``.
The adversarial rounds train on (and generate for) these same rows.
"""
from axl_jax.stages import training

EXPENSIVE = True
inputs, fingerprint_fields, check_config, run = training.supervised_stage("finetune")
