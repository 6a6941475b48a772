#!/usr/bin/env bash
#SBATCH --job-name=kimi-rl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Kimi k1.5 RL. `sbatch slurm/rl.sh CONFIG.yaml [key=value ...]` on a cluster; `bash slurm/rl.sh CONFIG`
# runs it locally; `bash slurm/rl.sh` with no arguments runs the embedded demo (SFT warm-up on
# synthetic arithmetic, then mirror-descent RL; ~5 minutes on 2 CPU cores).
set -euo pipefail
source "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm/common.sh"

if [ $# -gt 0 ]; then
  kimi_launch rl "$@"
  exit $?
fi

# The embedded demo. DEMO_SEED (default 0) is its only seed, passed unchanged as
#   training.seed of both steps: SFT model init, the generated SFT data and its pack order; RL's
#     training prompts, held-out set, per-iteration prompt picks and mini-batch order;
#   rollout.seed of the RL step: every sampled token (each request's seed is a hash of rollout.seed,
#     the iteration and the prompt/sample index, megatron_kimi/rl/generation.py).
# tools/bench_demo.py runs it over seeds x OMP_NUM_THREADS x devices.
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_SEED="${DEMO_SEED:-0}"
kimi_launch sft examples/demo/sft_warmup.yaml "run_dir=$DEMO_DIR/sft" checkpoint.resume=false \
  "training.seed=$DEMO_SEED"
kimi_launch rl examples/demo/rl.yaml "run_dir=$DEMO_DIR/rl" "checkpoint.load=$DEMO_DIR/sft/checkpoints" \
  checkpoint.resume=false "training.seed=$DEMO_SEED" "rollout.seed=$DEMO_SEED"
"$PY" - "$DEMO_DIR/rl/summary.json" "$DEMO_SEED" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))
b, a = s["before"], s["after"]
print(f"demo: held-out accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}, "
      f"mean response length {b['response_length']:.2f} -> {a['response_length']:.2f} (DEMO_SEED={sys.argv[2]})")
PYEOF
