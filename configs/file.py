"""DPO on your own preference file from a Hugging Face checkpoint, with the paper's defaults (β = 0.1, RMSprop
lr 1e-6, 64 pairs a step, 150 warmup steps, pairs truncated to 512 tokens and prompts to 256).

    python -m dpo_jax.main --config=configs/file.py --workdir=RUN_DIR \
        --config.model.path=Qwen/Qwen2.5-0.5B-Instruct --config.data.path=prefs.jsonl

`data.path` is a JSONL, JSON or Parquet file of prompt/chosen/rejected records, full chosen/rejected texts
sharing a prompt, chat messages, or unpaired prompt/completion/label records (with `--config.loss.name=kto`);
see docs/data.md. The checkpoint is the SFT model and π_ref; its own tokenizer (and chat template) is used.
Held-out pairs come from `data.eval_path`, or a seeded `data.eval_fraction` of the file.
"""

from dpo_jax.config import base_config


def get_config(arg: str | None = None):
    """The paper's defaults on `data.source = 'file'`; `model.path` and `data.path` are given on the command line."""
    if arg:
        raise ValueError(f"configs/file.py: takes no argument, got {arg!r}")
    config = base_config()
    config.mode = "dpo"
    config.data.update(source="file", tokenizer="model", num_train_pairs=0, num_eval_pairs=0, num_eval_prompts=16)
    return config
