r"""Sweeps: every combination of `--grid` values × seeds, each a normal run in its own workdir, and their results.

    python -m experiments.sweep --config=configs/demo.py --workdir=/tmp/sweep \
        --grid loss.name=dpo,unweighted --grid loss.beta=0.05,0.1,1 --seeds=3 [--config.key=value ...]

Runs one after another in this process, each in WORKDIR/runs/<key=value,...,seed=S>/ (`config.seed` = S for S in
0..seeds-1), then writes WORKDIR/results.csv (a row per run: its grid values, seed, status, workdir and the final
metrics of its summary.json), WORKDIR/results.md (a Markdown table: a row per grid combination, the mean ± std over
seeds of the held-out reward accuracy and margin and the samples' reward and KL) and WORKDIR/plots/<metric>.png:
each final-stage metric against the last grid key (or --plot_x), a line per combination of the other keys, the mean
over seeds with ± their sample standard deviation as error bars.

One SFT reference: with config.mode = 'sft_then_dpo' the SFT stage is trained once, in WORKDIR/sft (seed: the
config's, or --sft_seed), and every run is a mode = 'dpo' run that starts from it and holds it as π_ref
(dpo.reference_workdir). Grid keys under loss., dpo. and eval. leave the SFT model alone; any other grid key
(model., data., sft., train., optimizer.) changes it, so one SFT reference is trained per distinct set of those
values, in WORKDIR/sft/<key=value,...>/. With mode 'dpo' or 'sft' the runs are of that mode and nothing is added.
With ref.cache = DIR, a run's π_ref log-probs go to DIR/<those keys=values,seed=S>/: runs with the same data and
π_ref (differing only in loss., dpo. or eval. keys) share one cache, computed by the first of them.

Rerunning the same command skips the finished runs (their summary.json holds this run's config) and resumes the
others from their checkpoints. A run stopped by non-finite training is marked 'stopped' and the sweep goes on; the
command then exits with status 3, and a rerun tries it again from its last checkpoint.

As separate jobs (one per TPU VM or GPU): the same command with one of these added each time:

    --list            print each run's index, status and name; trains nothing
    --sft_only        train the SFT reference(s) (once, before the runs' jobs start)
    --run_index=I     train run I (e.g. I = $SLURM_ARRAY_TASK_ID); I,J,... runs several in turn
    --collect         write results.csv and the plots from what the workdirs hold

A job whose SFT reference is unfinished trains it first; a second job on the same SFT workdir stops at once (the
workdir lock), hence --sft_only first when the jobs run at the same time.

The package: grid.py plans (grid × seeds → runs with their configs and workdirs), execution.py trains (status,
skip or resume, one run or all), results.py writes results.csv and the plots, __main__.py is the command;
`run_sweep` below does all three in one call.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from dpo_jax import errors, sharding
from experiments.sweep.execution import STOPPED_FILE, SUMMARY_FILE, describe, read_summary, status, train, train_one
from experiments.sweep.grid import Axis, PlannedRun, Sweep, label, parse_grid, plan, shares_reference
from experiments.sweep.results import (
    PLOTS_DIRECTORY, RESULTS_FILE, TABLE_FILE, collect, markdown_table, plot_axis, plot_results, result_row,
    seed_statistics, summary_metrics, write_csv,
)


def run_sweep(base_config: ml_collections.ConfigDict, grid: Sequence[str], seeds: Sequence[int], workdir: str, *,
              sft_seed: int | None = None, x_key: str | None = None) -> list[dict[str, Any]]:
    """Plan, train every run in turn (skipping finished ones, resuming the others) and collect the results; returns
    the results.csv rows. Raises NonFiniteTraining after collecting if any run stopped on non-finite training."""
    sweep = plan(base_config, grid, seeds, workdir, sft_seed)
    plot_axis(sweep, x_key)  # a bad --plot_x fails now, not after training
    stopped = train(sweep)
    rows = collect(sweep, x_key) if sharding.is_main_process() else [result_row(run) for run in sweep.runs]
    if stopped:
        raise errors.NonFiniteTraining(f"{len(stopped)} of {len(sweep.runs)} runs stopped on non-finite training "
                                       f"({', '.join(stopped)}); results of the others are in {workdir}")
    return rows


__all__ = [
    "PLOTS_DIRECTORY", "RESULTS_FILE", "STOPPED_FILE", "SUMMARY_FILE", "TABLE_FILE", "Axis", "PlannedRun", "Sweep",
    "collect", "describe", "label", "markdown_table", "parse_grid", "plan", "plot_axis", "plot_results",
    "read_summary", "result_row", "run_sweep", "seed_statistics", "shares_reference", "status", "summary_metrics",
    "train", "train_one", "write_csv",
]
