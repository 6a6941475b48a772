#!/usr/bin/env bash
# Shared by slurm/*.sh. Under sbatch: one task per GPU via `srun` (megatron_kimi reads rank/world/local
# rank from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR = first host of the node list, port
# from the job id). Without Slurm (plain `bash slurm/x.sh`): one node, `torchrun` with the local device
# count (GPUs, else NPROC or 1 CPU process on gloo).
set -euo pipefail

# sbatch runs a copy of the script from its spool dir: find the repo from the submit dir instead.
KIMI_ROOT="${KIMI_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$KIMI_ROOT"
if [ -z "${PY:-}" ]; then
  if [ -x "$KIMI_ROOT/.venv/bin/python" ]; then PY="$KIMI_ROOT/.venv/bin/python"; else PY=python3; fi
fi

# InfiniBand clusters: sane NCCL defaults, each overridable from the environment.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # TP/SP overlap ordering
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$( [ -n "${SLURM_CPUS_PER_TASK:-}" ] && echo "$SLURM_CPUS_PER_TASK" || echo 2 )}"

kimi_launch() {  # kimi_launch COMMAND CONFIG [key=value ...]
  local cmd="$1"; shift
  local config="${1:-}"
  if [ -z "$config" ] || [ ! -f "$config" ]; then
    echo "error: config file '${config}' not found (usage: $0 CONFIG.yaml [key=value ...])" >&2
    return 2
  fi
  if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1 && [ -z "${KIMI_LOCAL:-}" ]; then
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    srun --kill-on-bad-exit=1 ${KIMI_SRUN_ARGS:-} "$PY" -m megatron_kimi "$cmd" "$@"
  else
    local n="${NPROC:-}"
    if [ -z "$n" ]; then
      n=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
    fi
    if [ "$n" -gt 1 ]; then
      "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m megatron_kimi "$cmd" "$@"
    else
      "$PY" -m megatron_kimi "$cmd" "$@"
    fi
  fi
}
