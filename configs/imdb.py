"""The first step of the paper's controlled sentiment setting (Rafailov et al., 2023, Sec. 6): GPT-2 large fine-tuned
on IMDb reviews, whose prompts for the experiment are 2–8-token prefixes of reviews (here 2–8 words: the data is
prepared without a tokenizer).

    python -m dpo_jax.main --config=configs/imdb.py --workdir=RUN_DIR            # a GPU node
    python -m dpo_jax.main --config=configs/imdb.py:tiny --workdir=/tmp/imdb     # the same pipeline on a CPU
    python -m experiments.sentiment --config=configs/imdb.py --reward=hf:CLASSIFIER --workdir=RUN_DIR  # the experiment

The last runs the whole experiment from this SFT step (experiments/sentiment): samples of the SFT model on the train
prefixes, pairs labelled by the classifier, DPO at β ∈ {0.05, 0.1, 1, 5} and the baselines with this config's dpo
settings, and the reward-vs-KL frontier. CLASSIFIER must be a local <Family>ForSequenceClassification checkpoint of
one of our decoder families (e.g. GPT-2 fine-tuned on IMDb sentiment); the paper's RoBERTa classifier is not one.

IMDb holds reviews, not preferences: each record is (prefix, rest of the review, positive?), and this config
trains the SFT model on every review (mode = sft; the sentiment labels are unused). The paper's DPO pairs come
from sampling that SFT model on the prefixes and ranking the samples with a sentiment classifier; the labelled
records also suit KTO directly (--config.mode=sft_then_dpo --config.loss.name=kto). Expects `model.path` to be
GPT-2 large (gpt2-large). The data (25,000 training reviews) is downloaded from Stanford's site and prepared once
into data.tfds_data_dir. `:tiny` runs everything end to end with the GPT-2 fixture checkpoint and a dummy archive.
"""

from configs.tldr import shrink_to_fixtures
from dpo_jax.config import base_config


def get_config(arg: str | None = None):
    """The SFT step of the setting; `arg='tiny'` is the same pipeline at CPU scale on fixture data and checkpoint."""
    config = base_config()
    config.mode = "sft"
    config.model.update(path="gpt2-large", dtype="float32")
    config.data.update(
        source="imdb", tokenizer="model", num_train_pairs=0, num_eval_pairs=1024, num_eval_prompts=256,
        max_length=256, max_prompt_length=16, truncation_mode="keep_start",  # prefixes are short
    )
    config.sft.update(num_steps=25_000 // 64, learning_rate=1e-6, warmup_steps=150)  # one epoch
    config.train.update(eval_every=100, checkpoint_every=100, eval_batch_size=32)
    config.eval.update(max_new_tokens=48, temperature=1.0)
    if arg == "tiny":
        shrink_to_fixtures(config, "gpt2", "imdb")
    elif arg:
        raise ValueError(f"configs/imdb.py: unknown argument {arg!r}; valid: 'tiny' or none")
    return config
