#!/usr/bin/env bash
# Install ssl_sec with its test extras into ./.venv and run the whole test suite.
#
#   bash scripts/test.sh [pytest args]
#
# The tests run in pytest-xdist workers, one per core up to 4 (each worker holds its own
# torch, data and models: about 2 GiB); TEST_WORKERS=N chooses, TEST_WORKERS=1 runs them all
# in one process. Much of the suite's time is new processes starting (a fault test starts,
# kills and resumes real runs), which a second core overlaps.
# shellcheck source=scripts/setup_env.sh
EXTRAS="[dev]" source "$(dirname "$0")/setup_env.sh"
cores=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$((cores < 4 ? cores : 4))}
if [ "$workers" -le 1 ]; then
  .venv/bin/python -m pytest tests -ra "$@"
else
  .venv/bin/python -m pytest tests -ra -n "$workers" --dist worksteal "$@"
fi
