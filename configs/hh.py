"""The paper's single-turn dialogue setting (Rafailov et al., 2023, Sec. 6 and App. B): Anthropic HH, Pythia 2.8B,
Preferred-FT on the chosen answers (the SFT model, which becomes π_ref), then DPO with β = 0.1, RMSprop lr 1e-6,
64 pairs a step, 150 warmup steps, clip 10, pairs truncated to 512 tokens and prompts to 256 keeping their end
(the reference implementation's setting for dialogue). The paper judges the policy by GPT-4 win rate against the
dataset's chosen answers.

    python -m dpo_jax.main --config=configs/hh.py --workdir=RUN_DIR              # a TPU VM / GPU node
    python -m dpo_jax.main --config=configs/hh.py:tiny --workdir=/tmp/hh         # the same pipeline on a CPU

Expects `model.path` to be the base Pythia 2.8B (EleutherAI/pythia-2.8b). The data (4 subsets, 160,800 training
pairs) is downloaded from the Hugging Face Hub and prepared once into data.tfds_data_dir. `:tiny` runs
everything end to end with the repository's GPT-NeoX fixture checkpoint and dummy raw HH files.
"""

from configs.tldr import shrink_to_fixtures
from dpo_jax.config import base_config

TRAIN_PAIRS = 160_800  # the four HH subsets' training pairs


def get_config(arg: str | None = None):
    """The paper's setting; `arg='tiny'` is the same pipeline at CPU scale on fixture data and checkpoint."""
    config = base_config()
    config.mode = "sft_then_dpo"
    # π_ref in bfloat16 (the compute dtype: its log-probs are unchanged) and rematerialised blocks, as tldr.py.
    config.model.update(path="EleutherAI/pythia-2.8b", dtype="bfloat16", reference_dtype="bfloat16", remat="full")
    config.data.update(
        source="hh", tokenizer="model", num_train_pairs=0, num_eval_pairs=1024, num_eval_prompts=256,
        max_length=512, max_prompt_length=256, truncation_mode="keep_end",
    )
    config.loss.beta = 0.1
    one_epoch = TRAIN_PAIRS // 64
    config.sft.update(num_steps=one_epoch, learning_rate=1e-6, warmup_steps=150)
    config.dpo.update(num_steps=one_epoch, learning_rate=1e-6, warmup_steps=150)
    config.train.update(eval_every=200, checkpoint_every=200, eval_batch_size=32)
    config.eval.update(max_new_tokens=128, temperature=1.0)
    if arg == "tiny":
        shrink_to_fixtures(config, "gpt_neox", "hh")
    elif arg:
        raise ValueError(f"configs/hh.py: unknown argument {arg!r}; valid: 'tiny' or none")
    return config
