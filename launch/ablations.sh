#!/usr/bin/env bash
# Runs the ablations of the rounds on the demo data, for several seeds of the rounds, and prints one table
# (mean and spread over seeds, paired tests against the supervised baseline). Needs a finished demo run
# (bash launch/demo.sh): every variant and seed starts from its tokenizer and ICT/pretrain/finetune stages.
#   VARIANTS="none full mined both" SEEDS="0 1 2" bash launch/ablations.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false
DEMO="${DEMO:-runs/demo}"
VARIANTS="${VARIANTS:-none full mined both no_filter random no_guard}"
SEEDS="${SEEDS:-0 1 2}"
for stage in tokenizer ict pretrain finetune; do
  [ -e "$DEMO/$stage" ] || { echo "no $DEMO/$stage: run bash launch/demo.sh first" >&2; exit 1; }
done
workdirs=()
for variant in $VARIANTS; do
  for seed in $SEEDS; do
    workdir="runs/ablation-$variant-seed$seed"
    mkdir -p "$workdir"
    for stage in tokenizer ict pretrain finetune; do
      [ -e "$workdir/$stage" ] || cp -r "$DEMO/$stage" "$workdir/$stage"
    done
    # The demo's prepared data sets serve every variant (they are keyed by their source files' content).
    .venv/bin/python -m axl_jax.main --config="configs/ablations.py:$variant" --workdir="$workdir" \
        --config.data.prepared_dir="$DEMO/prepared" --config.adversarial.seed="$seed" \
        --config.generator.seed="$((1000 * seed))"
    workdirs+=("$variant=$workdir")
  done
done
.venv/bin/python -m axl_jax.ablation_table "${workdirs[@]}" | tee runs/ablations.md
