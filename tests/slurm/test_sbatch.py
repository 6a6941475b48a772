"""``sbatch slurm/*.sh`` on a real two-node Slurm (tests/slurm/cluster.sh): runs, logs, preemption.

Every job runs the tiny CPU configs on 2 nodes x 1 task (gloo); the #SBATCH GPU defaults of the
scripts are overridden on the sbatch line, as a user would on a CPU partition.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CPU_JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
SFT_ARGS = ["examples/tiny/sft.yaml", "training.max_steps=24", "checkpoint.save_interval=10", "logging.tensorboard=true"]


def sbatch(env, out: Path, script: str, *args: str, wait: bool = True, timeout: int = 600):
    cmd = ["sbatch", "--parsable", *CPU_JOB, f"--output={out}", *(["--wait"] if wait else []), script, *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    job = res.stdout.strip().splitlines()[0].split(";")[0] if res.stdout.strip() else None
    return job, res


def job_info(env, job: str) -> dict:
    res = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metrics(run: Path) -> list:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_run(slurm_cluster, tmp_path_factory):
    """One uninterrupted 2-node SFT job (also the reference for the preemption test)."""
    base = tmp_path_factory.mktemp("slurm-sft")
    run, out = base / "run", base / "job.out"
    job, res = sbatch(slurm_cluster, out, "slurm/sft.sh", *SFT_ARGS, f"run_dir={run}")
    return job, res, run, out


def test_sft_job_on_two_nodes_writes_checkpoints_and_logs(sft_run):
    job, res, run, out = sft_run
    text = out.read_text()
    assert res.returncode == 0, text[-4000:] + res.stderr
    assert f"mode srun, world 2, job {job}" in text
    assert [r["step"] for r in metrics(run)] == list(range(1, 25))
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000024"
    assert (run / "checkpoints" / "iter_0000020").is_dir()
    log = (run / "logs" / f"sft-{job}.log").read_text()  # the per-job log under the run dir
    assert "sft: loss" in log and "step 24/24" in log
    assert list((run / "tensorboard").iterdir())


def _preempt_requeue_resume(env, ref_run: Path, run: Path, out: Path, args, ready, what: str) -> str:
    """Submit, SIGUSR1 the batch shell once ``ready(run)``, release the requeued job; check that the
    resumed job finishes with the uninterrupted job's exact curve. Returns the job's output."""
    job, res = sbatch(env, out, "slurm/sft.sh", *args, f"run_dir={run}", wait=False)
    assert res.returncode == 0 and job, res.stderr
    wait_for(lambda: ready(run), 300, what)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)
    # The job saves, exits 75, requeues itself (Restarts=1) and waits for its BeginTime (~120 s): release it.
    wait_for(lambda: (job_info(env, job).get("Restarts") == "1" and job_info(env, job).get("JobState") == "PENDING")
             or job_info(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "the requeue")
    assert job_info(env, job).get("Restarts") == "1", out.read_text()[-4000:]
    # slurmd revokes the old run's credential at requeue time with 1 s resolution: a restart within the
    # same second is killed ("Job credential revoked"), so let a couple of seconds pass first.
    time.sleep(2.5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True, timeout=30)
    final = wait_for(lambda: job_info(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                     and job_info(env, job), 400, "the requeued job to finish")
    text = out.read_text()  # --open-mode=append: both runs of the job in one file
    assert final["JobState"] == "COMPLETED", text[-4000:]
    assert "stop checkpoint confirmed by every rank and complete" in text, text[-4000:]
    assert "preempted: checkpoint saved; requeueing" in text and "restart 1" in text
    stopped = [line for line in text.splitlines() if line.startswith("stopping at step")]
    assert len(stopped) == 1, text[-3000:]
    stop_step = int(stopped[0].split()[3])
    assert 1 <= stop_step < 24
    assert f"resumed from {run}/checkpoints/iter_{stop_step:07d} at step {stop_step}" in text
    got, ref = metrics(run), metrics(ref_run)
    assert [r["step"] for r in got] == list(range(1, 25))  # nothing lost, nothing repeated
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # same curve as the uninterrupted job
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    return text


def _after_steps(n: int):
    return lambda run: len(metrics(run)) >= n


def _after_first_save(run: Path) -> bool:
    return (run / "checkpoints" / "latest").is_file()


def _during_a_save(run: Path) -> bool:
    return any((run / "checkpoints").glob("*.tmp")) if (run / "checkpoints").is_dir() else False


def test_preempted_job_requeues_and_resumes_without_loss_or_repeats(slurm_cluster, sft_run, tmp_path):
    _, ref_res, ref_run, _ = sft_run
    assert ref_res.returncode == 0
    text = _preempt_requeue_resume(slurm_cluster, ref_run, tmp_path / "run", tmp_path / "job.out", SFT_ARGS,
                                   _after_steps(6), "6 steps of the first run")
    assert "(step " in text


def test_preemption_after_a_periodic_save_keeps_every_step(slurm_cluster, sft_run, tmp_path):
    """The checkpoint writer's Manager process exists from the first save on; srun's forwarded SIGUSR1
    reaches it too. It used to die of it, so the preemption save failed and the job restarted from the
    older checkpoint while the script reported "checkpoint saved" (deterministic, not a race)."""
    _, ref_res, ref_run, _ = sft_run
    assert ref_res.returncode == 0
    args = [*SFT_ARGS[:2], "checkpoint.save_interval=4", *SFT_ARGS[3:]]
    _preempt_requeue_resume(slurm_cluster, ref_run, tmp_path / "run", tmp_path / "job.out", args,
                            _after_first_save, "the first periodic checkpoint")


@pytest.mark.skipif(not os.environ.get("KIMI_STRESS"), reason="stress loop: set KIMI_STRESS=N (rounds)")
@pytest.mark.timeout(600 + 400 * int(os.environ.get("KIMI_STRESS") or 1))
def test_preemption_stress(slurm_cluster, sft_run, tmp_path):
    """KIMI_STRESS=N rounds, cycling the signal's moment: early, right after a periodic save (the
    writer's Manager alive), in the middle of a save."""
    _, ref_res, ref_run, _ = sft_run
    assert ref_res.returncode == 0
    args = [*SFT_ARGS[:2], "checkpoint.save_interval=3", *SFT_ARGS[3:]]
    moments = [(_after_steps(2), "2 steps"), (_after_first_save, "a periodic save"), (_during_a_save, "a save")]
    rounds = int(os.environ["KIMI_STRESS"])
    for i in range(rounds):
        ready, what = moments[i % len(moments)]
        d = tmp_path / f"round{i}"
        d.mkdir()
        _preempt_requeue_resume(slurm_cluster, ref_run, d / "run", d / "job.out", args, ready, what)
        print(f"preemption stress: round {i + 1}/{rounds} ({what}) passed", flush=True)


