#!/usr/bin/env bash
# All of the GPU acceptance work in one command that fits a short GPU window (<= 8 minutes on an
# H100/H200): install what the machine lacks, unpack the data, run the GPU tests and the two GPU
# benchmarks, each stage under its own timeout, then print a per-stage time table and write
# one summary JSON.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_check.sh [--wheels DIR] [--pack DIR] [--python PY] [--epochs N]
                                 [--workdir DIR] [--copy-results DIR] [--only STAGES]
                                 [--skip-tests]

Runs on a machine with a CUDA GPU and a Python that has torch + torchvision (as GPU images do).
Stages, each under a timeout so that one hang cannot eat the window (seconds; env to change):
  setup      30  install the packages ssl_sec needs that this Python lacks (kornia, lightly,
                 faiss, ...; from --wheels DIR when given)                    SETUP_TIMEOUT
  pack       15  with --pack DIR: check and unpack the data pack (scripts/gpu_pack.sh) into
                 PACK_DEST (default /tmp/ssl_sec_data) and use it as SSL_SEC_DATA  PACK_TIMEOUT
  tests     230  the GPU acceptance tests: python -m pytest tests -m gpu (views, recipes,
                 faults: tests/test_gpu*.py, tests/test_recipes.py)           TEST_TIMEOUT
  cifar      60  eval/bench_gpu.py --epochs N (CIFAR-10 recipes, kNN, linear probe, lightly
                 reference, 2 trials): eval/results/gpu_<gpu>.json             CIFAR_TIMEOUT
  folder     15  build the ImageNet-size folder: 12,800 + 500 JPEGs at 500x375 made from the
                 Imagenette sample (eval/jpeg_folder.py), in --workdir         FOLDER_TIMEOUT
  imagenet  120  eval/bench_imagenet_gpu.py on that folder: the ImageNet-100 recipes, i.e.
                 `python -m ssl_sec pretrain recipes/imagenet100/simclr.yaml data.root=FOLDER
                 data.classes_file=null data.workers=<cores> data.decode=cpu|gpu` and
                 simclr_resnet50.yaml, two whole epochs each (ResNet-18's runs end with
                 the recipe's kNN pass), the loader alone, lightly's ImageFolder pipeline,
                 each under 60 s: eval/results/imagenet_gpu_<gpu>.json
                                                                             IMAGENET_TIMEOUT
The timeouts add up to 470 s, leaving 10 s of the 8-minute budget for the checks before
and the report after. (They are a plan, not yet a measurement: the suite and the ImageNet
stage have not run on a GPU in this form. Stage times are in the table at the end; a stage
that runs out of time is a failure, and `--only` reruns it alone.) Then a table of the stages' times and results, and
eval/results/gpu_check_<gpu>.json (stages, pass/fail counts, pytest's counts, the benchmarks'
headline figures, GPU and host CPU). The exit code is 0 when every stage passed.

options:
  --wheels DIR        offline machine: install from the wheel files in DIR only (pip
                      --no-index). Make DIR where a registry is reachable, for the GPU
                      machine's Python:  bash scripts/gpu_wheels.sh DIR --python-version 3.12
                      Without --wheels, missing packages come from the package registry.
  --pack DIR          offline machine: the data pack made by  bash scripts/gpu_pack.sh DIR
                      (a CIFAR-10 subset and the JPEG sample). Without it the data is
                      $SSL_SEC_DATA, else ./data, else ../shared/data (the full CIFAR-10 there
                      gives the full-set CIFAR figures).
  --python PY         the interpreter to use (default: python3)
  --epochs N          pretraining epochs per CIFAR recipe in eval/bench_gpu.py (default: 2)
  --workdir DIR       where the ImageNet-size folder and its runs go (default:
                      /tmp/ssl_sec_gpu_check; a folder already built there is reused)
  --copy-results DIR  also copy the JSON files this run wrote into DIR, and the stage table
                      and the ImageNet benchmark's per-run logs as gpu_check_logs.tar.gz
  --only STAGES       run only these stages, e.g. --only setup,pack,imagenet (a rerun of
                      what failed, in what is left of a GPU window); the others are skipped
  --skip-tests        no GPU tests (the benchmarks only): the same as leaving out "tests"
  -h, --help          this text
EOF
}

