"""The vLLM server rollout backend (``rollout.engine: vllm_server``, rollout/server_backend.py).

Most tests run against :class:`tests.rollout.fake_vllm_server.FakeVllmServer` (vLLM 0.32's JSON shapes, fault
injection; no vLLM needed): the request/result mapping, retries, drops within a bounded time, the
development-endpoint and start checks, the weight sync (a spawned TP=2 job on a tiny Megatron model), and
the RL generator's handling of dropped samples. The ``vllm`` test starts a real server (``make test-vllm``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_kimi.rollout.backend import DROPPED
from megatron_kimi.rollout.engine import GenerationRequest, GenerationResult
from megatron_kimi.rollout.sampling import SamplingParams
from megatron_kimi.rollout.server_backend import ServerClient, ServerRollout, connect, launch_server
from megatron_kimi.rollout.server_process import free_port, server_argv
from tests.dist import run_distributed
from tests.rollout import bodies
from tests.rollout.fake_vllm_server import VOCAB, FakeVllmServer, expected, processed_logprob, raw_logprob

pytestmark = pytest.mark.timeout(120)

EOS = 127
P0, P1, P2, P3 = [3, 5, 7], [11, 2, 9, 4], [1, 1, 2], [40, 41]


@pytest.fixture
def fake():
    with FakeVllmServer() as f:
        yield f


def rollout_on(fake, *, timeout_s=5.0, retries=2, backoff_s=0.01, **kw):
    client = ServerClient(fake.url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s)
    return ServerRollout(client, model_name=fake.model, max_seq_len=64, vocab_size=VOCAB, eos_token_id=EOS,
                         max_workers=4, **kw)


def raw(prompt, ids):
    return [raw_logprob(len(prompt) + j, t) for j, t in enumerate(ids)]


def bodies_for(fake, prompt, scoring=False):
    return [b for b in fake.completions if b["prompt"][:len(prompt)] == prompt
            and (b.get("prompt_logprobs") is not None) == scoring]


# ---------------------------------------------------------------------------------- (a) the mapping

def test_generate_maps_the_servers_tokens_and_logprobs(fake):
    ro = rollout_on(fake)
    stop_tok = expected(P0, 6, None, {EOS})[0][2]
    reqs = [
        GenerationRequest("greedy", P0, SamplingParams(temperature=0.0, max_new_tokens=6)),
        GenerationRequest("raw", P1, SamplingParams(max_new_tokens=5, seed=11)),
        GenerationRequest("trunc", P2, SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=5, seed=12)),
        GenerationRequest("stop", P0, SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=[stop_tok])),
        GenerationRequest("repeat", P3, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                       repeat_detector_factory=lambda: bodies.StopAfter(2))),
        GenerationRequest("zero", P3, SamplingParams(max_new_tokens=0)),
        GenerationRequest("drawn", P3, SamplingParams(max_new_tokens=3)),  # no seed: one is drawn
    ]
    seen = []
    res = {r.request_id: r for r in ro.generate(reqs, on_result=seen.append)}
    assert sorted(r.request_id for r in seen) == sorted(res) and ro.last_dropped == 0

    ids, fin = expected(P0, 6, None, {EOS})
    g = res["greedy"]
    assert (g.output_ids, g.finish_reason) == (ids, fin)
    assert g.logprobs == pytest.approx(raw(P0, ids)) and g.sampling_logprobs == [0.0] * len(ids)

    ids, fin = expected(P1, 5, 11, {EOS})
    r = res["raw"]
    assert (r.output_ids, r.finish_reason, r.seed) == (ids, fin, 11)
    assert r.logprobs == pytest.approx(raw(P1, ids)) and r.sampling_logprobs is None

    ids, fin = expected(P2, 5, 12, {EOS})
    t = res["trunc"]
    assert (t.output_ids, t.finish_reason) == (ids, fin)
    assert t.sampling_logprobs == pytest.approx([processed_logprob(len(P2) + j, x) for j, x in enumerate(ids)])
    assert t.logprobs == pytest.approx(raw(P2, ids))  # the raw policy, from the rescoring request
    (score_body,) = bodies_for(fake, P2, scoring=True)
    assert score_body["prompt"] == P2 + ids and score_body["prompt_logprobs"] == 0
    assert score_body["max_tokens"] == 1 and score_body["temperature"] == 0.0

    s = res["stop"]
    assert s.finish_reason == "stop" and s.output_ids == expected(P0, 6, None, {EOS, stop_tok})[0]
    assert s.output_ids[-1] == stop_tok
    rep = res["repeat"]
    assert rep.finish_reason == "repeat" and rep.output_ids == expected(P3, 6, None, {EOS})[0][:2]
    assert len(rep.logprobs) == 2
    z = res["zero"]
    assert (z.output_ids, z.finish_reason) == ([], "length")
    assert res["drawn"].seed is not None

    # the request bodies: token ids, per-request seeds (none for greedy), stop ids = eos + the request's
    (body,) = bodies_for(fake, P1)
    assert body["seed"] == 11 and body["logprobs"] == 0 and body["ignore_eos"] is True
    assert body["return_token_ids"] is True and body["stop_token_ids"] == [EOS] and body["model"] == fake.model
    assert all(b["seed"] is None for b in bodies_for(fake, P0))
    assert sorted(b["stop_token_ids"] for b in bodies_for(fake, P0)) == sorted([[EOS], sorted({EOS, stop_tok})])
    assert [b["seed"] for b in fake.completions if b["prompt"] == P3 and b["max_tokens"] == 3] == [res["drawn"].seed]
    assert len(fake.completions) == 7  # 6 generating (not "zero") + 1 rescoring
    ro.close()


def test_refused_requests(fake):
    ro = rollout_on(fake)
    with pytest.raises(ValueError, match="stop_strings"):
        ro.generate([GenerationRequest("s", P0, SamplingParams(stop_strings=["x"]))])
    with pytest.raises(ValueError, match="token ids"):
        ro.generate([GenerationRequest("v", [VOCAB], SamplingParams())])
    assert fake.completions == []
    ro.close()


# ------------------------------------------------------------------------ (b), (c): retries and drops

def test_failed_twice_then_answered_is_retried_and_counted_a_success(fake):
    fake.fault = lambda body, n: 500 if body["prompt"] == P1 and n < 2 else None
    ro = rollout_on(fake, retries=2)
    res = ro.generate([GenerationRequest("a", P0, SamplingParams(temperature=0.0, max_new_tokens=3)),
                       GenerationRequest("b", P1, SamplingParams(max_new_tokens=4, seed=3))])
    assert [r.finish_reason for r in res] == ["length", expected(P1, 4, 3, {EOS})[1]]
    assert res[1].output_ids == expected(P1, 4, 3, {EOS})[0]
    assert (ro.last_dropped, ro.last_retried, ro.last_failed_attempts, ro.dropped) == (0, 1, 2, 0)
    assert len(bodies_for(fake, P1)) == 3
    ro.close()


def test_failing_and_hanging_requests_are_dropped_within_a_bound(fake):
    timeout, retries, backoff = 0.5, 1, 0.05

    def fault(body, n):
        p = body["prompt"]
        if p == P0:
            return 500  # always
        if p == P1:
            return "hang"  # never answers (within the timeout)
        if p == P2:
            return 400  # refused: not retried
        if body.get("prompt_logprobs") is not None:
            return 503  # the rescoring of the truncated sample fails: dropped too
        return None

    fake.fault = fault
    ro = rollout_on(fake, timeout_s=timeout, retries=retries, backoff_s=backoff)
    reqs = [GenerationRequest("fail", P0, SamplingParams(max_new_tokens=3, seed=1)),
            GenerationRequest("hang", P1, SamplingParams(max_new_tokens=3, seed=1)),
            GenerationRequest("refused", P2, SamplingParams(temperature=0.5, max_new_tokens=3, seed=1)),
            GenerationRequest("rescore", P3, SamplingParams(temperature=0.5, max_new_tokens=3, seed=1)),
            GenerationRequest("ok", P3, SamplingParams(temperature=0.0, max_new_tokens=3))]
    t0 = time.monotonic()
    res = ro.generate(reqs)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout * (retries + 1) * 2 + backoff + 5.0, elapsed  # never a hang
    assert [r.finish_reason for r in res][:4] == [DROPPED] * 4 and res[4].finish_reason == "length"
    for r in res[:4]:
        assert r.output_ids == [] and r.logprobs == [] and r.request_id in ("fail", "hang", "refused", "rescore")
    assert res[0].sampling_logprobs is None and res[2].sampling_logprobs == []  # as for any raw / truncated result
    assert (ro.last_dropped, ro.dropped) == (4, 4)
    assert len(bodies_for(fake, P0)) == retries + 1 and len(bodies_for(fake, P1)) == retries + 1
    assert len(bodies_for(fake, P2)) == 1  # HTTP 400: no retry
    assert len([b for b in fake.completions if b.get("prompt_logprobs") is not None]) == retries + 1
    ro.generate(reqs[:1])
    assert (ro.last_dropped, ro.dropped) == (1, 5)  # per call and in total
    ro.close()


def test_the_calls_deadline_drops_what_is_still_unanswered(fake):
    fake.fault = lambda body, n: "hang" if body["prompt"] == P1 else None
    ro = rollout_on(fake, timeout_s=3.0, retries=0, slack_s=-5.5)  # deadline: 2 x 3 s - 5.5 s = 0.5 s
    assert ro.deadline_s(2) == pytest.approx(0.5)
    t0 = time.monotonic()
    res = ro.generate([GenerationRequest("ok", P0, SamplingParams(temperature=0.0, max_new_tokens=2)),
                       GenerationRequest("hang", P1, SamplingParams(temperature=0.0, max_new_tokens=2))])
    assert time.monotonic() - t0 < 2.5
    assert [r.finish_reason for r in res] == ["length", DROPPED] and ro.last_dropped == 1
    ro.close()


# ------------------------------------------------------------------- (e), (f): checks at the start

def test_server_without_dev_endpoints_is_refused_naming_the_url():
    with FakeVllmServer(dev_mode=False) as f:
        client = ServerClient(f.url, timeout_s=5, retries=0)
        with pytest.raises(ValueError, match=f"{f.url}.*VLLM_SERVER_DEV_MODE=1"):
            connect(client, start_timeout_s=5, max_seq_len=64)
    with FakeVllmServer(max_model_len=64) as f:  # one position short for the rescoring request
        with pytest.raises(ValueError, match=f"{f.url}.*--max-model-len 65"):
            connect(ServerClient(f.url, timeout_s=5), start_timeout_s=5, max_seq_len=64)
        assert connect(ServerClient(f.url, timeout_s=5), start_timeout_s=5, max_seq_len=63) == f.model


def test_dead_or_unhealthy_server_fails_clearly_within_the_start_timeout():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"vLLM server at {url} did not answer GET /health within 1.5s"):
        connect(ServerClient(url, timeout_s=1), start_timeout_s=1.5, max_seq_len=8)
    assert time.monotonic() - t0 < 1.5 + 3
    with FakeVllmServer() as f:
        f.healthy = False
        with pytest.raises(RuntimeError, match="503"):
            ServerClient(f.url, timeout_s=1).wait_healthy(0.5)
        f.healthy = True
        ServerClient(f.url, timeout_s=1).wait_healthy(0.5)


def test_started_server_that_exits_or_never_answers_is_stopped_and_reported(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "server.log"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"exited with code 3 \\(its log: {log}\\)(.|\n)*boom"):
        launch_server([sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"], url, log,
                      start_timeout_s=60, timeout_s=1)
    assert time.monotonic() - t0 < 30  # at once, not after the start timeout

    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{url} \\(its log: .*\\) did not start \\(answer GET /health\\) within 3s"):
        launch_server([sys.executable, "-c", sleeper], url, tmp_path / "sleeper.log", start_timeout_s=3, timeout_s=1)
    assert time.monotonic() - t0 < 3 + 15
    assert not Path(f"/proc/{pid_file.read_text()}").exists()  # stopped (and reaped)


def test_started_server_is_used_then_stopped_by_close(tmp_path):
    port = free_port()
    process, client = launch_server([sys.executable, "-m", "tests.rollout.fake_vllm_server", "--port", str(port)],
                                    f"http://127.0.0.1:{port}", tmp_path / "fake.log", start_timeout_s=60, timeout_s=5)
    try:
        assert process.returncode() is None
        assert connect(client, start_timeout_s=5, max_seq_len=64, process=process)
        assert "fake vLLM server" in (tmp_path / "fake.log").read_text()
    finally:
        proc = process.proc
        t0 = time.monotonic()
        process.close()
    assert time.monotonic() - t0 < 10 and proc.returncode == -15 and process.proc is None  # SIGTERM
    with pytest.raises(RuntimeError):
        client.wait_healthy(0.5)


def test_server_argv_has_the_engine_settings(tmp_path):
    argv = server_argv(tmp_path, 8000, max_model_len=65, max_batch_size=8, seed=3, extra=["--no-enforce-eager"])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    s = " ".join(argv)
    for flag in ("--max-model-len 65", "--max-num-seqs 8", "--seed 3", "--skip-tokenizer-init",
                 "--logprobs-mode processed_logprobs", "--no-enable-chunked-prefill", "--enable-prefix-caching",
                 "--generation-config vllm", "--port 8000"):
        assert flag in s
    assert argv[-1] == "--no-enforce-eager" and "--enable-sleep-mode" not in argv
    assert "--enforce-eager" in argv  # the default (CPU)
    graphs = server_argv(tmp_path, 8000, max_model_len=65, max_batch_size=8, cuda=True, enforce_eager=False)
    assert "--enforce-eager" not in graphs and "--enable-sleep-mode" in graphs


def test_enforce_eager_auto_follows_cuda(monkeypatch):
    from megatron_kimi.rollout.vllm_backend import eager_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eager_mode(None) is True and eager_mode(False) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eager_mode(None) is False and eager_mode(True) is True


def test_config_checks():
    from megatron_kimi.config import RLConfig, load_config

    base = ["rollout.engine=vllm_server"]
    ro = load_config(None, base + ["rollout.server_url=http://h:8000", "rollout.server_weights_dir=/w",
                                   "rollout.request_timeout_s=5"], RLConfig).rollout
    assert (ro.server_url, ro.server_weights_dir, ro.request_timeout_s, ro.request_retries) == (
        "http://h:8000", "/w", 5.0, 2)
    for bad, msg in ((["rollout.server_url=http://h:8000"], "server_weights_dir"),
                     (["rollout.server_url=h:8000", "rollout.server_weights_dir=/w"], "http://host:port"),
                     (["rollout.request_retries=-1"], "request_retries"),
                     (["rollout.request_timeout_s=0"], "request_timeout_s"),
                     (["rollout.server_start_timeout_s=0"], "server_start_timeout_s")):
        with pytest.raises(ValueError, match=msg):
            load_config(None, base + bad, RLConfig)


def test_needs_vllm_only_to_start_a_server(monkeypatch):
    from megatron_kimi.rollout import server_backend

    monkeypatch.setattr(server_backend, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match="make venv-vllm"):
        server_backend.VllmServerBackend(None, None, max_seq_len=8)
    with pytest.raises(ValueError, match="server_weights_dir"):
        server_backend.VllmServerBackend(None, None, max_seq_len=8, url="http://127.0.0.1:1")


# ------------------------------------------------------------------------- (d): the backend, TP = 2

@pytest.mark.timeout(400)
def test_backend_weight_sync_and_tp_leader_only(tmp_path):
    from tests.rollout import server_bodies

    with FakeVllmServer() as ok, FakeVllmServer(reset_ok=False) as no_reset, FakeVllmServer(dev_mode=False) as no_dev:
        urls = {"ok": ok.url, "no_reset": no_reset.url, "no_dev": no_dev.url}
        dirs = {k: str(tmp_path / k) for k in urls}
        t0 = time.monotonic()
        out = run_distributed(server_bodies.fake_server_job, 2, 2, urls, dirs, timeout=360)
        print(f"\nTP=2 job {time.monotonic() - t0:.1f}s; sync {out[0]['sync'][0] * 1e3:.1f} ms, "
              f"{out[0]['sync'][1] / 1e6:.2f} MB")
        ok_paths, reset_paths = ok.paths(), no_reset.paths()
        completions, reload_files = ok.completions, ok.reload_files
        rpc = [b for m, p, b in ok.calls if p == "/collective_rpc"]
    a, b = out
    P = bodies.prompts()
    # generation: only the TP leader asks the server; both ranks get the results (and on_result calls)
    assert len(completions) == len(P)
    want = [expected(p, 4, None, ()) for p in P]
    for o in (a, b):
        assert o["is_backend"] and o["dropped"] == 0
        assert [(ids, fin) for ids, _, fin in o["greedy"]] == want
        assert [x for _, lp, _ in o["greedy"] for x in lp] == pytest.approx(
            [x for p, (ids, _) in zip(P, want) for x in raw(p, ids)])
        assert o["on_result"] == list(range(len(P)))
    # the weight sync: files first, then reload_weights with the directory, then reset_prefix_cache
    sync_calls = [p for p in ok_paths if p in ("/collective_rpc", "/reset_prefix_cache")]
    assert sync_calls == ["/collective_rpc", "/reset_prefix_cache"] * 2
    assert rpc == [{"method": "reload_weights", "kwargs": {"weights_path": dirs["ok"]}}] * 2
    assert all(any(f.endswith(".safetensors") for f in files) for files in reload_files)
    assert a["config_json"] and a["file_shapes"] == a["hf_shapes"]  # every tensor, whole (not a TP shard)
    for o in (a, b):
        assert (o["version"], o["version2"]) == (1, 2)
        assert o["sync"][1] == a["sync"][1] > 0 and o["sync"][0] > 0 and o["sync"][2] > 0
    # a reset that answers success=false is an error (after its retries), on every rank; no new version
    assert reset_paths.count("/reset_prefix_cache") == 2  # KW: request_retries=1
    for o in (a, b):
        assert "reset_prefix_cache" in o["reset_error"] and "success=false" in o["reset_error"]
        assert o["reset_version"] == 0
        assert urls["no_dev"] in o["dev_error"] and "VLLM_SERVER_DEV_MODE=1" in o["dev_error"]


# ------------------------------------------------------------------------ (g): the RL generator

class DroppingBackend:
    """Answers [1, 2] (finish "stop") except for the request ids in ``drop``: those come back dropped."""

    weight_version = 0

    def __init__(self, drop=()):
        self.drop = set(drop)
        self.requests = []

    def generate(self, requests, on_result=None):
        out = []
        for r in requests:
            self.requests.append(r.request_id)
            if r.request_id in self.drop:
                res = GenerationResult(r.request_id, list(r.prompt_ids), [], [], DROPPED)
            else:
                res = GenerationResult(r.request_id, list(r.prompt_ids), [1, 2], [-0.5, -0.25], "stop")
            out.append(res)
            if on_result is not None:
                on_result(res)
        return out


@pytest.fixture
def generator(monkeypatch, tmp_path):
    """A SampleGenerator on one rank: the DP helpers and the all-gather of a single-rank group."""
    from megatron_kimi.config import RolloutConfig
    from megatron_kimi.data.tokenizer import load_tokenizer
    from megatron_kimi.rl import generation

    ps = generation.parallel_state
    for name, value in (("get_data_parallel_rank", 0), ("get_data_parallel_world_size", 1),
                        ("get_data_parallel_group", None), ("get_tensor_model_parallel_rank", 0)):
        monkeypatch.setattr(ps, name, lambda v=value: v)
    monkeypatch.setattr(generation.dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(0, obj))
    return generation.SampleGenerator(load_tokenizer("builtin:char", tmp_path), RolloutConfig(), stop_ids=[0])


def test_rl_generator_drops_dropped_samples_and_counts_them(generator):
    from megatron_kimi.rl.types import Prompt

    prompts = [Prompt("1+1=", "2"), Prompt("2+2=", "4"), Prompt("3+3=", "6")]
    batch = generator.sample(DroppingBackend(drop={"0/1", "2/0", "2/1"}), 0, prompts, k=2)
    assert batch.dropped == 3
    assert [(s.prompt_index, s.finish_reason) for s in batch.samples] == [(0, "stop"), (1, "stop"), (1, "stop")]
    assert all(s.response_ids == [1, 2] for s in batch.samples)
    assert set(batch.groups()) == {0, 1} and len(batch.groups()[0]) == 1  # the group keeps what came back
    held = generator.greedy(DroppingBackend(drop={"1/0"}), prompts)
    assert [s.prompt_index for s in held] == [0, 2]


def test_partial_rollouts_a_dropped_segment_leaves_the_trajectory_unchanged(generator):
    from megatron_kimi.rl.partial import ReplayBuffer
    from megatron_kimi.rl.types import Prompt

    buf = ReplayBuffer(k=2, budget=2, max_new_tokens=8, max_segments=4)
    (g,) = buf.add([0], [[5, 6]])
    a, b = buf.pending()
    assert generator.segment_round(DroppingBackend(drop={f"{g}/1"}), 0, 0, buf) == 1
    assert (a.response_ids, a.finished, a.segments) == ([1, 2], True, 1)
    assert (b.response_ids, b.finished, b.segments) == ([], False, 0)  # as it was: next round
    assert buf.pending() == [b]
    assert generator.segment_round(DroppingBackend(), 0, 1, buf) == 0
    assert b.response_ids == [1, 2] and b.finished

    # through sample_partial: the drops of every round are counted in the batch
    backend = DroppingBackend(drop={"1/0"})
    buf = ReplayBuffer(k=2, budget=2, max_new_tokens=8, max_segments=2)
    buf.next_group = 1
    batch = generator.sample_partial(backend, 3, buf, [0], [Prompt("1+1=", "2")])
    assert batch.dropped == 2  # group 1's sample 0, in both rounds (the backend always drops it)
    assert batch.samples == [] and len(buf.pending()) == 1  # its group waits: sample 0 is unfinished


@pytest.mark.timeout(400)
def test_rl_loop_on_a_server_backend_counts_dropped_requests(tmp_path):
    """The wiring end to end: commands/rl.py builds the backend from the config, the loop syncs every
    iteration (reload then reset) and trains on what came back; failing requests are dropped and counted."""
    from megatron_kimi.data.tokenizer import load_tokenizer
    from tests.rollout import server_bodies

    vocab = len(load_tokenizer("builtin:char", tmp_path / "tok"))
    failing = lambda body: body.get("seed") is not None and body["seed"] % 4 == 0  # noqa: E731 -- sampled ones
    with FakeVllmServer(vocab=vocab) as f:
        f.fault = lambda body, n: 500 if failing(body) else None
        out = run_distributed(server_bodies.rl_loop_job, 1, str(tmp_path / "run"), f.url, str(tmp_path / "w"),
                              timeout=360)[0]
        paths, completions = f.paths(), f.completions
    history = out["history"]
    assert [r["iteration"] for r in history] == [1, 2, 3]
    dropped = sum(r.get("dropped_requests", 0) for r in history)
    assert dropped == out["dropped"] == len([b for b in completions if failing(b)]) // 2 > 0  # 2 attempts each
    syncs = [p for p in paths if p in ("/collective_rpc", "/reset_prefix_cache")]
    assert syncs == ["/collective_rpc", "/reset_prefix_cache"] * 4 and out["version"] == 4  # start + 3 iterations
    assert set(out["summary"]) == {"before", "after"}


def test_iteration_record_has_dropped_requests():
    from megatron_kimi.rl.loop import iteration_metrics
    from megatron_kimi.rl.types import Prompt, RolloutBatch, Sample

    s = Sample(prompt_index=0, prompt=Prompt("x"), prompt_ids=[1], response_ids=[2, 3], response="ab",
               sampler_logprobs=[-0.1, -0.2], finish_reason="stop", reward=1.0, ref_logp=-0.3)
    steps = [{"loss": 0.5, "grad_norm": 1.0, "lr": 1e-4, "report": {"log_ratio_sum": 0.0, "loss_count": 1.0}}]
    rec = iteration_metrics(RolloutBatch(iteration=0, k=2, samples=[s], dropped=5), steps, {"rollout": 1.0})
    assert rec["dropped_requests"] == 5


# ----------------------------------------------------------------------- a real server (vllm venv)

def _keys(doc):
    """The JSON structure: keys of dicts (recursively; token ids as keys are data: "<token>"), the first
    non-null element of lists, the types of values."""
    if isinstance(doc, dict):
        return {("<token>" if k.isdigit() or k.startswith("token_id:") else k): _keys(v) for k, v in doc.items()}
    if isinstance(doc, list):
        items = [x for x in doc if x is not None]
        return [_keys(items[0]) if items else None, doc[0] is None if doc else None]
    return "number" if isinstance(doc, (int, float)) and not isinstance(doc, bool) else type(doc).__name__


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_real_server_matches_the_trainer_before_and_after_a_weight_sync(tmp_path):
    from tests.rollout import server_bodies

    TOL = 1e-4
    res = run_distributed(server_bodies.real_server_job, 1, str(tmp_path), timeout=840,
                          env={"VLLM_CPU_KVCACHE_SPACE": "1"})[0]
    print(f"\nserver start {res['start_s']:.1f}s, sync {res['sync'][0] * 1e3:.1f} ms ({res['sync'][1] / 1e6:.2f} MB, "
          f"{res['sync'][2]:.3f} GB/s); greedy lp diff {res['greedy_lp_diff']:.2e}, after sync "
          f"{res['after_sync_diff']:.2e}, stale prefix {res['stale_diff']:.2e} -> {res['fresh_diff']:.2e}")
    assert res["greedy"] == res["ref_greedy"] and res["greedy_lp_diff"] <= TOL
    assert all(f == "length" for f in res["greedy_finish"])
    assert res["raw_lp_diff"] <= TOL and res["topk_lp_diff"] <= TOL and res["topk_slp_diff"] <= TOL
    assert res["dropped"] == 0
    assert res["before_sync_diff"] > 1e-2 and res["after_sync_diff"] <= TOL and res["version"] == 1
    assert res["after_greedy"] == res["after_ref_greedy"] and res["after_greedy_lp_diff"] <= TOL
    assert res["stale_diff"] > 1e-3 and res["fresh_diff"] <= TOL  # the prefix-cache reset matters
    assert Path(res["log"]).is_file() and res["dir_removed"] and res["server_gone"]
    # the fake answers in the real server's shapes
    fake = FakeVllmServer()
    for body, answer in ((res["body"], res["answer"]), (res["score_body"], res["score_answer"])):
        _, mine = fake.complete(body)
        assert _keys(mine["choices"][0]) == _keys(answer["choices"][0])
        assert set(mine) == set(answer)
    fake.httpd.server_close()
