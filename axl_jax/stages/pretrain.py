"""The ``pretrain`` stage: supervised contrastive training on ``pretrain.train_data`` (MS MARCO passage)."""
from axl_jax.stages import training

EXPENSIVE = True
inputs, fingerprint_fields, check_config, run = training.supervised_stage("pretrain")
