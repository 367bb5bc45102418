# shellcheck shell=bash
# Sourced by the other scripts: make ./.venv with ssl_sec installed (editable) and
# point SSL_SEC_DATA at ../shared/data when it exists and nothing else was chosen.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip resolves torch and torchvision together (PyPI's torchvision wheels need PyPI's torch).
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS}"
if [ -z "${SSL_SEC_DATA:-}" ] && [ -d ../shared/data/cifar-10-batches-py ]; then
  SSL_SEC_DATA="$(cd ../shared/data && pwd)"
  export SSL_SEC_DATA
fi
