#!/usr/bin/env bash
# Issue #11's one-shot GPU check, within 8 minutes: the cuDNN parity test, then bench/compare.py --shape=h200.
#   OUT=/tmp/out bash bench/device_check.sh
# Writes to $OUT: nvidia-smi.txt, install.log, pytest.log, compare.log and compare.json (rewritten after each
# kind of work, so a run cut short keeps what it measured). A failing part does not stop the next.
#
# Where python3 already has CUDA builds of jax and torch (the lent H200 image also has transformers, flax,
# optax and pytest, but no ml-collections or faiss, and reaches no registry) it is used as it is, and what
# does not import is installed into a temporary folder on PYTHONPATH, from .whl/ when there, else from the
# registry. For an offline machine, download here and carry .whl:
#   pip download --no-deps -d .whl ml-collections faiss-cpu --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64
# (faiss-gpu's wheel is 135 MB and wants CUDA 12 libraries; with faiss-cpu on a GPU, compare.py reports its
# FAISS rows as failed.) Elsewhere: a fresh venv with requirements-gpu.txt, torch and transformers.
set -x
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false
deadline=$((SECONDS + 460))  # 8 minutes, less a margin for the end of the call
left() { local seconds=$((deadline - SECONDS)); echo $((seconds > 20 ? seconds : 20)); }
scratch="$(mktemp -d)"

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{
  PY=python3
  index=(--retries 1 --timeout 10)  # the registry, failing fast where there is none
  [ -d .whl ] && index=(--no-index --find-links .whl)
  gpu_check="import jax, torch; assert jax.default_backend() == 'gpu' and torch.cuda.is_available()"
  if "$PY" -c "$gpu_check"; then
    # --no-deps: pip --target would install every dependency again beside the image's own.
    install() { timeout 240 "$PY" -m pip install -q --disable-pip-version-check "${index[@]}" --no-deps --target "$@"; }
    export PYTHONPATH="$scratch/site${PYTHONPATH:+:$PYTHONPATH}"
    for need in ml_collections:ml-collections absl:absl-py flax:flax optax:optax orbax:orbax-checkpoint \
                transformers:transformers safetensors:safetensors tqdm:tqdm pytest:pytest; do
      "$PY" -c "import ${need%%:*}" 2> /dev/null || install "$scratch/site" "${need#*:}"
    done
    if ! "$PY" -c "import faiss" 2> /dev/null; then
      # faiss-gpu wants CUDA 12 libraries: kept apart, and used only if JAX and torch still find their GPU.
      install "$scratch/faiss" faiss-gpu nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-curand-cu12
      if PYTHONPATH="$PYTHONPATH:$scratch/faiss" "$PY" -c "$gpu_check; import faiss; assert faiss.get_num_gpus()"; then
        export PYTHONPATH="$PYTHONPATH:$scratch/faiss"
      else
        install "$scratch/site" faiss-cpu
      fi
    fi
  else
    "$PY" -m venv "$scratch/venv"
    PY="$scratch/venv/bin/python"
    pip=("$PY" -m pip install -q --disable-pip-version-check "${index[@]}")
    timeout 300 "${pip[@]}" -r requirements-gpu.txt pytest torch transformers
    "$PY" -m pip uninstall -q -y faiss-cpu  # requirements.txt's; its files overlap faiss-gpu's
    timeout 60 "${pip[@]}" --force-reinstall --no-deps faiss-gpu
  fi
  "$PY" -c "import jax, torch, faiss; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__,
            torch.cuda.is_available()); print('faiss', faiss.__version__, faiss.get_num_gpus(), 'GPUs')"
} > "$OUT/install.log" 2>&1

timeout 120 "$PY" -m pytest -q -rs tests/test_hf_parity.py -k cudnn > "$OUT/pytest.log" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.log"
timeout "$(left)" "$PY" bench/compare.py --shape=h200 --json "$OUT/compare.json" > "$OUT/compare.log" 2>&1
echo "compare.py exit $?" >> "$OUT/compare.log"

set +x
tail -n 3 "$OUT/install.log" "$OUT/pytest.log"
grep -E '^\||exit' "$OUT/compare.log"
rm -rf "$scratch"
