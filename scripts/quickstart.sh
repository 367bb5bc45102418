#!/usr/bin/env bash
# Install ssl_sec into ./.venv, pretrain SimCLR on real CIFAR-10, then score the backbone with a
# weighted kNN over the full test set. The recipe fits the machine: recipes/quickstart.yaml on
# a CPU (about 5 min on two cores), recipes/quickstart_gpu.yaml when a CUDA GPU is visible.
# RECIPE=... picks another; extra arguments are overrides (e.g. optim.epochs=30).
# shellcheck source=scripts/setup_env.sh
source "$(dirname "$0")/setup_env.sh"
if [ -z "${RECIPE:-}" ]; then
  if .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    RECIPE=recipes/quickstart_gpu.yaml
  else
    RECIPE=recipes/quickstart.yaml
  fi
fi
NAME=${NAME:-quickstart-$(date +%Y%m%d-%H%M%S)}
echo "quick start: $RECIPE -> runs/$NAME"
SECONDS=0
.venv/bin/ssl-sec pretrain "$RECIPE" name="$NAME" "$@"
.venv/bin/ssl-sec knn --checkpoint "runs/$NAME/last.pt"
echo "pretraining + kNN evaluation took $((SECONDS / 60)) min $((SECONDS % 60)) s"
echo "logs: runs/$NAME (tensorboard --logdir runs/$NAME/tb), metrics: runs/$NAME/metrics.jsonl, checkpoint: runs/$NAME/last.pt"
