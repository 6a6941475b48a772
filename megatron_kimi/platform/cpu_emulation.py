"""Run unmodified Megatron-Core on a machine without CUDA.

This is the ONE place where CUDA calls are routed to the CPU. It is activated by
:func:`activate`, which does nothing (and returns False) when ``torch.cuda.is_available()``:
on a GPU machine Megatron talks to the real CUDA runtime and nothing here is touched.

What is routed, and why (Megatron-Core 0.16 has ~570 ``torch.cuda``/``.cuda()`` uses):

* ``torch.cuda.current_device()`` -> 0, and every tensor factory / ``Tensor.to`` call that names a
  CUDA device (``"cuda"``, ``"cuda:0"``, ``0``, ``torch.device("cuda")``) is rewritten to the CPU: the
  ``torch.*`` factories, ``Tensor.to`` and ``Tensor.new_*`` are wrapped (plain wrappers rather than a
  TorchFunctionMode: no per-op cost, and valid in every thread, e.g. checkpoint writers).
  ``pin_memory=True`` is dropped (pinning needs CUDA).
* ``Tensor.cuda()`` returns the tensor; ``Tensor.pin_memory()`` returns the tensor.
* ``Tensor.type()`` with no argument reports ``torch.cuda.<X>Tensor`` for CPU tensors: Megatron's
  optimizers and grad clipping accept only those type strings.
* RNG: the "CUDA" generator *is* the CPU default generator (``get/set_rng_state``, ``manual_seed``,
  ``default_generators``). ``torch.cuda._lazy_call`` runs its callback at once — on a CPU build it only
  queues it, so Megatron's ``get_cuda_rng_tracker().fork()`` would silently do nothing and tensor-parallel
  ranks would draw different random numbers (the "RNG trap").
* ``synchronize``/``empty_cache``/``set_device``, streams, events, nvtx ranges: no-ops or tiny stand-ins.
* Memory queries (``memory_stats`` -> a dict defaulting to 0, ``memory_allocated`` ...): 0.
* Megatron's RNG tracker warns "CPU RNG state changed within GPU RNG context" whenever random numbers
  are drawn under ``fork()``; with the CPU standing in for the GPU generator that is expected, so
  that one log message is filtered out.

Nothing else is changed. :func:`is_active` tells whether the emulation is on.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time

import torch

_STATE: dict = {"active": False}

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "randperm", "linspace", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
    "randn_like", "empty_strided", "eye", "frombuffer",
)


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _fix_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    if kwargs.get("pin_memory"):
        kwargs = dict(kwargs, pin_memory=False)
    return kwargs


class _Stream:
    """Stand-in for torch.cuda.Stream: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """Stand-in for torch.cuda.Event that measures wall time."""

    def __init__(self, *args, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._t - self._t) * 1000.0


class _DeviceProperties:
    name = "cpu"
    total_memory = 0
    major = 0
    minor = 0
    multi_processor_count = 0


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **_fix_kwargs(kwargs))

    wrapper._kimi_original = fn  # type: ignore[attr-defined]
    return wrapper


def _patch_tensor_methods() -> None:
    orig_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig_type(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type
    orig_to = torch.Tensor.to

    def _to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]) and not isinstance(args[0], bool):
            args = ("cpu",) + tuple(args[1:])
        return orig_to(self, *args, **_fix_kwargs(kwargs))

    torch.Tensor.to = _to
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        setattr(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self


def _patch_cuda_module() -> None:
    cuda = torch.cuda
    cpu_gen = torch.default_generator

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        cpu_gen.manual_seed(int(seed))

    replacements = {
        "current_device": lambda: 0,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "ipc_collect": lambda: None,
        "_lazy_call": lambda cb, **kwargs: cb(),
        "_lazy_init": lambda: None,
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "manual_seed": manual_seed,
        "manual_seed_all": manual_seed,
        "seed": lambda: cpu_gen.seed(),
        "initial_seed": lambda: cpu_gen.initial_seed(),
        "default_generators": (cpu_gen,),
        "Stream": _Stream,
        "Event": _Event,
        "ExternalStream": _Stream,
        "current_stream": lambda *a, **k: _Stream(),
        "default_stream": lambda *a, **k: _Stream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "set_stream": lambda *a, **k: None,
        "memory_stats": lambda *a, **k: collections.defaultdict(int),
        "memory_allocated": lambda *a, **k: 0,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_reserved": lambda *a, **k: 0,
        "max_memory_reserved": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None,
        "get_device_properties": lambda *a, **k: _DeviceProperties(),
        "get_device_capability": lambda *a, **k: (0, 0),
        "get_device_name": lambda *a, **k: "cpu",
    }
    for name, value in replacements.items():
        setattr(cuda, name, value)
    cuda.random.get_rng_state = get_rng_state
    cuda.random.set_rng_state = set_rng_state
    cuda.random.manual_seed = manual_seed
    cuda.random.manual_seed_all = manual_seed
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx.mark = lambda *a, **k: None


def _patch_already_imported_megatron() -> None:
    """Megatron's RNG module binds ``_lazy_call`` at import time: re-point it if imported already."""
    import sys

    mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if mod is not None:
        mod._lazy_call = torch.cuda._lazy_call
        mod._lazy_init = torch.cuda._lazy_init


class _DropForkRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def activate() -> bool:
    """Route CUDA calls to the CPU if (and only if) CUDA is unavailable. Idempotent.

    Returns True when the emulation is (now) active, False on a CUDA machine.
    """
    if _STATE["active"]:
        return True
    if torch.cuda.is_available():
        return False
    _patch_cuda_module()
    _patch_tensor_methods()
    for name in _FACTORIES:
        if hasattr(torch, name):
            setattr(torch, name, _wrap_factory(getattr(torch, name)))
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkRngWarning())
    _STATE["active"] = True
    _patch_already_imported_megatron()
    return True


def is_active() -> bool:
    return bool(_STATE["active"])
