#!/usr/bin/env bash
#SBATCH --job-name=kimi-rl-vllm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Kimi k1.5 RL with vLLM as the rollout engine (slurm/rl.sh with rollout.engine=vllm and the python of
# .venv-vllm, `make venv-vllm`; PY=... overrides it). `sbatch slurm/rl_vllm.sh CONFIG.yaml [key=value ...]`
# on a cluster; `bash slurm/rl_vllm.sh CONFIG` runs it locally; `bash slurm/rl_vllm.sh` with no arguments
# runs the embedded demo in its RoPE variant (vLLM serves HF Llama: rotary positions only): the SFT
# warm-up examples/demo/sft_warmup_rope.yaml, then examples/demo/rl_vllm.yaml (~7-8 minutes on 2 CPU cores).
set -euo pipefail
_KIMI_REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PY="${PY:-$_KIMI_REPO/.venv-vllm/bin/python}"
# vLLM's CPU build sizes its KV cache by this (GiB; unset, vLLM picks a size itself); the demo needs far less.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
source "$_KIMI_REPO/slurm/common.sh"

if { [ $# -gt 0 ] || [ "${DEMO_ENGINE:-vllm}" = vllm ]; } && ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "error: $PY cannot import vllm: build .venv-vllm with \`make venv-vllm\`, or set PY to a python that has it" >&2
  exit 2
fi

if [ $# -gt 0 ]; then
  config="$1"; shift
  kimi_launch rl "$config" rollout.engine=vllm "$@"   # a later rollout.engine=... still wins
  exit $?
fi

# The embedded demo, as in slurm/rl.sh: DEMO_SEED (default 0) is its only seed, passed unchanged as
# training.seed of both steps and rollout.seed of the RL step (read slurm/rl.sh for what derives from it).
# DEMO_ENGINE (default vllm) is the RL step's rollout.engine: `DEMO_ENGINE=builtin` runs the same demo
# with the built-in engine, for comparison (then any PY will do: it needs no vLLM).
DEMO_DIR="${DEMO_DIR:-runs/demo_vllm}"
DEMO_SEED="${DEMO_SEED:-0}"
DEMO_ENGINE="${DEMO_ENGINE:-vllm}"
kimi_launch sft examples/demo/sft_warmup_rope.yaml "run_dir=$DEMO_DIR/sft" checkpoint.resume=false \
  "training.seed=$DEMO_SEED"
kimi_launch rl examples/demo/rl_vllm.yaml "run_dir=$DEMO_DIR/rl" "checkpoint.load=$DEMO_DIR/sft/checkpoints" \
  checkpoint.resume=false "training.seed=$DEMO_SEED" "rollout.seed=$DEMO_SEED" "rollout.engine=$DEMO_ENGINE"
"$PY" - "$DEMO_DIR/rl/summary.json" "$DEMO_SEED" "$DEMO_ENGINE" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
b, a = s["before"], s["after"]
print(f"demo ({sys.argv[3]}): held-out accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, "
      f"mean response length {b['response_length']:.2f} -> {a['response_length']:.2f} (DEMO_SEED={sys.argv[2]})")
PYEOF
