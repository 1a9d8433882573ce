"""python -m experiments.sweep: plan, train and collect a sweep, or one of those as a separate job (see the
package docstring for the flags and the rules)."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax import errors
from experiments import sweep

_CONFIG = config_flags.DEFINE_config_file("config", None, "The base config file (a get_config()); --config.KEY=VALUE "
                                          "overrides apply to every run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: runs/, sft/, results.csv, plots/.")
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a config key and its values (repeat for a product).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Runs each combination with config.seed = 0 .. seeds-1.", lower_bound=1)
_SFT_SEED = flags.DEFINE_integer("sft_seed", None, "Seed of the shared SFT reference (default: the config's seed).")
_PLOT_X = flags.DEFINE_string("plot_x", None, "The grid key on the plots' x axis (default: the last --grid key).")
_LIST = flags.DEFINE_bool("list", False, "Print each run's index, status and name, and exit.")
_SFT_ONLY = flags.DEFINE_bool("sft_only", False, "Train only the SFT reference(s) (before launching runs as "
                              "separate jobs).")
_RUN_INDEX = flags.DEFINE_list("run_index", [], "Train only these runs (indices from --list), e.g. one per job.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only write results.csv and the plots from the runs' workdirs.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of a user error or a stop.")
flags.mark_flags_as_required(["config", "workdir"])


def _done_line(rows: Sequence[dict], *paths: str) -> str:
    return f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs done: {', '.join(paths)}"


def main(argv: Sequence[str]) -> None:
    """Run the action the flags ask for; a user error or a stop is one line on stderr and its exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if flags.FLAGS["verbosity"].using_default_value:  # a line per run here; --verbosity=0 adds the trainer's INFO logs
        logging.set_verbosity(logging.WARNING)
    results = os.path.join(_WORKDIR.value, sweep.RESULTS_FILE)
    try:
        actions = [_LIST.value, _COLLECT.value, _SFT_ONLY.value, bool(_RUN_INDEX.value)]
        if sum(actions) > 1:
            raise errors.UserError("--list, --collect, --sft_only and --run_index: one at a time")
        args = (_CONFIG.value, _GRID.value, range(_SEEDS.value), _WORKDIR.value)
        if not any(actions):
            rows = sweep.run_sweep(*args, sft_seed=_SFT_SEED.value, x_key=_PLOT_X.value)
            print(_done_line(rows, results, os.path.join(_WORKDIR.value, sweep.PLOTS_DIRECTORY) + "/"))
            return
        planned = sweep.plan(*args, _SFT_SEED.value)
        if _LIST.value:
            print(sweep.describe(planned))
        elif _COLLECT.value:
            print(_done_line(sweep.collect(planned, _PLOT_X.value), results))
        else:
            with errors.user_errors("--run_index"):
                indices = [int(i) for i in _RUN_INDEX.value] if _RUN_INDEX.value else None
            stopped = sweep.train(planned, indices, references_only=_SFT_ONLY.value)
            if stopped:
                raise errors.NonFiniteTraining(f"stopped on non-finite training: {', '.join(stopped)}")
    except errors.RunStopped as stop:
        if _VERBOSE.value:
            traceback.print_exc()
        print(f"{'error' if isinstance(stop, errors.UserError) else 'stopped'}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    app.run(main)
