"""detect_env / host-list parsing: pure environment parsing, no processes or sockets except 'single'."""

from __future__ import annotations

import socket

import pytest

from megatron_kimi.platform.launch import DistEnv, detect_env, expand_hostlist, first_host


def _srun(**extra: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {
        "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "99",
        "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "7",
        "SLURM_STEP_NODELIST": "node[03-04]", "SLURM_JOB_NODELIST": "other[1-9]", "SLURM_JOB_ID": "123456",
        "SLURM_NODEID": "1",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


# ------------------------------------------------------------------------------------------ torchrun
def test_torchrun_full():
    env = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 8, 1, 2, "10.0.0.7", 1234, "torchrun")


def test_torchrun_defaults():
    env = detect_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert env == DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "torchrun")


def test_torchrun_wins_over_slurm():
    env = detect_env({**_srun(), "RANK": "0", "WORLD_SIZE": "1"})
    assert env.launcher == "torchrun" and env.world_size == 1


# -------------------------------------------------------------------------------------------- srun
def test_srun_basic_and_port_from_job_id():
    env = detect_env(_srun())
    assert env == DistEnv(5, 8, 1, 4, "node03", 20000 + 123456 % 20000, "srun")
    assert env.master_port == 23456


def test_srun_legacy_stepid_and_job_level_fallbacks():
    e = _srun(SLURM_STEP_ID=None, SLURM_STEPID="2", SLURM_STEP_NUM_TASKS=None, SLURM_STEP_TASKS_PER_NODE=None,
              SLURM_STEP_NODELIST=None, SLURM_NODEID=None, SLURM_PROCID="50")
    env = detect_env(e)
    assert env == DistEnv(50, 99, 1, 7, "other1", 23456, "srun")


def test_srun_env_master_overrides():
    env = detect_env(_srun(MASTER_ADDR="head", MASTER_PORT="4242"))
    assert (env.master_addr, env.master_port) == ("head", 4242)


def test_srun_without_job_id_uses_default_port():
    e = _srun()
    del e["SLURM_JOB_ID"]
    assert detect_env(e).master_port == 29500


@pytest.mark.parametrize("job_id,port", [("0", 20000), ("19999", 39999), ("20000", 20000), ("4000123", 20123)])
def test_srun_port_from_job_id(job_id, port):
    assert detect_env(_srun(SLURM_JOB_ID=job_id)).master_port == port


@pytest.mark.parametrize("nodelist,first", [
    ("node1", "node1"),
    ("node[01-04,07]", "node01"),
    ("gpu-a[1-2],gpu-b3", "gpu-a1"),
    ("a[1,3],b[2-4]", "a1"),
    ("node[007-010]", "node007"),
    ("rack[2-3]-n[08-09]", "rack2-n08"),
    ("host.example.com", "host.example.com"),
])
def test_srun_master_from_nodelist(nodelist, first):
    assert detect_env(_srun(SLURM_STEP_NODELIST=nodelist)).master_addr == first


@pytest.mark.parametrize("tpn,node_id,local_world", [
    ("4", "0", 4), ("2(x3),1", "0", 2), ("2(x3),1", "2", 2), ("2(x3),1", "3", 1), ("3,1(x2)", "1", 1),
])
def test_srun_tasks_per_node_forms(tpn, node_id, local_world):
    env = detect_env(_srun(SLURM_STEP_TASKS_PER_NODE=tpn, SLURM_NODEID=node_id, SLURM_LOCALID="0"))
    assert env.local_world_size == local_world


def test_srun_tasks_per_node_without_node_id_uses_first_number():
    e = _srun(SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_LOCALID="0")
    del e["SLURM_NODEID"]
    assert detect_env(e).local_world_size == 2


def test_hostlist_expansion():
    assert expand_hostlist("a[1,3],b[2-4]") == ["a1", "a3", "b2", "b3", "b4"]
    assert expand_hostlist("node[08-11]") == ["node08", "node09", "node10", "node11"]
    assert expand_hostlist("gpu-a[1-2],gpu-b3") == ["gpu-a1", "gpu-a2", "gpu-b3"]
    assert first_host("x[0099-0101]") == "x0099"


@pytest.mark.parametrize("bad", ["", "a[", "a]", "a[]", "a[3-1]", "a,,b", "a[x]", "a[[1]]"])
def test_hostlist_malformed(bad):
    with pytest.raises(ValueError, match="host list"):
        expand_hostlist(bad)


# ------------------------------------------------------------------------------------------ single
def _assert_single(env: DistEnv) -> None:
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the port is (still) bindable
        s.bind(("127.0.0.1", env.master_port))


def test_single_empty_env():
    _assert_single(detect_env({}))


def test_batch_script_is_not_srun():
    e = _srun(SLURM_PROCID="0", SLURM_LOCALID="0")
    del e["SLURM_STEP_ID"]
    _assert_single(detect_env(e))


def test_default_reads_os_environ(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert detect_env() == DistEnv(2, 4, 2, 4, "127.0.0.1", 29500, "torchrun")


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("environ,var,value", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK", "x"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE", "two"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK", "2"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK", "-1"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE", "0"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1.5"}, "LOCAL_RANK", "1.5"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK", "2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT", "http"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT", "70000"),
    ({"RANK": "0"}, "WORLD_SIZE", "None"),
    (_srun(SLURM_PROCID="8"), "SLURM_PROCID", "8"),
    (_srun(SLURM_PROCID="abc"), "SLURM_PROCID", "abc"),
    (_srun(SLURM_STEP_NUM_TASKS="8.0"), "SLURM_STEP_NUM_TASKS", "8.0"),
    (_srun(SLURM_LOCALID="4"), "SLURM_LOCALID", "4"),
    (_srun(SLURM_JOB_ID="12_3"), "SLURM_JOB_ID", "12_3"),
    (_srun(SLURM_STEP_TASKS_PER_NODE="4(y2)"), "SLURM_STEP_TASKS_PER_NODE", "4(y2)"),
    (_srun(SLURM_STEP_TASKS_PER_NODE="4", SLURM_NODEID="1"), "SLURM_STEP_TASKS_PER_NODE", "4"),
    (_srun(SLURM_STEP_NODELIST="node[1-"), "SLURM_STEP_NODELIST", "node[1-"),
])
def test_malformed_values_raise(environ, var, value):
    with pytest.raises(ValueError) as info:
        detect_env(environ)
    assert var in str(info.value) and value in str(info.value), str(info.value)
