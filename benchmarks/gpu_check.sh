#!/usr/bin/env bash
# One GPU check: flash-attn tests, a bf16 ZeRO-3 step of the base preset at batch 64 (samples/s, MFU against
# the measured bf16 matmul peak, peak memory) and the flash-attn / sdpa / eager speed ratio, as one JSON on stdout.
#   bash benchmarks/gpu_check.sh [--dry-run]     (--dry-run: on CPU, tiny shapes, fp32; what the tests run)
# Stops after 8 minutes (GPU_CHECK_TIMEOUT seconds) with exit status 124.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$ROOT"
exec timeout "${GPU_CHECK_TIMEOUT:-480}" env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m benchmarks.gpu_check "$@"
