"""The paper's TL;DR summarisation setting (Rafailov et al., 2023, Sec. 6 and App. B): DPO on the
summarize-from-feedback human comparisons of Reddit TL;DR summaries, starting from a GPT-J 6B model fine-tuned on
TL;DR (which is also π_ref), β = 0.5, RMSprop lr 1e-6, 64 pairs a step, 150 warmup steps then constant, clip 10,
pairs truncated to 512 tokens and prompts to 256. The paper reports a ≈61% GPT-4 win rate against the reference
summaries at temperature 0 (PPO ≈57%).

    python -m dpo_jax.main --config=configs/tldr.py --workdir=RUN_DIR            # a TPU VM / GPU node
    python -m dpo_jax.main --config=configs/tldr.py:tiny --workdir=/tmp/tldr     # the same pipeline on a CPU

Expects `model.path` to be a GPT-J SFT checkpoint for TL;DR in Hugging Face format; the default is the one the
TRLX / DPO-era baselines used, CarperAI/openai_summarize_tldr_sft (override with --config.model.path). The data
(92,858 training comparisons) is downloaded from OpenAI's public bucket and prepared once into data.tfds_data_dir.
`:tiny` runs everything end to end with the repository's GPT-J fixture checkpoint and the dummy raw TL;DR files.
"""

import os

from dpo_jax.config import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_COMPARISONS = 92_858  # Reddit TL;DR comparisons with split "train" in summarize-from-feedback


def get_config(arg: str | None = None):
    """The paper's setting; `arg='tiny'` is the same pipeline at CPU scale on fixture data and checkpoint."""
    config = base_config()
    config.mode = "dpo"  # from the SFT checkpoint, which is π_ref
    # Sized by the dry run (--config.dry_run=True): with the policy, RMSprop and gradients in float32, π_ref stored
    # in bfloat16 (the compute dtype, so its log-probs are unchanged) and each block rematerialised, 64 pairs × 512
    # tokens take 28.3 GiB per device on fsdp = 4 and 14.2 GiB on fsdp = 8 (activations 8.6 / 4.3 GiB, estimated).
    config.model.update(path="CarperAI/openai_summarize_tldr_sft", dtype="bfloat16", reference_dtype="bfloat16",
                        remat="full")
    config.data.update(
        source="tldr", tokenizer="model", num_train_pairs=0, num_eval_pairs=1024, num_eval_prompts=256,
        max_length=512, max_prompt_length=256,
        # The prompt ends with the "TL;DR:" cue the SFT model summarises after: a long post loses its start
        # rather than the cue (the reference code keeps the start of non-dialogue prompts; it never ran TL;DR).
        truncation_mode="keep_end",
    )
    config.loss.beta = 0.5  # the paper's TL;DR β
    config.dpo.update(num_steps=TRAIN_COMPARISONS // 64, learning_rate=1e-6, warmup_steps=150)  # one epoch
    config.train.update(eval_every=200, checkpoint_every=200, eval_batch_size=32)
    config.eval.update(max_new_tokens=64, temperature=0.0)  # greedy, as the headline numbers
    if arg == "tiny":
        shrink_to_fixtures(config, "gptj", "tldr")
    elif arg:
        raise ValueError(f"configs/tldr.py: unknown argument {arg!r}; valid: 'tiny' or none")
    return config


def shrink_to_fixtures(config, family: str, source: str) -> None:
    """The same pipeline at CPU scale: the repository's fixture checkpoint of `family` and dummy raw files of
    `source` (prepared into a temporary data dir), float32, a few steps."""
    config.model.update(path=os.path.join(REPO, "tests", "fixtures", "hf", family), dtype="float32")
    config.data.update(
        raw_dir=os.path.join(REPO, "tests", "fixtures", "tfds", source), download=False,
        tfds_data_dir=os.path.join("/tmp", "dpo_jax_tiny_tfds"), num_train_pairs=0, num_eval_pairs=0,
        num_eval_prompts=2, max_length=64, max_prompt_length=48,
    )
    for stage in (config.sft, config.dpo):
        stage.update(num_steps=3, warmup_steps=1, learning_rate=1e-3)
    config.train.update(batch_size=2, eval_batch_size=1, log_every=1, eval_every=3, checkpoint_every=3)
    config.eval.max_new_tokens = 4
