"""vLLM's OpenAI-compatible server as a subprocess of the run (``rollout.engine: vllm_server`` with no
``rollout.server_url``): its command line, environment, and a process that is stopped for sure."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megatron_kimi.platform.launch import free_port

log = logging.getLogger(__name__)

__all__ = ["ServerProcess", "free_port", "server_argv", "server_env"]

_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")




def _die_with_parent() -> None:  # runs in the child before exec (Linux): SIGTERM when the trainer dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort
        pass


class ServerProcess:
    """A server subprocess in its own process group, its output in ``log_path``; :meth:`close` stops it
    (SIGTERM, then after ``grace_s`` SIGKILL of the group). Also closed at interpreter exit."""

    def __init__(self, argv: Sequence[str], log_path, env: Optional[Dict[str, str]] = None, grace_s: float = 30.0):
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.grace_s = float(grace_s)
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.proc: Optional[subprocess.Popen] = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        except BaseException:
            self._log.close()
            raise
        atexit.register(self.close)

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_running(self, url: str = "") -> None:
        """RuntimeError (with the log's tail) if the server has exited."""
        code = self.returncode()
        if self.proc is not None and code is not None:
            raise RuntimeError(f"the vLLM server {url} exited with code {code} (its log: {self.log_path}); "
                               f"the log ends with:\n{self.log_tail()}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.close)
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # vLLM's server shuts its engine process down on SIGTERM
                try:
                    proc.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("vLLM server (pid %d) still running %gs after SIGTERM: SIGKILL", proc.pid, self.grace_s)
            try:  # the group: the server, if still there, and anything it left (its engine process)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("vLLM server (pid %d) did not exit after SIGKILL", proc.pid)
        finally:
            self._log.close()


def server_argv(model_dir, port: int, *, max_model_len: int, max_batch_size: int, dtype: str = "float32",
                seed: int = 0, host: str = "127.0.0.1", cuda: bool = False, gpu_memory_utilization: float = 0.5,
                enforce_eager: bool = True, extra: Sequence[str] = ()) -> List[str]:
    """The command that starts vLLM's OpenAI-compatible server with this interpreter, with the engine
    settings of :class:`VllmBackend` (token ids in and out, processed log-probs, whole-prompt prefill, prefix
    caching; sleep mode on CUDA). ``extra`` arguments come last (they override: e.g. ``--no-enforce-eager``)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", host, "--port", str(int(port)), "--dtype", dtype, "--seed", str(int(seed)),
            "--max-model-len", str(int(max_model_len)), "--max-num-seqs", str(int(max_batch_size)),
            "--skip-tokenizer-init", "--generation-config", "vllm",
            "--logprobs-mode", "processed_logprobs",
            # per-request seeds crash vLLM's CPU sampler on a partially prefilled request: whole prompts
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(8192, int(max_model_len))),
            "--enable-prefix-caching", "--disable-uvicorn-access-log"]
    if enforce_eager:
        argv.append("--enforce-eager")
    if cuda:
        argv += ["--enable-sleep-mode", "--gpu-memory-utilization", str(float(gpu_memory_utilization))]
    return argv + [str(a) for a in extra]


def server_env(cuda: bool) -> Dict[str, str]:
    """This process's environment, with the development endpoints on, without the trainer's launcher
    variables, and on CUDA only this rank's GPU visible."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["VLLM_SERVER_DEV_MODE"] = "1"
    # --max-model-len is max_seq_len + 1 (room for the rescoring request's one generated token), which may
    # exceed the model's max_position_embeddings by one: that position is never computed (the token sampled
    # there is not fed back), so the override is safe for the rotary models the export supports.
    env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    if cuda:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        index = torch.cuda.current_device()
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    return env
