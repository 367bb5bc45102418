#!/usr/bin/env bash
# Download the wheels a GPU machine without a package registry needs for scripts/gpu_check.sh.
# GPU images usually have torch and torchvision (and numpy, pyyaml, tqdm, tensorboard, pytest,
# scikit-learn) but not kornia, lightly or faiss: this fetches those and their own needs.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_wheels.sh DIR [--python-version 3.12] [--faiss faiss-cpu]

Writes to DIR the wheels of kornia, lightly, faiss and their dependencies that GPU images lack,
for CPython VERSION on x86-64 Linux (manylinux), wherever this runs (it needs a registry).
Then copy DIR to the GPU machine and run:  bash scripts/gpu_check.sh --wheels DIR

options:
  --python-version V  the GPU machine's Python (python3 --version there; default 3.12)
  --faiss SPEC        faiss-cpu==1.15.1 (default; the CPU index, also used with CUDA tensors)
                      or e.g. faiss-gpu-cu12 (a GPU index; needs the CUDA 12 runtime
                      libraries beside it, about 0.5 GB more)
EOF
}

DIR=""
PYV=3.12
FAISS=faiss-cpu==1.15.1
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=${2:?--python-version needs a version}; shift 2 ;;
    --faiss) FAISS=${2:?--faiss needs a package}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_wheels.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
if [ -z "$DIR" ]; then
  usage >&2
  exit 2
fi
mkdir -p "$DIR"

# Versions the test suite runs with. hydra-core/omegaconf/antlr4 are lightly's needs;
# kornia-rs is kornia's. --no-deps: torch and torchvision must stay the machine's own.
BINARY=("kornia==0.9.0" "kornia-rs==0.2.0" "lightly==1.6.0" "hydra-core==1.3.8"
        "omegaconf==2.3.1" "safetensors==0.8.0" "$FAISS")
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PYV" "${PLATFORMS[@]}" -d "$DIR" "${BINARY[@]}"
# antlr4's runtime 4.9.3 (what omegaconf 2.3 pins) is published as source only: build the
# pure-Python wheel here.
python3 -m pip wheel --quiet --no-deps -w "$DIR" "antlr4-python3-runtime==4.9.3"
echo "wheels in $DIR:"
ls -1 "$DIR"
du -sh "$DIR"