def test_rl_job_on_two_nodes(slurm_cluster, tmp_path):
    run, out = tmp_path / "run", tmp_path / "job.out"
    job, res = sbatch(slurm_cluster, out, "slurm/rl.sh", "examples/demo/rl.yaml", f"run_dir={run}",
                      "data.reward=tests.rl.plugin_rewards:starts_with_digit", "rl.iterations=3", "rl.eval_interval=0",
                      "data.eval_size=16", "rl.prompts_per_iteration=8", "rl.k=4", "rollout.max_new_tokens=3",
                      "checkpoint.save_interval=2")
    text = out.read_text()
    assert res.returncode == 0, text[-4000:] + res.stderr
    assert f"mode srun, world 2, job {job}" in text and "rl: held-out accuracy" in text
    assert [r["iteration"] for r in metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000006"  # 3 iterations x 2 updates
    assert json.loads((run / "summary.json").read_text())["after"]
    assert (run / "logs" / f"rl-{job}.log").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["examples/tiny/missing.yaml"], "config file 'examples/tiny/missing.yaml' not found"),
        (["examples/tiny/sft.yaml", "parallel.tensor=3"], "not divisible by parallel.tensor=3"),
        (["examples/tiny/sft.yaml", "optimizer.lrr=1"], "optimizer.lrr"),
    ],
)
def test_bad_launches_fail_fast_with_a_clear_message(slurm_cluster, tmp_path, args, message):
    out = tmp_path / "job.out"
    t0 = time.monotonic()
    _, res = sbatch(slurm_cluster, out, "slurm/sft.sh", *args, f"run_dir={tmp_path / 'run'}")
    assert res.returncode != 0
    assert message in out.read_text()
    assert "mode srun" not in out.read_text()  # no rank was started
    assert time.monotonic() - t0 < 60
