#!/usr/bin/env bash
# vlpretrain cluster entry. This file is both a bash script and a Python program:
#   deepspeed [launcher flags] launch/pretrain.sh [training flags]   (the launcher runs it with python -u per rank)
#   bash launch/pretrain.sh [training flags]                          (starts the DeepSpeed launcher itself)
# Environment for the bash form (all optional):
#   GPUS_PER_NODE  ranks per node (default: the hostfile's slots, else visible CUDA GPUs, else 2 CPU ranks)
#   HOSTFILE       DeepSpeed hostfile for multi-node runs (see launch/hostfile.example)
#   NUM_NODES      use the first N hosts of the hostfile
#   MASTER_ADDR    rendezvous address (default 127.0.0.1 on one node)
#   MASTER_PORT    rendezvous port (default: a free port on one node, as torchrun --standalone; 29500 with a HOSTFILE)
#   LAUNCHER       multi-node backend: pdsh (default), openmpi, mpich, impi, slurm, mvapich
#   NODE_RANK      with NO_SSH=1: start only this node's ranks (one launcher per node, e.g. under SLURM)
#   PYTHON         interpreter (default: the repo's .venv if present, else python3)
#   ENTRY          the app every rank runs: train (pretraining, default), finetune (python -m pretrain.finetune)
#                  instruct (python -m pretrain.instruct) or caption_lm (python -m pretrain.caption_lm)
""":"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export ENTRY="${ENTRY:-train}"
[[ "$ENTRY" == train || "$ENTRY" == finetune || "$ENTRY" == instruct || "$ENTRY" == caption_lm ]] ||
  { echo "error: ENTRY=$ENTRY is not an app: use train, finetune, instruct or caption_lm" >&2; exit 2; }

port_is_free() {  # as torch's store binds it (all addresses, SO_REUSEADDR)
  "$PYTHON" -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("", int(sys.argv[1])))' "$1" 2>/dev/null
}
if [[ -z "${MASTER_PORT:-}" && -z "${HOSTFILE:-}" ]]; then  # one node: nobody else needs to know the port
  MASTER_PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')"
fi
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${HOSTFILE:-}" || "${NO_SSH:-0}" == 1 && "${NODE_RANK:-}" == 0 ]] && ! port_is_free "$MASTER_PORT"; then
  echo "error: MASTER_PORT=$MASTER_PORT is taken on this machine (another job?): unset MASTER_PORT on one node to pick a free port, or set a free one" >&2
  exit 2
fi
launcher=(--master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "error: HOSTFILE=$HOSTFILE does not exist: point it at a DeepSpeed hostfile" >&2; exit 2; }
  hosts="$(grep -E '^[^#[:space:]]' "$HOSTFILE" | head -n "${NUM_NODES:-1000000}")"
  nodes="$(wc -l <<< "$hosts")"
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    launcher+=(--num_gpus "$GPUS_PER_NODE"); world=$((nodes * GPUS_PER_NODE))
  else  # the hostfile's slots say how many ranks each node runs
    world="$(awk -F'slots=' '{ranks += $2} END {print ranks}' <<< "$hosts")"
  fi
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$nodes" --launcher "${LAUNCHER:-pdsh}")
  [[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
  if [[ "${NO_SSH:-0}" == 1 ]]; then
    launcher+=(--no_ssh --node_rank "${NODE_RANK:?NO_SSH=1 needs NODE_RANK}")
  else
    # Remote ranks start over ssh with a bare environment; DeepSpeed forwards what .deepspeed_env lists.
    # (the runner reads it from the directory it starts in, and runs remote ranks in that directory)
    env | grep -E '^(NCCL_|FI_|UCX_|CUDA_DEVICE_MAX_CONNECTIONS=|HF_|TOKENIZERS_PARALLELISM=|ENTRY=)' > .deepspeed_env || true
    echo "PYTHONPATH=$PYTHONPATH" >> .deepspeed_env
  fi
else
  GPUS_PER_NODE="${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
  launcher+=(--num_gpus "$GPUS_PER_NODE"); world="$GPUS_PER_NODE"
fi

# Fail fast, once, on a bad recipe, missing data or a wrong DeepSpeed config, before any rank starts.
# Ranks run in this directory too, so relative paths mean the same to the check and to them.
WORLD_SIZE="$world" "$PYTHON" -m "pretrain.$ENTRY" --validate-only "$@"
# SIGUSR1 (SLURM's warning before the time limit) is for the ranks: they finish the step, checkpoint and
# exit 0. Its default action would kill DeepSpeed's launcher processes first, so they ignore it (inherited).
trap '' USR1
exec "$PYTHON" -m deepspeed.launcher.runner "${launcher[@]}" "$ROOT/launch/pretrain.sh" "$@"
":"""
# Python part: what every rank runs (the DeepSpeed launcher appends --local_rank=N).
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.exit(importlib.import_module(f"pretrain.{os.environ.get('ENTRY', 'train')}.cli").main())
