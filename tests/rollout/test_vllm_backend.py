"""vLLM rollout backend (``rollout.engine: vllm``) against the trainer's forward. The ``vllm`` tests
need ``vllm`` (``make venv-vllm``, then ``make test-vllm``) and skip elsewhere (tests/conftest.py);
the first few (bucketed export, the missing-vllm error) run everywhere.

One spawned job per model (module fixture, :func:`tests.rollout.vllm_bodies.vllm_job`): a Llama (GQA,
untied) and a Qwen2 (q/k/v biases, tied); the tests compare its results. fp32 throughout: vLLM's
log-probs equal the trainer's to 1e-4. (The demo's shape goes through vLLM in the real-server test of
test_server_backend.py, and in `make demo-vllm`.)
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist import run_distributed

pytestmark = pytest.mark.timeout(900)
vllm = pytest.mark.vllm

TOL = 1e-4
MODELS = ("llama", "qwen2")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_safetensors_buckets(tmp_path):
    from safetensors.torch import load_file

    from megatron_kimi.rollout.vllm_backend import write_safetensors_buckets

    tensors = [(f"t{i}", torch.full((n,), float(i))) for i, n in enumerate([100, 100, 300, 50, 50, 50])]
    (tmp_path / "bucket-00009.safetensors").write_bytes(b"stale")  # an earlier sync's file: removed
    total = write_safetensors_buckets(iter(tensors), tmp_path, bucket_bytes=800)  # 200 fp32 values
    files = sorted(tmp_path.glob("*.safetensors"))
    assert total == 650 * 4
    assert [sorted(load_file(str(f))) for f in files] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert torch.equal(load_file(str(files[1]))["t2"], torch.full((300,), 2.0))  # too big: a file of its own


def test_needs_vllm_names_make_target(monkeypatch):
    from megatron_kimi.rollout import vllm_backend

    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match="make venv-vllm"):
        vllm_backend.VllmBackend(None, None, max_seq_len=8)


@pytest.fixture(scope="module", params=MODELS)
def job(request):
    from tests.rollout import vllm_bodies

    res = run_distributed(vllm_bodies.vllm_job, 1, request.param, timeout=600, env=ENV)[0]
    print(f"\n[{request.param}] engine start {res['start_s']:.1f}s, sync {res['sync_s'] * 1e3:.1f} ms "
          f"({res['sync_bytes'] / 1e6:.2f} MB, {res['sync_gbps']:.3f} GB/s), "
          f"greedy lp diff {res['greedy_lp_diff']:.2e}, after sync {res['after_sync_diff']:.2e}, "
          f"stale prefix {res['stale_diff']:.2e} -> {res['fresh_diff']:.2e}")
    return res


@vllm
def test_backend_protocol_and_bucketed_export(job):
    assert job["is_backend"]
    assert len(job["files"]) > 1  # sync_bucket_mb=0.05: several files
    assert job["dir_removed"]


@vllm
def test_greedy_matches_trainer(job):
    assert job["greedy"] == job["ref_greedy"]
    assert job["greedy_lp_diff"] <= TOL
    assert all(f == "length" for f in job["greedy_finish"])
    assert all(s == [0.0] * 10 for s in job["greedy_slp"])  # greedy: sampling log-prob 0, as built-in


@vllm
def test_sampled_logprobs_are_the_raw_policy(job):
    assert job["raw_lp_diff"] <= TOL
    assert all(s is None for s in job["raw_slp"])  # raw policy: sampling log-probs = log-probs
    assert job["trunc_lp_diff"] <= TOL  # truncated sampling: raw log-probs by a teacher-forced pass
    assert job["topk_slp_diff"] <= TOL  # processed log-probs: the distribution sampled from
    assert job["topk_lp_diff"] <= TOL
    assert job["trunc_same_again"] and job["trunc_reversed"]  # per-request seeds
    assert job["seeds"] == [100 + i for i in range(len(job["seeds"]))]


@vllm
def test_finish_reasons_as_builtin(job):
    assert job["finish"] == job["finish_builtin"]
    assert [f for _, f in job["finish"]] == ["stop", "length", "repeat", "length", "length"]
    assert "stop_strings" in job["stop_strings_error"]


@vllm
def test_weight_sync(job):
    assert job["before_sync_diff"] > 1e-2  # the perturbed trainer differs from the engine ...
    assert job["after_sync_diff"] <= TOL  # ... until the sync
    assert job["version_step"] == 1
    assert job["after_sync_greedy"] == job["after_sync_ref_greedy"]
    assert job["after_sync_greedy_diff"] <= TOL
    assert job["sync_s"] > 0 and job["sync_gbps"] > 0


@vllm
def test_prefix_cache_reset_after_sync(job):
    assert job["stale_diff"] > 1e-3  # reloaded weights, old prefix cache: stale KV
    assert job["fresh_diff"] <= TOL  # update_weights resets it


@vllm
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_trainer_at_tp2(name):
    # Llama untied (GQA), Qwen2 tied with q/k/v biases: the engine starts from the export of the two
    # ranks' shards, so a dropped or misplaced shard mismatches at once; then a perturbed sync.
    from tests.rollout import vllm_bodies

    outs = run_distributed(vllm_bodies.vllm_tp_job, 2, name, timeout=600, env=ENV)
    assert [o["leader"] for o in outs] == [True, False]
    a, b = outs
    for key in ("greedy", "sampled", "after_greedy", "version", "sync_bytes"):
        assert a[key] == b[key]  # every rank of the TP group gets the leader's results
    assert a["greedy"] == a["ref_greedy"] and a["lp_diff"] <= TOL
    assert a["sampled_lp_diff"] <= TOL
    assert a["before_sync_diff"] > 1e-2
    assert a["after_greedy"] == a["after_ref_greedy"] and a["after_lp_diff"] <= TOL
    assert a["version"] == 1


@vllm
def test_compiled_engine_follows_weight_syncs():
    # rollout.enforce_eager=false (vLLM's inductor path on CPU, ~30 s more start-up): the compiled graph
    # reads the reloaded weights -- a mismatch before the sync, the trainer's tokens and log-probs after.
    from tests.rollout import vllm_bodies

    res = run_distributed(vllm_bodies.vllm_compiled_job, 1, "llama", timeout=600, env=ENV)[0]
    print(f"\n[compiled] engine start {res['start_s']:.1f}s")
    assert res["eager"] is False
    for tag in ("before", "after"):
        assert res[f"{tag}_greedy"] == res[f"{tag}_ref_greedy"]
        assert res[f"{tag}_lp_diff"] <= TOL
    assert res["stale_diff"] > 1e-2
    assert res["after_greedy"] != res["before_greedy"]


def test_split_cores():
    from megatron_kimi.rollout.vllm_backend import split_cores

    assert split_cores([3, 1, 2, 0], 1, 0) == [0, 1, 2, 3]
    assert [split_cores(range(5), 2, i) for i in range(2)] == [[0, 1, 2], [3, 4]]
    assert [split_cores(range(7), 3, i) for i in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [split_cores([4, 5], 3, i) for i in range(3)] == [[4], [5], [4]]  # more engines than cores: shared


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to pin ranks to")
@pytest.mark.parametrize("tp, affinity, expected", [
    (1, [{0, 1}, {0, 1}], [[0], [1]]),  # two engines on the same cores: half each
    (2, [{0, 1}, {0, 1}], [[0, 1], None]),  # one engine (TP leader): all of them; rank 1 has none
    (1, [{0}, {1}], [[0], [1]]),  # ranks pinned by the launcher: each engine keeps its rank's cores
])
def test_engines_split_the_hosts_cores(tp, affinity, expected):
    # vLLM's own CPU default binds every engine on a host to the same cores, minus one for its scheduler.
    from tests.rollout import vllm_bodies

    cores = sorted(os.sched_getaffinity(0))[:2]
    pin = [{cores[c] for c in a} for a in affinity]
    got = run_distributed(vllm_bodies.engine_cores_job, 2, tp, pin, timeout=120)
    assert got == [None if e is None else [cores[c] for c in e] for e in expected]
