"""dpo_jax: Direct Preference Optimization (Rafailov et al., 2023) in JAX."""
from setuptools import find_packages, setup

setup(
    name="dpo_jax",
    version="0.1.0",
    description="Direct Preference Optimization in JAX: faithful, fast, hackable.",
    packages=find_packages(include=["dpo_jax", "dpo_jax.*", "configs", "experiments"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy",
        "tensorboardX>=2.6",
        "tqdm",
        "matplotlib",
        # Hugging Face checkpoints and tokenizers (configs and tokenizers only: torch is never needed).
        "transformers>=5.25",  # 5.25: the GGUF tokenizer converter data/gguf_tokenizer.py calls (internal API)
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "jinja2",  # chat templates
        "gguf>=0.19",  # llama.cpp's GGUF files as a model source (gguf-py: numpy only), models/gguf.py
        # The paper's datasets as TFDS array_record files (no TensorFlow), read through Grain; Parquet files.
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "grain>=0.2.12",
        "pyarrow",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist",  # the README's test command runs two workers: one per core of a 2-core machine
            "hypothesis",
            "nbclient",
            "nbformat",
            "ipykernel",
            "wandb>=0.19",  # tests/test_wandb.py, offline (the wandb extra)
        ],
        "notebooks": ["ipywidgets", "jupyter"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9"],  # the site from mkdocs.yml; tests/test_docs.py builds it
        "experiments": ["vadersentiment>=3.3.2"],  # experiments/real_sentiment's reward (VADER, a lexicon scorer)
        "wandb": ["wandb>=0.19"],  # train.loggers = ("wandb", ...): docs/tracking.md
    },
)
