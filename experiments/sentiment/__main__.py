"""The paper's controlled sentiment experiment (Rafailov et al., 2023, Sec. 6.1, Fig. 2 left), at CPU scale.

    python -m experiments.sentiment --workdir=/tmp/sentiment            # the full run: 11 min on 2 CPU cores
    python -m experiments.sentiment --workdir=/tmp/sentiment_quick --quick
    python -m experiments.sentiment --workdir=RUN --config=configs/imdb.py --reward=hf:/models/imdb_classifier

Built in: the corpus and scorer of corpus.py, a tiny Llama-style decoder. With --config, that config's SFT step
(its model, data source, DPO settings) and --reward as the ground truth; see pipeline.run_experiment.
Rerunning with the same --workdir reuses every finished stage.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.sentiment import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "Where every stage and the report go.", required=True)
_QUICK = flags.DEFINE_bool("quick", False, "A minutes-long smoke run of the built-in experiment (the tests).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "An SFT config (e.g. configs/imdb.py) instead of the "
                                          "built-in corpus and model.", lock_config=False)
_REWARD = flags.DEFINE_string("reward", "", "With --config: the ground-truth reward, hf:PATH of a sentiment "
                              "classifier (<Family>ForSequenceClassification of one of our families, e.g. GPT-2).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the built-in corpus, pairs and runs.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the experiment prints a line per stage; each run keeps its own files
    if _CONFIG.value is not None and _QUICK.value:
        raise app.UsageError("--quick shrinks the built-in experiment; a --config sets its own scale")
    if _CONFIG.value is not None and not (_REWARD.value or _CONFIG.value.eval.reward):
        raise app.UsageError("--config needs a ground-truth reward: --reward=hf:PATH of a sentiment classifier")
    scale = pipeline.QUICK if _QUICK.value else pipeline.FULL
    pipeline.run_experiment(_WORKDIR.value, scale, _CONFIG.value, _REWARD.value, _SEED.value)


if __name__ == "__main__":
    app.run(main)
