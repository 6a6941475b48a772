#!/usr/bin/env bash
#SBATCH --job-name=kimi-dpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# long2short DPO. `sbatch slurm/dpo.sh CONFIG.yaml [key=value ...]`; `bash slurm/dpo.sh CONFIG` runs locally.
set -euo pipefail
source "${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/slurm/common.sh"
kimi_launch dpo "$@"
