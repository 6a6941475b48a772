#!/usr/bin/env bash
# Shared by slurm/*.sh: `source` it, then `kimi_launch COMMAND CONFIG.yaml [key=value ...]`.
#
# Under sbatch: ONE TASK PER GPU, started by `srun` alone (no torchrun): every rank reads its rank,
#   world size and local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (megatron_kimi/platform/
#   launch.py); MASTER_ADDR is the first host of SLURM_JOB_NODELIST, MASTER_PORT 20000 + job id % 20000.
#   Why srun alone: Slurm then owns every rank (signals, `--kill-on-bad-exit`, per-task accounting and
#   GPU binding), and there is no second agent whose restarts would fight Slurm's requeue.
# Without Slurm (plain `bash slurm/x.sh ...`): one node, `torchrun --standalone` with the local GPU count
#   (else NPROC, default 1, CPU processes on gloo). KIMI_LOCAL=1 forces this inside an allocation too.
#
# Before any rank starts, `megatron-kimi preflight` checks the config, the layout against the world size
# and (GPU jobs) tasks-per-node == GPUs-per-node == visible GPUs, and prints the run dir. Logs go to
# RUN_DIR/logs/<command>-<job id>.log (appended across requeues), besides Slurm's own --output file.
#
# Preemption: Slurm sends SIGUSR1 to this batch shell (`#SBATCH --signal=B:USR1@300`, or
#   `scancel --signal=USR1 --batch JOB`); the trap below forwards it to the ranks, which save a
#   checkpoint at the next step boundary, confirm it (every rank got through the save and it passes
#   inspect_checkpoint's completeness check: RUN_DIR/checkpoints/preempted.json) and exit with code 75.
#   Only if this script then finds that confirmation, for the checkpoint `latest` names, does it run
#   `scontrol requeue $SLURM_JOB_ID` (the job needs --requeue); the requeued job resumes from it.
#   Without it the script says so and exits non-zero: a requeue would silently redo the lost steps.
#   KIMI_MAX_REQUEUES (default 50) bounds the loop.
#
# Environment knobs (all optional):
#   PY                    python to use (default: .venv/bin/python of the repo, else python3)
#   NPROC                 local ranks without Slurm (default: GPU count, else 1)
#   KIMI_SRUN_ARGS        extra srun flags, e.g. "--cpu-bind=none --mpi=pmix"
#   KIMI_CONTAINER_IMAGE  pyxis/enroot image: adds --container-image, --container-mounts=$KIMI_MOUNTS
#                         (default: the repo dir) and --container-workdir=<repo> to srun
#   NCCL_* / CUDA_DEVICE_MAX_CONNECTIONS  InfiniBand defaults below; export your own to override
set -euo pipefail

# sbatch runs a copy of the script from its spool dir: find the repo from the submit dir instead.
KIMI_ROOT="${KIMI_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
cd "$KIMI_ROOT"
if [ -z "${PY:-}" ]; then
  if [ -x "$KIMI_ROOT/.venv/bin/python" ]; then PY="$KIMI_ROOT/.venv/bin/python"; else PY=python3; fi
fi

# InfiniBand clusters (H100 + NDR/HDR): each value is only a default.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"               # use the IB HCAs for inter-node traffic
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"  # bootstrap interface: anything but lo/docker
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"             # NVLink SHARP off unless the fabric has it
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"              # tolerate congested fabrics
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # fail, don't hang
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # TP/SP comm-compute overlap order
# (set NCCL_IB_HCA=mlx5 or NCCL_DEBUG=INFO per cluster as needed)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-2}}"

KIMI_EXIT_PREEMPTED=75

_kimi_in_slurm() { [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1 && [ -z "${KIMI_LOCAL:-}" ]; }

_kimi_on_usr1() {
  KIMI_GOT_USR1=1
  echo "[kimi] SIGUSR1: asking the ranks to checkpoint at the next step and stop" >&2
  [ -n "${KIMI_CHILD:-}" ] || return 0
  case "$KIMI_MODE" in
    srun) kill -USR1 "$KIMI_CHILD" 2>/dev/null || true ;;        # srun forwards it to every task
    torchrun) pkill -USR1 -P "$KIMI_CHILD" 2>/dev/null || true ;; # the workers, not the agent
    *) kill -USR1 "$KIMI_CHILD" 2>/dev/null || true ;;
  esac
}

# Prints "PATH (step N, W ranks)" when RUN_DIR/checkpoints/preempted.json (written by the ranks after
# the stop checkpoint) names a checkpoint that is complete and is the one a resumed run starts from;
# else prints why not and fails.
_kimi_confirmed_checkpoint() {
  local confirm="$1/checkpoints/preempted.json"
  if [ ! -f "$confirm" ]; then
    echo "no $confirm: not every rank finished the checkpoint save"
    return 1
  fi
  "$PY" - "$1" "$confirm" <<'PYEOF'
import json, sys
from pathlib import Path
from megatron_kimi.ckpt_tools.inspect import inspect_checkpoint
from megatron_kimi.training.ckpt_paths import CheckpointError
run_dir, confirm = sys.argv[1], sys.argv[2]
try:
    c = json.load(open(confirm))
    info = inspect_checkpoint(run_dir)  # the checkpoint `latest` names, with the completeness check
except (CheckpointError, ValueError, OSError) as e:
    sys.exit(print(f"{e}") or 1)
if Path(info.path).resolve() != Path(c["checkpoint"]).resolve() or info.step != c["step"]:
    sys.exit(print(f"{confirm} names {c['checkpoint']} (step {c['step']}) but the resume point is "
                   f"{info.path} (step {info.step})") or 1)
print(f"{info.path} (step {info.step}, {c['ranks']} ranks)")
PYEOF
}

