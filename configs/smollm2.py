"""DPO of SmolLM2-135M-Instruct (a 30-layer Llama, read from its GGUF file) on a preference file of chat messages.

    python -m dpo_jax.fetch smollm2                                               # once: the GGUF, into the cache
    python -m dpo_jax.main --config=configs/smollm2.py --workdir=/tmp/smollm2     # a 2-core CPU, minutes
    python -m dpo_jax.main --config=configs/smollm2.py:accelerator --workdir=RUN_DIR \
        --config.data.path=prefs.jsonl                                            # a GPU / TPU, your data

The instruct model is both the starting policy and π_ref (`mode=dpo`: it is already fine-tuned, so no
Preferred-FT stage), with its own tokenizer and ChatML template from the same GGUF. `data.path` is a JSONL, JSON or
Parquet file whose prompt/chosen/rejected are chat messages (docs/data.md, "Your own file"); by default the
repository's 40-pair sample (tests/fixtures/gguf/chat_prefs.jsonl: helpful answers preferred over dismissive
ones), a quarter of it held out for evaluation. `model.path` is where `python -m dpo_jax.fetch` puts the GGUF
($DPO_JAX_CACHE or ~/.cache/dpo_jax); any Llama GGUF or Hugging Face checkpoint can replace it.

Variants (`--config=configs/smollm2.py:VARIANT`):
- `cpu` (the default): float32, 8 pairs a step over 128 tokens, 20 steps at AdamW lr 5e-6 (a few epochs of the
  sample; the paper's 1e-6 barely moves a policy in 20 steps), greedy samples of 32 tokens for 4 held-out prompts.
  Measured on the project's 2-core CPU: see docs/real_model.md.
- `accelerator`: the paper's recipe on your data: bfloat16 compute with a bfloat16 π_ref, 64 pairs a step over
  512 tokens (prompts cut to 256, keeping their end), RMSprop lr 1e-6 after 150 warmup steps, 1000 steps.
"""

import os

from dpo_jax import fetch
from dpo_jax.config import base_config

SAMPLE_PREFERENCES = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "gguf", "chat_prefs.jsonl")


def get_config(arg: str | None = None):
    """`arg`: 'cpu' (default) or 'accelerator'."""
    variant = arg or "cpu"
    if variant not in ("cpu", "accelerator"):
        raise ValueError(f"configs/smollm2.py: unknown argument {arg!r}; valid: 'cpu' (default) or 'accelerator'")
    config = base_config()
    config.mode = "dpo"
    config.model.path = fetch.model_path("smollm2")
    config.data.update(source="file", tokenizer="model", path=SAMPLE_PREFERENCES, eval_fraction=0.25,
                       num_train_pairs=0, num_eval_pairs=0, truncation_mode="keep_end")
    config.loss.update(name="dpo", beta=0.1)
    if variant == "cpu":
        config.data.update(max_length=128, max_prompt_length=96, num_eval_prompts=4, num_threads=2)
        config.optimizer.name = "adamw"
        config.dpo.update(num_steps=20, learning_rate=5e-6, warmup_steps=2)
        config.train.update(batch_size=8, eval_batch_size=10, log_every=1, eval_every=10, checkpoint_every=10)
        config.eval.update(max_new_tokens=32)
    else:
        config.model.update(dtype="bfloat16", reference_dtype="bfloat16")
        config.data.update(max_length=512, max_prompt_length=256, num_eval_prompts=64)
        config.dpo.update(num_steps=1000, learning_rate=1e-6, warmup_steps=150)
        config.train.update(batch_size=64, eval_batch_size=64, eval_every=100, checkpoint_every=100)
        config.eval.update(max_new_tokens=128)
    return config