WHEELS=""
PACK=""
PY=python3
EPOCHS=2
WORK=/tmp/ssl_sec_gpu_check
COPY_TO=""
ONLY="setup,pack,tests,cifar,folder,imagenet"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --pack) PACK=${2:?--pack needs a folder}; shift 2 ;;
    --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
    --epochs) EPOCHS=${2:?--epochs needs a number}; shift 2 ;;
    --workdir) WORK=${2:?--workdir needs a folder}; shift 2 ;;
    --copy-results) COPY_TO=${2:?--copy-results needs a folder}; shift 2 ;;
    --only) ONLY=${2:?--only needs a list of stages}; shift 2 ;;
    --skip-tests) ONLY=${ONLY//tests/}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
for name in ${ONLY//,/ }; do
  case "$name" in
    setup|pack|tests|cifar|folder|imagenet) ;;
    *) echo "gpu_check.sh: --only: no stage '$name' (see --help)" >&2; exit 2 ;;
  esac
done
for dir in "$WHEELS" "$PACK"; do
  if [ -n "$dir" ] && [ ! -d "$dir" ]; then
    echo "gpu_check.sh: '$dir' is not a folder (make it with scripts/gpu_wheels.sh or" \
      "scripts/gpu_pack.sh)" >&2
    exit 2
  fi
done
if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: '$PY' has no torch+torchvision that sees a CUDA GPU; run this on a GPU machine" >&2
  exit 2
fi
WHEELS=${WHEELS:+$(cd "$WHEELS" && pwd)}
PACK=${PACK:+$(cd "$PACK" && pwd)}
PACK_DEST=${PACK_DEST:-/tmp/ssl_sec_data}
if [ -n "$PACK" ]; then
  SSL_SEC_DATA=$PACK_DEST
elif [ -z "${SSL_SEC_DATA:-}" ] && [ ! -d data/cifar-10-batches-py ] && [ -d ../shared/data/cifar-10-batches-py ]; then
  SSL_SEC_DATA="$(cd ../shared/data && pwd)"
fi
export PY WHEELS PACK PACK_DEST
[ -n "${SSL_SEC_DATA:-}" ] && export SSL_SEC_DATA
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# cuBLAS reads this at its first call: the deterministic-resume test needs it set up front.
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"

# ----------------------------------------------------------------------------- stage bodies
# Functions run under `timeout` through `bash -c`, hence exported.
install_missing() {
  # torch and torchvision are the machine's own: never replaced.
  local missing
  missing=$("$PY" - <<'EOF'
import importlib.util
need = {"kornia": "kornia>=0.9,<0.11", "lightly": "lightly>=1.5", "faiss": "faiss-cpu>=1.8",
        "yaml": "pyyaml>=6.0", "tqdm": "tqdm>=4.60", "tensorboard": "tensorboard>=2.14",
        "pytest": "pytest>=7", "sklearn": "scikit-learn>=1.3", "safetensors": "safetensors>=0.4"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
EOF
)
  if [ -n "$missing" ]; then
    echo "installing: $missing"
    local specs
    read -r -a specs <<<"$missing"
    if [ -n "$WHEELS" ]; then
      # If pip's resolver objects to something the image pins, install the folder as it is.
      "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "${specs[@]}" \
        || "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
    else
      "$PY" -m pip install --quiet "${specs[@]}"
    fi
  fi
  "$PY" - <<'EOF'
import faiss, kornia, lightly, torch, torchvision
print(f"{torch.cuda.get_device_name(0)}: torch {torch.__version__}, torchvision "
      f"{torchvision.__version__}, kornia {kornia.__version__}, lightly {lightly.__version__}, "
      f"faiss {faiss.__version__} (GPU index: {getattr(faiss, 'get_num_gpus', lambda: 0)() > 0})")
EOF
}

unpack_data() {
  (cd "$PACK" && sha256sum --check --quiet SHA256SUMS)
  rm -rf "$PACK_DEST"
  mkdir -p "$PACK_DEST"
  # Parts are named .00, .01, ...: the glob's order is theirs. Python's lzma reads any xz
  # filter chain, so no xz binary is needed.
  cat "$PACK"/ssl_sec_data.tar.xz.* | "$PY" -c 'import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall(sys.argv[1], filter="data")' "$PACK_DEST"
  cat "$PACK_DEST/PACK.md"
}
export -f install_missing unpack_data

# ----------------------------------------------------------------------------- stages
STAGES="$WORK/stages.tsv"
: >"$STAGES"
FAILED=0
# stage NAME TIMEOUT COMMAND...: run it under the timeout (a hang is killed with its process
# group 10 s after TERM), record name, timeout, seconds, result, exit code and command.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== [$name] (timeout ${limit} s): $*"
  local t0=$SECONDS rc=0 result=pass
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result=timeout
  elif [ "$rc" != 0 ]; then
    result=fail
  fi
  [ "$result" = pass ] || FAILED=$((FAILED + 1))
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$limit" "$((SECONDS - t0))" "$result" "$rc" "$*" >>"$STAGES"
  echo "== [$name] $result in $((SECONDS - t0)) s"
}
skip() {
  printf '%s\t0\t0\tskipped\t\t%s\n' "$1" "$2" >>"$STAGES"
  echo "== [$1] skipped: $2"
}
# wanted NAME: whether --only lists the stage (otherwise it is recorded as skipped).
wanted() {
  case ",$ONLY," in
    *",$1,"*) return 0 ;;
    *) skip "$1" "not in --only $ONLY"; return 1 ;;
  esac
}

