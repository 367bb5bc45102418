#!/usr/bin/env bash
# Prove the GPU path on a CUDA machine in one command: install what the machine lacks, run the
# GPU acceptance tests (pytest -m gpu), run eval/bench_gpu.py, print one summary table.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_check.sh [--wheels DIR] [--python PY] [--epochs N] [--skip-tests]

Runs on a machine with a CUDA GPU and a Python that has torch + torchvision (as GPU images do):
  1. installs the packages ssl_sec needs that this Python lacks (kornia, lightly, faiss, ...);
  2. runs the GPU acceptance tests: python -m pytest tests -m gpu;
  3. runs the GPU benchmark: python eval/bench_gpu.py, which writes
     eval/results/gpu_<gpu>.json and prints the summary table.
It takes under 10 minutes on an H100-class GPU. The exit code is that of the tests.

options:
  --wheels DIR   offline machine: install from the wheel files in DIR only (pip --no-index).
                 Make DIR where a registry is reachable, for the GPU machine's Python:
                   bash scripts/gpu_wheels.sh DIR --python-version 3.12
                 Without --wheels, missing packages come from the package registry.
  --python PY    the interpreter to use (default: python3)
  --epochs N     pretraining epochs per recipe in the benchmark (default: 3)
  --skip-tests   benchmark only
  -h, --help     this text
environment: TEST_TIMEOUT (seconds for the test suite, default 420), SSL_SEC_DATA.

Data: CIFAR-10 in the standard python format under $SSL_SEC_DATA (or ./data, or ../shared/data).
EOF
}

WHEELS=""
PY=python3
EPOCHS=3
RUN_TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    --epochs) EPOCHS=${2:?--epochs needs a number}; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "gpu_check.sh: --wheels '$WHEELS' is not a folder; make it with scripts/gpu_wheels.sh" >&2
  exit 2
fi
if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: '$PY' has no torch+torchvision that sees a CUDA GPU; run this on a GPU machine" >&2
  exit 2
fi
if [ -z "${SSL_SEC_DATA:-}" ] && [ ! -d data/cifar-10-batches-py ] && [ -d ../shared/data/cifar-10-batches-py ]; then
  SSL_SEC_DATA="$(cd ../shared/data && pwd)"
  export SSL_SEC_DATA
fi
SECONDS=0

# 1. install what is missing (torch and torchvision are the machine's own: never replaced)
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"kornia": "kornia>=0.9,<0.11", "lightly": "lightly>=1.5", "faiss": "faiss-cpu>=1.8",
        "yaml": "pyyaml>=6.0", "tqdm": "tqdm>=4.60", "tensorboard": "tensorboard>=2.14",
        "pytest": "pytest>=7", "sklearn": "scikit-learn>=1.3", "safetensors": "safetensors>=0.4"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "== installing: $missing"
  read -r -a specs <<<"$missing"
  if [ -n "$WHEELS" ]; then
    # If pip's resolver objects to something the image pins, install the folder as it is.
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${specs[@]}" \
      || "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
  else
    "$PY" -m pip install --quiet "${specs[@]}"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# cuBLAS reads this at its first call: the deterministic-resume test needs it set up front.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
"$PY" - <<'EOF'
import faiss, kornia, lightly, torch, torchvision
print(f"== {torch.cuda.get_device_name(0)}: torch {torch.__version__}, torchvision "
      f"{torchvision.__version__}, kornia {kornia.__version__}, lightly {lightly.__version__}, "
      f"faiss {faiss.__version__} (GPU index: {getattr(faiss, 'get_num_gpus', lambda: 0)() > 0})")
EOF

# 2. the GPU acceptance tests
status=0
junit=$(mktemp --suffix=.xml)
if [ "$RUN_TESTS" = 1 ]; then
  echo "== GPU tests (pytest -m gpu)"
  # A hung test must not eat the benchmark's time: the suite gets TEST_TIMEOUT seconds.
  timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest tests -m gpu -ra -p no:cacheprovider \
    --junitxml="$junit" || status=$?
fi

# 3. the benchmark (also when a test failed: its figures still say where things stand)
echo "== benchmark (eval/bench_gpu.py)"
"$PY" eval/bench_gpu.py --epochs "$EPOCHS" --tests-junit "$junit"
rm -f "$junit"
echo "== gpu_check.sh took $((SECONDS / 60)) min $((SECONDS % 60)) s; tests exit code $status"
exit "$status"
