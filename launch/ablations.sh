#!/usr/bin/env bash
# Runs the filter ablations on the demo data and prints one MRR@100 table. Needs a finished demo run
# (bash launch/demo.sh): every variant starts from its tokenizer and ICT/pretrain/finetune stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false
DEMO="${DEMO:-runs/demo}"
for stage in tokenizer ict pretrain finetune; do
  [ -e "$DEMO/$stage" ] || { echo "no $DEMO/$stage: run bash launch/demo.sh first" >&2; exit 1; }
done
for variant in full no_filter random no_guard; do
  workdir="runs/ablation-$variant"
  mkdir -p "$workdir"
  for stage in tokenizer ict pretrain finetune; do
    [ -e "$workdir/$stage" ] || cp -r "$DEMO/$stage" "$workdir/$stage"
  done
  # The demo's prepared data sets serve every variant (they are keyed by their source files' content).
  .venv/bin/python -m axl_jax.main --config="configs/ablations.py:$variant" --workdir="$workdir" \
      --config.data.prepared_dir="$DEMO/prepared"
done
.venv/bin/python - <<'PY'
import json
rows = []
for variant in ("full", "no_filter", "random", "no_guard"):
    results = json.load(open(f"runs/ablation-{variant}/evaluate/results.json"))
    stats = [json.load(open(f"runs/ablation-{variant}/round_{r}/round_stats.json")) for r in (1, 2)]
    if not rows:
        base = results["finetune"]
        rows.append(("supervised baseline (finetune)", base, "-"))
    rows.append((f"AXL, {variant}", results["round_2"], " / ".join(str(s["kept"]) for s in stats)))
languages = list(rows[0][1])
print("| MRR@100 | " + " | ".join(languages) + " | avg | kept (round 1 / 2) |")
print("|---|" + "---|" * (len(languages) + 2))
for name, per_language, kept in rows:
    values = [per_language[l]["MRR@100"] for l in languages]
    print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {sum(values) / len(values):.3f} | {kept} |")
PY
