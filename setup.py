from setuptools import find_packages, setup

# lm-evaluation-harness for megatron_espace.lm_eval_adapter (`espace evaluate --tasks`); its
# dependencies leave torch alone. The tests run the adapter, so `test` includes it.
EVAL = ["lm-eval>=0.4.13,<0.5"]

setup(
    name="megatron-espace",
    version="0.1.0",
    description="ESPACE activation-projection compression for Megatron-LM / megatron-core models",
    packages=find_packages(include=["megatron_espace", "megatron_espace.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned here: the CPU toolchain pins torch==2.13.0 in
    # requirements-cpu.txt, a GPU install keeps the CUDA torch it already has.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "safetensors>=0.4",
        "PyYAML>=6",
        "tqdm",
        "psutil",  # without it a dist_checkpointing save hangs (DESIGN section 6)
        "matplotlib",
    ],
    extras_require={
        # transformers builds the reference models of the HuggingFace import/export tests
        "test": ["pytest>=7", "pytest-timeout", "transformers>=4.45", *EVAL],
        "eval": EVAL,
        "gpu": ["transformer-engine[pytorch]", "apex"],
    },
    entry_points={"console_scripts": ["espace=megatron_espace.cli:main"]},
)
