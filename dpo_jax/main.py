"""Command line: `python -m dpo_jax.main --config=configs/demo.py --workdir=DIR [--config.key=value ...]`.

Runs the config's mode (sft, dpo, or sft_then_dpo) in DIR; re-running with the same DIR resumes.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (a get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dpo_jax_demo", "Checkpoints, metrics and plots go here.")


def main(argv):
    del argv
    # Orbax logs every save at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
