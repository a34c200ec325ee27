#!/usr/bin/env bash
# Launch bt_fast pretraining: one process per GPU (or one on the CPU), through torchrun.
# Driven by `make pretrain`; every setting comes from the environment, plus extra key=value arguments:
#   CONFIG DATA PIPELINE OUT PYTHON
#   NODES         number of nodes (default 1)
#   GPUS          processes per node (default: the visible GPUs, 1 on a CPU-only machine)
#   MAX_RESTARTS  torchrun restarts of a failed worker group, each resuming from the checkpoint (default 3)
#   LOCAL_NODES=1 simulate NODES nodes on this machine, on the CPU (for testing)
#   MASTER_ADDR MASTER_PORT NODE_RANK   rendezvous for NODES>1 outside SLURM
# Under SLURM (SLURM_JOB_ID set) srun starts one torchrun on every node of the allocation.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
if [ -z "${CONFIG:-}" ]; then
  CONFIG=configs/demo_cpu.yaml
  # The demo recipe (ResNet-18, 48 px crops) is rarely what real data wants: say so, once.
  [ -n "${DATA:-}" ] && echo "note: DATA=$DATA without CONFIG=: training $CONFIG, the demo recipe (ResNet-18, 48 px crops); for the paper's, add CONFIG=configs/paper_rn50.yaml" >&2
fi
NODES=${NODES:-1}
LOCAL_NODES=${LOCAL_NODES:-0}
MAX_RESTARTS=${MAX_RESTARTS:-3}

die() { echo "error: $*" >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "NODES=$NODES must be a positive whole number"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS must be a whole number"
[[ $LOCAL_NODES =~ ^[01]$ ]] || die "LOCAL_NODES=$LOCAL_NODES must be 0 or 1 (1: simulate NODES nodes on this machine)"
[ -z "${GPUS:-}" ] || [[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "GPUS=$GPUS must be a positive whole number"
if [ -n "${MASTER_PORT:-}" ]; then
  [[ $MASTER_PORT =~ ^[0-9]+$ ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
    || die "MASTER_PORT=$MASTER_PORT must be a port number, 1..65535"
fi
# Where this host opens the rendezvous store (node 0, or the simulated nodes): torchrun would otherwise
# fail with a two-part traceback (EADDRINUSE).
check_port_free() {
  "$PYTHON" -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1])))' "$1" \
    2>/dev/null || die "MASTER_PORT=$1 is already in use on this host; choose another port"
}

for arg in "$@"; do
  [[ $arg == --config || $arg == --config=* ]] && die "give the config file as CONFIG=FILE (make pretrain CONFIG=...), not --config in the arguments"
done
args=(--config "$CONFIG")
[ -n "${DATA:-}" ] && args+=("data=$DATA")
[ -n "${PIPELINE:-}" ] && args+=("pipeline=$PIPELINE")
[ -n "${OUT:-}" ] && args+=("out_dir=$OUT")
# Simulated nodes would otherwise share the same GPUs (unless the arguments choose a device themselves).
[ "$LOCAL_NODES" = 1 ] && [[ " $* " != *" device="* ]] && args+=("device=cpu")
args+=("$@")
train=(-m bt_fast.train "${args[@]}")

# Several nodes outside SLURM without the rendezvous settings: print each node's command. GPUS only where it was
# given: a count of this machine's GPUs (1 on a CPU-only one) would be wrong on the others, which count their own.
if [ "$NODES" != 1 ] && [ -z "${SLURM_JOB_ID:-}" ] && [ "$LOCAL_NODES" != 1 ] \
    && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${MASTER_PORT:-}" ] || [ -z "${NODE_RANK:-}" ]; }; then
  settings=("NODES=$NODES")
  [ -z "${GPUS:-}" ] || settings+=("GPUS=$GPUS")
  settings+=("MAX_RESTARTS=$MAX_RESTARTS" "PYTHON=$PYTHON" "CONFIG=$CONFIG")
  for name in DATA PIPELINE OUT; do [ -n "${!name:-}" ] && settings+=("$name=${!name}"); done
  {
    echo "error: NODES=$NODES outside SLURM needs MASTER_ADDR (a host name or address of node 0 that the other" \
      "nodes reach), MASTER_PORT and NODE_RANK."
    echo "Run on each node (here with this host, $(hostname), as node 0), from this directory:"
    for ((node = 0; node < NODES; node++)); do
      printf '  node %d:' "$node"
      printf ' %q' "MASTER_ADDR=${MASTER_ADDR:-$(hostname)}" "MASTER_PORT=${MASTER_PORT:-29500}" "NODE_RANK=$node" \
        "${settings[@]}" bash run_pretrain.sh "$@"
      echo
    done
  } >&2
  exit 2
fi

if [ -z "${GPUS:-}" ]; then
  if [ "$LOCAL_NODES" = 1 ]; then
    GPUS=1
  else
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    [ "$GPUS" -ge 1 ] || GPUS=1   # CPU: one process
  fi
fi

# Simulated nodes share this machine's cores (tools.launch gives each of several ranks per node one
# OpenMP thread otherwise, as torchrun does).
if [ "$LOCAL_NODES" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / (NODES * GPUS) > 0 ? $(nproc) / (NODES * GPUS) : 1 ))}
fi