kimi_launch() {  # kimi_launch COMMAND CONFIG [key=value ...]
  local cmd="$1"; shift
  local config="${1:-}"
  if [ -z "$config" ] || [ ! -f "$config" ]; then
    echo "error: config file '${config}' not found (usage: $0 CONFIG.yaml [key=value ...])" >&2
    return 2
  fi
  local world tpn gpn="" n
  if _kimi_in_slurm; then
    KIMI_MODE=srun
    world="${SLURM_NTASKS:?SLURM_NTASKS is not set: submit with --ntasks-per-node}"
    tpn="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}"
    gpn="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  else
    n="${NPROC:-}"
    if [ -z "$n" ]; then
      n=$("$PY" -c "import torch; print(torch.cuda.device_count() or 1)" 2>/dev/null || echo 1)
    fi
    world="$n"; tpn="$n"
    if [ "$n" -gt 1 ]; then KIMI_MODE=torchrun; else KIMI_MODE=single; fi
  fi
  local run_dir
  run_dir=$("$PY" -m megatron_kimi preflight "$cmd" "$@" --world "$world" --tasks-per-node "$tpn" \
            ${gpn:+--gpus-per-node "$gpn"}) || return 2
  mkdir -p "$run_dir/logs"
  local log="$run_dir/logs/${cmd}-${SLURM_JOB_ID:-local}.log"
  echo "[kimi] $(date -Is) $cmd $* | mode $KIMI_MODE, world $world, job ${SLURM_JOB_ID:-none}," \
       "restart ${SLURM_RESTART_COUNT:-0}, log $log" | tee -a "$log" >&2

  local -a launcher
  case "$KIMI_MODE" in
    srun)
      export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
      launcher=(srun --kill-on-bad-exit=1 --ntasks="$world" ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"})
      if [ -n "${KIMI_CONTAINER_IMAGE:-}" ]; then
        launcher+=(--container-image="$KIMI_CONTAINER_IMAGE" --container-mounts="${KIMI_MOUNTS:-$KIMI_ROOT:$KIMI_ROOT}"
                   --container-workdir="$KIMI_ROOT")
      fi
      # shellcheck disable=SC2206
      launcher+=(${KIMI_SRUN_ARGS:-} "$PY" -m megatron_kimi "$cmd" "$@") ;;
    torchrun) launcher=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$world" -m megatron_kimi "$cmd" "$@") ;;
    single) launcher=("$PY" -m megatron_kimi "$cmd" "$@") ;;
  esac

  rm -f "$run_dir/checkpoints/preempted.json" 2>/dev/null || true  # only this launch's ranks may confirm a preemption save
  KIMI_GOT_USR1=0
  trap _kimi_on_usr1 USR1
  # tee ignores USR1 (it would die of it: under torchrun it is a sibling of the workers we signal)
  "${launcher[@]}" > >(trap '' USR1; exec tee -a "$log") 2>&1 &
  KIMI_CHILD=$!
  local rc
  while :; do  # `wait` returns early (rc > 128) whenever the trap runs; wait again until the child is done
    set +e; wait "$KIMI_CHILD"; rc=$?; set -e
    kill -0 "$KIMI_CHILD" 2>/dev/null || break
  done
  trap - USR1
  KIMI_CHILD=""

  if [ "$rc" = "$KIMI_EXIT_PREEMPTED" ] || { [ "$KIMI_GOT_USR1" = 1 ] && [ "$rc" != 0 ]; }; then
    local saved
    if ! saved=$(_kimi_confirmed_checkpoint "$run_dir" 2>&1); then
      {
        echo "[kimi] error: preempted (ranks exited with $rc) but the stop checkpoint was NOT confirmed: $saved"
        echo "[kimi] not requeueing: the work since the newest complete checkpoint is lost, and a rerun resumes" \
             "from that checkpoint (or from scratch if there is none); see the rank errors above"
      } | tee -a "$log" >&2
      [ "$rc" = "$KIMI_EXIT_PREEMPTED" ] && return 1
      return "$rc"
    fi
    echo "[kimi] stop checkpoint confirmed by every rank and complete: $saved" | tee -a "$log" >&2
    if [ "$KIMI_MODE" = srun ]; then
      local restarts="${SLURM_RESTART_COUNT:-0}"
      if [ "$restarts" -lt "${KIMI_MAX_REQUEUES:-50}" ]; then
        echo "[kimi] preempted: checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))" | tee -a "$log" >&2
        # Slurm ends this batch script during the requeue; the sleep keeps it from racing ahead
        if scontrol requeue "$SLURM_JOB_ID"; then sleep 60; fi
        echo "[kimi] scontrol requeue failed (was the job submitted with --requeue?)" | tee -a "$log" >&2
      else
        echo "[kimi] preempted, but not requeued: $restarts restarts >= KIMI_MAX_REQUEUES" | tee -a "$log" >&2
      fi
    else
      echo "[kimi] stopped on SIGUSR1 after saving a checkpoint; run the same command again to resume" | tee -a "$log" >&2
    fi
    return "$KIMI_EXIT_PREEMPTED"
  fi
  return "$rc"
}