junit="$WORK/gpu_tests.xml"
rm -f "$junit"
SLUG=$("$PY" -c 'import sys; sys.path.insert(0, "eval"); import torch; from common import gpu_slug
print(gpu_slug(torch.cuda.get_device_name(0)))')
CIFAR_JSON="eval/results/gpu_$SLUG.json"
IMAGENET_JSON="eval/results/imagenet_gpu_$SLUG.json"
SUMMARY_JSON="eval/results/gpu_check_$SLUG.json"
STARTED="$WORK/started"
touch "$STARTED"

if wanted setup; then
  stage setup "${SETUP_TIMEOUT:-30}" bash -c install_missing
fi
if [ -z "$PACK" ]; then
  skip pack "no --pack: data from ${SSL_SEC_DATA:-./data}"
elif wanted pack; then
  stage pack "${PACK_TIMEOUT:-15}" bash -c unpack_data
fi
if wanted tests; then
  stage tests "${TEST_TIMEOUT:-230}" "$PY" -m pytest tests -m gpu -ra -p no:cacheprovider \
    --junitxml="$junit"
fi
# The benchmarks run also when a test failed: their figures still say where things stand.
if wanted cifar; then
  stage cifar "${CIFAR_TIMEOUT:-60}" "$PY" eval/bench_gpu.py --epochs "$EPOCHS" \
    --lightly-steps 30 --lightly-trials 2 --tests-junit "$junit" --out "$CIFAR_JSON"
fi
if wanted folder; then
  stage folder "${FOLDER_TIMEOUT:-15}" "$PY" eval/bench_imagenet_gpu.py --build-only \
    --workdir "$WORK"
fi
IMAGENET_LIMIT=${IMAGENET_TIMEOUT:-120}
# The benchmark's own deadline ends its last measurement 10 s before the stage's timeout, so
# that it still writes the JSON of what it measured (it rewrites it after each measurement).
# (Without the folder stage it builds the folder itself, inside its own time.)
if wanted imagenet; then
  stage imagenet "$IMAGENET_LIMIT" "$PY" eval/bench_imagenet_gpu.py --workdir "$WORK" \
    --run-timeout 60 --deadline $((IMAGENET_LIMIT - 10)) --out "$IMAGENET_JSON"
fi

# Only what this run wrote (a stage killed before writing leaves the older file alone).
written=()
for json in "$CIFAR_JSON" "$IMAGENET_JSON"; do
  if [ "$json" -nt "$STARTED" ]; then
    written+=("$json")
  fi
done
echo "== gpu_check.sh: stages"
"$PY" eval/gpu_check_report.py --stages "$STAGES" --junit "$junit" --budget 480 \
  --results "${written[@]}" --out "$SUMMARY_JSON" || FAILED=$((FAILED + 1))
written+=("$SUMMARY_JSON")
if [ -n "$COPY_TO" ]; then
  mkdir -p "$COPY_TO"
  cp "${written[@]}" "$COPY_TO"/ 2>/dev/null || true
  # The benchmark's per-run logs say why a measurement failed; its checkpoints stay behind.
  tar -czf "$COPY_TO/gpu_check_logs.tar.gz" -C "$WORK" stages.tsv logs 2>/dev/null || true
fi
echo "== gpu_check.sh took $((SECONDS / 60)) min $((SECONDS % 60)) s; $FAILED stage(s) not passed"
[ "$FAILED" = 0 ]
