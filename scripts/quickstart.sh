#!/usr/bin/env bash
# Install ssl_sec into ./.venv, pretrain SimCLR on real CIFAR-10 (CPU-sized, about 5 min on two
# cores), then score the backbone with a weighted kNN over the full test set.
source "$(dirname "$0")/setup_env.sh"
NAME=${NAME:-quickstart-$(date +%Y%m%d-%H%M%S)}
SECONDS=0
.venv/bin/ssl-sec pretrain recipes/quickstart.yaml name="$NAME" "$@"
.venv/bin/ssl-sec knn --checkpoint "runs/$NAME/last.pt"
echo "pretraining + kNN evaluation took $((SECONDS / 60)) min $((SECONDS % 60)) s"
echo "logs: runs/$NAME (tensorboard --logdir runs/$NAME/tb), metrics: runs/$NAME/metrics.jsonl, checkpoint: runs/$NAME/last.pt"
