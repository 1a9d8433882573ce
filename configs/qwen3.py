"""DPO of Qwen3-0.6B (TRL's default DPO model; a 28-layer Qwen3: q/k norms, grouped KV heads, tied embeddings) on a
preference file of chat messages.

    python -m dpo_jax.main --config=configs/qwen3.py --workdir=RUN_DIR --config.data.path=prefs.jsonl   # GPU / TPU
    python -m dpo_jax.main --config=configs/qwen3.py:tiny --workdir=/tmp/qwen3_tiny     # offline, seconds, any CPU

`model.path` is the Hugging Face repo id `Qwen/Qwen3-0.6B` (fetched into the Hugging Face cache on first use;
HF_HUB_OFFLINE=1 uses the cached copy) or any local Qwen3 checkpoint directory. The instruct-tuned checkpoint is
both the starting policy and π_ref (`mode=dpo`), with its own tokenizer and chat template. `data.path` is a JSONL,
JSON or Parquet file whose prompt/chosen/rejected are chat messages (docs/data.md, "Your own file"); by default the
repository's 40-pair sample (tests/fixtures/gguf/chat_prefs.jsonl), a quarter held out for evaluation.

Variants (`--config=configs/qwen3.py:VARIANT`):
- `accelerator` (the default): the paper's recipe in bfloat16 with a bfloat16 π_ref: 64 pairs a step over 512
  tokens (prompts cut to 256, keeping their end), RMSprop lr 1e-6 after 150 warmup steps, 1000 steps; blocks
  stacked into one scan (28 layers); `python -m dpo_jax.main --config=configs/qwen3.py --config.dry_run=True` sizes
  it per device first (docs/scaling.md).
- `tiny`: the same pipeline on the repository's 2-layer random Qwen3 fixture (tests/fixtures/hf/qwen3, ChatML
  template), float32, 4 steps of 4 pairs: a smoke test of the config, no download.
"""

import os

from dpo_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_PREFERENCES = os.path.join(REPO, "tests", "fixtures", "gguf", "chat_prefs.jsonl")
TINY_QWEN3 = os.path.join(REPO, "tests", "fixtures", "hf", "qwen3")


def get_config(arg: str | None = None):
    """`arg`: 'accelerator' (default) or 'tiny'."""
    variant = arg or "accelerator"
    if variant not in ("accelerator", "tiny"):
        raise ValueError(f"configs/qwen3.py: unknown argument {arg!r}; valid: 'accelerator' (default) or 'tiny'")
    config = base_config()
    config.mode = "dpo"
    config.model.path = "Qwen/Qwen3-0.6B"
    config.data.update(source="file", tokenizer="model", path=SAMPLE_PREFERENCES, eval_fraction=0.25,
                       num_train_pairs=0, num_eval_pairs=0, truncation_mode="keep_end")
    config.loss.update(name="dpo", beta=0.1)
    if variant == "accelerator":
        config.model.update(dtype="bfloat16", reference_dtype="bfloat16")
        config.data.update(max_length=512, max_prompt_length=256, num_eval_prompts=64)
        config.dpo.update(num_steps=1000, learning_rate=1e-6, warmup_steps=150)
        config.train.update(batch_size=64, eval_batch_size=64, eval_every=100, checkpoint_every=100)
        config.eval.update(max_new_tokens=128)
    else:
        config.model.path = TINY_QWEN3
        config.data.update(max_length=96, max_prompt_length=64, num_eval_prompts=2, num_threads=2)
        config.optimizer.name = "adamw"
        config.dpo.update(num_steps=4, learning_rate=1e-3, warmup_steps=1)
        config.train.update(batch_size=4, eval_batch_size=10, log_every=1, eval_every=4, checkpoint_every=4,
                            progress_bar=False)
        config.eval.update(max_new_tokens=8)
    return config
