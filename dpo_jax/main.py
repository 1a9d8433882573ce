"""Command line: `python -m dpo_jax.main --config=configs/demo.py --workdir=DIR [--config.key=value ...]`.

Runs the config's mode (sft, dpo, sft_then_dpo or precompute_ref) in DIR, or with `--config.dry_run=True` prints
each device's memory and exits; re-running with the same DIR resumes. Exit statuses:
0 done, 2 a bad config, data, checkpoint or busy workdir (one line on stderr; --verbose adds the traceback),
3 non-finite training, 4 checkpoints could not be saved, 128 + N stopped by signal N after saving (143 for
SIGTERM, 130 for Ctrl-C); anything else is a bug and prints its traceback (see dpo_jax/errors.py).
"""

from __future__ import annotations

import logging as std_logging
import sys
import traceback
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import checkpoint, dry_run, errors, run
from dpo_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config file (a get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dpo_jax_demo", "Checkpoints, metrics and plots go here.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print tracebacks of user errors and stops, and Orbax's own errors.")


def _one_line(text: str) -> str:
    """The first line of a message, and its last if an embedded traceback sits between them."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 or "Traceback" not in text else f"{lines[0]} {lines[-1]}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that reports a bad flag, config file or --config.KEY override in one line, status 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # flags.Error, or the AttributeError/KeyError of an override naming no key
        if isinstance(error, flags.Error):
            message = _one_line(str(error))
        else:
            name = str(error).strip("'\"")
            overrides = [arg for arg in argv[1:] if arg.startswith("--config.") and f".{name}" in arg.split("=")[0]]
            message = f"{' '.join(overrides) or 'a --config override'}: the config has no key {name!r}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _keep_log_record(record: std_logging.LogRecord) -> bool:
    """Orbax logs every save at INFO, and a failed save or restore as tracebacks from its threads and from the
    asyncio tasks it leaves behind, which the run reports itself in one line: keep Orbax's warnings, and those
    errors only with --verbose."""
    if "orbax" not in record.pathname and record.name != "asyncio":
        return True
    return record.levelno >= std_logging.WARNING and (record.levelno < std_logging.ERROR or _VERBOSE.value)


def _unraisable(unraisable) -> None:
    """Tensorstore callbacks of a failed Orbax save may fire on its closed event loop ("Event loop is closed"),
    each printing a traceback; the run has reported the failure in one line. Other unraisables print as usual."""
    if not _VERBOSE.value and checkpoint.is_closed_loop_noise(unraisable.exc_value):
        logging.debug("ignored after a failed checkpoint operation: %r", unraisable.exc_value)
    else:
        sys.__unraisablehook__(unraisable)


def run_config(config, workdir: str) -> None:
    """The config's dry run (shapes only: nothing is allocated, loaded or written), or its mode in `workdir`."""
    if not config.dry_run:
        run.train_and_evaluate(config, workdir)
        return
    config_lib.validate(config)
    with errors.user_errors("dry run"):
        print(dry_run.report(config))


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_keep_log_record)
    sys.unraisablehook = _unraisable
    if not _VERBOSE.value:  # the same leftovers of a failed save, collected at exit: "coroutine ... never awaited"
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    try:
        run_config(_CONFIG.value, _WORKDIR.value)
    except errors.RunStopped as stop:
        if _VERBOSE.value:
            traceback.print_exc()
        label = "error" if isinstance(stop, errors.UserError) else "stopped"
        print(f"{label}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
