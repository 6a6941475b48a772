#!/usr/bin/env bash
#SBATCH --job-name=kimi-recipe
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=2:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# The whole Kimi k1.5 recipe as a demo (`make demo-recipe`; ~9 minutes on 2 CPU cores), on the RL demo's
# model and task with verbose answers (examples/recipe/*.yaml):
#   1. long-CoT warm-up: SFT on "a+b=S" + 0..2 redundant "check: b+a=S" lines + "answer: S", written by the
#      RL demo's carry-slipping teacher;
#   2. mirror-descent RL (no length penalty): held-out accuracy rises, the answers stay long;
#   3. long2short, each from the RL checkpoint (Kimi k1.5 §2.4):
#      a. shortest rejection sampling: `sample` (8 per prompt, 800 training prompts, keep the shortest
#         correct) then SFT on what it kept;
#      b. DPO on pairs from the same samples (shortest correct vs wrong ones and correct ones > 1.5x longer);
#      c. model merging: the weights of the RL (long) and 3a (short) models averaged, 0.5 / 0.5;
#      d. long2short RL: the length penalty from iteration 0 and a 40-token budget;
#   4. `eval` of every checkpoint on the 300 held-out prompts (greedy): a table (also eval.csv / eval.json)
#      and a PNG of accuracy vs mean response tokens under $DEMO_DIR/eval.
# DEMO_SEED (default 0) is passed as training.seed (and rollout.seed) of every step, as in slurm/rl.sh.
set -euo pipefail
_KIMI_REPO="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "$_KIMI_REPO/slurm/common.sh"
cd "$_KIMI_REPO"

D="${DEMO_DIR:-runs/recipe}"
S="${DEMO_SEED:-0}"
E=examples/recipe
step() { echo "[recipe] $(date -Is) $*" >&2; }

step "1/4 long-CoT warm-up"
kimi_launch sft $E/sft_warmup.yaml "run_dir=$D/sft" checkpoint.resume=false "training.seed=$S"
step "2/4 RL"
kimi_launch rl $E/rl.yaml "run_dir=$D/rl" "checkpoint.load=$D/sft/checkpoints" checkpoint.resume=false \
  "training.seed=$S" "rollout.seed=$S"

step "3a/4 shortest rejection sampling"
# The first 800 of the RL run's training prompts (the same builtin:arithmetic draw for this seed).
"$PY" - "$S" "$D/sample_prompts.jsonl" <<'PYEOF'
import json, sys
from megatron_kimi.rl.data import arithmetic_prompts
with open(sys.argv[2], "w") as f:
    for p in arithmetic_prompts(4000, int(sys.argv[1]), heldout=False)[:800]:
        f.write(json.dumps({"prompt": p.prompt, "answer": p.answer, "kind": p.kind}) + "\n")
PYEOF
kimi_launch sample $E/rl.yaml "run_dir=$D/sample" "checkpoint.load=$D/rl/checkpoints" \
  "data.prompts=$D/sample_prompts.jsonl" sample.n=8 "training.seed=$S" "rollout.seed=$S"
"$PY" - $E/shortest_sft.yaml "$D/sample/shortest.jsonl" "$D/shortest_sft.yaml" <<'PYEOF'
import sys, yaml  # the example config with the stage's data = what `sample` kept
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["stages"][0]["data"] = sys.argv[2]
yaml.safe_dump(cfg, open(sys.argv[3], "w"), sort_keys=False)
PYEOF
kimi_launch sft "$D/shortest_sft.yaml" "run_dir=$D/shortest_sft" "checkpoint.load=$D/rl/checkpoints" \
  checkpoint.resume=false "training.seed=$S"

step "3b/4 DPO"
kimi_launch dpo $E/dpo.yaml "run_dir=$D/dpo" "checkpoint.load=$D/rl/checkpoints" \
  "data.pairs=$D/sample/samples.jsonl" checkpoint.resume=false "training.seed=$S"

step "3c/4 merging"
rm -rf "$D/merged"
"$PY" tools/merge_checkpoints.py "$D/rl/checkpoints" "$D/shortest_sft/checkpoints" --weights 0.5 0.5 --out "$D/merged"

step "3d/4 long2short RL"
kimi_launch rl $E/long2short_rl.yaml "run_dir=$D/long2short_rl" "checkpoint.load=$D/rl/checkpoints" \
  checkpoint.resume=false "training.seed=$S" "rollout.seed=$S"

step "4/4 eval"
kimi_launch eval $E/rl.yaml "run_dir=$D/eval" "training.seed=$S" "checkpoint.load=$D/sft/checkpoints" \
  "$D/rl/checkpoints" "$D/shortest_sft/checkpoints" "$D/dpo/checkpoints" "$D/merged" \
  "$D/long2short_rl/checkpoints"
"$PY" - "$D/eval/eval.json" "$S" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))

names = ["warm-up (SFT)", "long-CoT RL", "shortest rejection SFT", "DPO", "merge 0.5/0.5", "long2short RL"]
long = rows[1]
print(f"\nrecipe (DEMO_SEED={sys.argv[2]}): held-out accuracy and mean response tokens (greedy, 300 prompts)")
print(f"{'model':<24}{'accuracy':>9}{'tokens':>8}{'vs long: length':>17}{'accuracy':>10}  goal (>=30% shorter, accuracy within 0.02)")
for name, r in zip(names, rows):
    cut = 1 - r["mean_tokens"] / long["mean_tokens"]
    dacc = r["accuracy"] - long["accuracy"]
    goal = "" if r is long or name.startswith("warm") else ("met" if cut >= 0.30 and dacc >= -0.02 else "not met")
    print(f"{name:<24}{r['accuracy']:>9.3f}{r['mean_tokens']:>8.2f}{-cut:>+17.1%}{dacc:>+10.3f}  {goal}")
PYEOF
