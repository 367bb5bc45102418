#!/usr/bin/env bash
# Install ssl_sec with its test extras into ./.venv and run the whole test suite.
# shellcheck source=scripts/setup_env.sh
EXTRAS="[dev]" source "$(dirname "$0")/setup_env.sh"
.venv/bin/python -m pytest tests -ra "$@"
