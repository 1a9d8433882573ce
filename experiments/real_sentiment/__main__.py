"""The paper's controlled-sentiment experiment on a real language model (SmolLM2-135M-Instruct, VADER as reward).

    python -m dpo_jax.fetch smollm2                                                      # once: the GGUF
    python -m experiments.real_sentiment --workdir=/tmp/real_sentiment                   # ~40 min on 2 CPU cores
    python -m experiments.real_sentiment --workdir=/tmp/real_sentiment_quick --quick     # a tiny stand-in model

Needs the `experiments` extra (pip install -e ".[experiments]": vadersentiment). --quick runs every stage at toy
size on a random 2-layer Llama fixture (no GGUF needed; the tests run it). Rerunning with the same --workdir reuses
every finished stage. See docs/real_sentiment.md for the measured results.
"""

import dataclasses

from absl import app, flags, logging

from experiments.real_sentiment import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage and the report go.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "A minutes-long smoke run on a tiny stand-in model (the tests).")
_MODEL_PATH = flags.DEFINE_string("model_path", "", "π_ref and the policies' start: a GGUF or Hugging Face "
                                  "checkpoint ('': the fetched SmolLM2-135M-Instruct GGUF).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts, samples and runs.")


def main(argv):
    """Run (or resume) the experiment in --workdir at the full or --quick scale."""
    del argv
    logging.set_verbosity(logging.WARNING)  # the experiment prints a line per stage; each run keeps its own files
    scale = pipeline.QUICK if _QUICK.value else pipeline.FULL
    if _MODEL_PATH.value:
        scale = dataclasses.replace(scale, model_path=_MODEL_PATH.value)
    pipeline.run_experiment(_WORKDIR.value, scale, _SEED.value)


if __name__ == "__main__":
    app.run(main)