# tools.launch is torchrun that checks the config once before starting (so a config error is not
# retried MAX_RESTARTS times), sets torchrun's environment for restarts and checkpoints on a stop, and
# ends a signalled or failed run in one line. SIGUSR1 is SLURM's preemption / time-limit warning:
# torchrun must pass it on rather than die of it.
torchrun=("$PYTHON" -m tools.launch --nproc-per-node "$GPUS" --max-restarts "$MAX_RESTARTS"
          --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)

if [ -n "${SLURM_JOB_ID:-}" ] && [ "$LOCAL_NODES" != 1 ]; then
  nodes=${SLURM_NNODES:-1}
  if [ "$NODES" != 1 ] && [ "$NODES" != "$nodes" ]; then
    die "NODES=$NODES but SLURM job $SLURM_JOB_ID has $nodes nodes (SLURM_NNODES); allocate $NODES nodes or drop NODES"
  fi
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  [ "${#hosts[@]}" -ge 1 ] || die "scontrol show hostnames \"$SLURM_JOB_NODELIST\" gave no host; run inside the SLURM allocation"
  # Jobs that share a node must not share a port.
  port=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
  # The job's --ntasks-per-node would start several torchruns per node, and a one-task step would
  # get one CPU: ask for one task per node with all of the node's CPUs.
  exec srun --nodes "$nodes" --ntasks "$nodes" --ntasks-per-node 1 \
    ${SLURM_CPUS_ON_NODE:+--cpus-per-task "$SLURM_CPUS_ON_NODE"} --kill-on-bad-exit=1 \
    "${torchrun[@]}" --nnodes "$nodes" --rdzv-backend c10d --rdzv-endpoint "${hosts[0]}:$port" \
    --rdzv-id "$SLURM_JOB_ID" "${train[@]}"
fi

if [ "$LOCAL_NODES" = 1 ]; then
  [ -z "${MASTER_PORT:-}" ] || check_port_free "$MASTER_PORT"
  # Once here, not once per simulated node: every node's launcher would print the same error line.
  "${torchrun[@]}" --nnodes "$NODES" "${train[@]}" --check || exit $?
  port=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  # Each node's torchrun gets a session of its own, so that a Ctrl-C reaches it once, from the trap
  # below, as on a real node. A second signal would cut torchrun's graceful stop short: it then
  # sends its workers SIGTERM on top of the SIGINT.
  pids=()
  for ((node = 0; node < NODES; node++)); do
    setsid "${torchrun[@]}" --nnodes "$NODES" --rdzv-backend c10d --rdzv-endpoint "127.0.0.1:$port" \
      --rdzv-id "local-$port" --rdzv-conf "is_host=$([ "$node" = 0 ] && echo true || echo false)" \
      --local-addr 127.0.0.1 "${train[@]}" &
    pids+=("$!")
  done
  stopping=
  stop_all() { stopping=1; kill -"$1" "${pids[@]}" 2>/dev/null || true; }
  for sig in TERM INT HUP USR1 QUIT; do trap "stop_all $sig" "$sig"; done
  # A node that fails for good would leave the others waiting in the rendezvous: stop them all.
  # This waits for every node, so nothing prints after the command has returned.
  status=0
  running=("${pids[@]}")
  while [ "${#running[@]}" -gt 0 ]; do
    still=()
    for pid in "${running[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
      rc=0; wait "$pid" || rc=$?
      if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
        status=$rc
        [ -n "$stopping" ] || stop_all TERM
      fi
    done
    running=("${still[@]}")
    if [ "${#running[@]}" -gt 0 ]; then sleep 1 || true; fi  # a Ctrl-C also ends the sleep
  done
  exit "$status"
fi

if [ "$NODES" != 1 ]; then  # MASTER_ADDR, MASTER_PORT and NODE_RANK are set (see above)
  [[ $NODE_RANK =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NODES" ] || die "NODE_RANK=$NODE_RANK must be 0..$((NODES - 1))"
  # A host name that does not resolve would be retried for minutes, then end in a traceback.
  "$PYTHON" -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$MASTER_ADDR" 2>/dev/null \
    || die "MASTER_ADDR=$MASTER_ADDR does not resolve on this host; give the host name or address of node 0"
  [ "$NODE_RANK" != 0 ] || check_port_free "$MASTER_PORT"
  # Node 0 hosts the rendezvous store; saying so beats guessing from host names.
  exec "${torchrun[@]}" --nnodes "$NODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "bt_fast-$MASTER_PORT" --rdzv-conf "is_host=$([ "$NODE_RANK" = 0 ] && echo true || echo false)" \
    "${train[@]}"
fi

if [ "$GPUS" = 1 ]; then
  exec "$PYTHON" -m bt_fast.train "${args[@]}"
fi
exec "${torchrun[@]}" --standalone "${train[@]}"
