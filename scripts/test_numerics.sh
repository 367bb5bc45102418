#!/usr/bin/env bash
# The numerics-sensitive test modules again, under CPU kernels other than this machine's
# defaults: a tolerance that only holds for one CPU's rounding fails here, not on a user's CPU.
#
#   bash scripts/test_numerics.sh [pytest args]
#
# Two runs on the same machine:
#   1. oneDNN (convolutions, bf16 matmuls) capped one ISA level below the host's: AVX2 on an
#      AVX-512 or AMX host, SSE4.1 on an AVX2 host (where a cap at AVX2 would change nothing);
#   2. ATen's scalar kernels instead of its vectorised ones (ATEN_CPU_CAPABILITY=default).
# Left out, to keep both runs under 4 minutes on 2 cores: whole training runs and CLI error
# paths, whose checks are bit-exact on the same machine, structural, or about exit codes
# (bash scripts/test.sh runs them). Among them the bf16 runs of tests/test_precision.py
# (minutes each without native bf16); their bf16-vs-fp32 cosine was measured under both
# settings.
set -euo pipefail
# shellcheck source=scripts/setup_env.sh
EXTRAS="[dev]" source "$(dirname "$0")/setup_env.sh"

modules=(
  tests/test_losses.py tests/test_circle.py tests/test_moco.py tests/test_knn.py
  tests/test_augment.py tests/test_optim.py tests/test_precision.py tests/test_norms.py
  tests/test_linear.py tests/test_kshot.py tests/test_distributed.py
  tests/test_feature_cache.py tests/test_pretrained.py tests/test_data.py
  tests/test_mocov3.py tests/test_uniformity.py
)
skip="not bf16_training and not cli_ and not short_real and not resume and not torchrun"
skip+=" and not fp16_run and not progress_lines and not architectures_by_name"
skip+=" and not knn_cli_no_cache"

if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  onednn=AVX2
else
  onednn=SSE41
fi
# Workers as scripts/test.sh: one per core, up to 4 (the variables reach every worker).
cores=$(nproc 2>/dev/null || echo 1)
workers=${TEST_WORKERS:-$((cores < 4 ? cores : 4))}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist worksteal)
for setting in "ONEDNN_MAX_CPU_ISA=$onednn" "ATEN_CPU_CAPABILITY=default"; do
  echo "== numerics-sensitive tests under $setting"
  env "$setting" .venv/bin/python -m pytest "${modules[@]}" -k "$skip" -q -p no:cacheprovider \
    "${parallel[@]}" "$@"
done
