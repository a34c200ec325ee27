#!/usr/bin/env bash
# Launch bt_fast pretraining: one process per GPU (or one on the CPU) via torchrun.
# Driven by `make pretrain`; every setting comes from the environment:
#   CONFIG DATA PIPELINE OUT NODES GPUS LOCAL_NODES PYTHON, and extra key=value arguments.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-configs/demo_cpu.yaml}
NODES=${NODES:-1}

args=(--config "$CONFIG")
[ -n "${DATA:-}" ] && args+=("data=$DATA")
[ -n "${PIPELINE:-}" ] && args+=("pipeline=$PIPELINE")
[ -n "${OUT:-}" ] && args+=("out_dir=$OUT")
args+=("$@")

if [ -z "${GPUS:-}" ]; then
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  [ "$GPUS" -ge 1 ] || GPUS=1   # CPU: one process
fi

if [ "$NODES" = 1 ] && [ "$GPUS" = 1 ]; then
  exec "$PYTHON" -m bt_fast.train "${args[@]}"
fi

if [ "$NODES" != 1 ]; then
  echo "error: NODES=$NODES: multi-node launch is not available yet; run with NODES=1" >&2
  exit 2
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" -m bt_fast.train "${args[@]}"
