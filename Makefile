# megatron_kimi: `make demo` (main job) and `make test` (test suite) each set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
export OMP_NUM_THREADS ?= 2

.PHONY: venv demo test test-fast clean gpu-check

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

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache

# GPU machine: the suite with CUDA visible + every benchmark at GPU sizes, one table (tools/gpu_check.py).
# Runs with the Python that has the CUDA torch (GPU_PY), not .venv (the CPU wheel); on CPU it says so, exit 0.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	-$(GPU_PY) -c "import megatron_kimi.kernels" 2>/dev/null || $(GPU_PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)
