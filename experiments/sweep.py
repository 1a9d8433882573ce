r"""Sweeps: every combination of `--grid` values × seeds, each a normal run in its own workdir, and their results.

    python -m experiments.sweep --config=configs/demo.py --workdir=/tmp/sweep \
        --grid loss.name=dpo,unweighted --grid loss.beta=0.05,0.1,1 --seeds=3 [--config.key=value ...]

Runs one after another in this process, each in WORKDIR/runs/<key=value,...,seed=S>/ (`config.seed` = S for S in
0..seeds-1), then writes WORKDIR/results.csv (a row per run: its grid values, seed, status, workdir and the final
metrics of its summary.json) and WORKDIR/plots/<metric>.png: each final-stage metric against the last grid key
(or --plot_x), a line per combination of the other keys, the mean over seeds with ± their sample standard
deviation as error bars.

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
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.parse
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections.config_flags import config_path

from dpo_jax import config as config_lib
from dpo_jax import errors
from dpo_jax import run as run_lib

# Grid keys in these sections leave the SFT stage's params (so π_ref, and its cached log-probs) unchanged.
SHARED_REFERENCE_SECTIONS = ("loss", "dpo", "eval")
RESERVED_KEYS = {"seed": "set by --seeds", "mode": "one sweep runs one config.mode", "dry_run": "a sweep trains"}
# The types a grid value is parsed to, by the type of the config field it sets (as config_flags parses overrides).
PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser(),
           str: flags.ArgumentParser()}
METRIC_SECTIONS = ("sft", "dpo_initial", "dpo")  # summary.json's final held-out metrics of each stage
RESULTS_FILE, PLOTS_DIRECTORY, SUMMARY_FILE = "results.csv", "plots", "summary.json"
STOPPED_FILE = "sweep_stopped.txt"  # in a run's workdir: why non-finite training stopped it


@dataclasses.dataclass(frozen=True)
class Axis:
    """One `--grid KEY=V1,V2,...`: the key, its values as given and as parsed to the config field's type."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One run of a sweep: its grid values (key, text) in grid order, seed, full config and workdir, and the SFT
    reference workdir the sweep trains for it ('' for none)."""

    index: int
    name: str
    values: tuple[tuple[str, str], ...]
    seed: int
    config: ml_collections.ConfigDict
    workdir: str
    reference: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Sweep:
    """A planned sweep: its workdir, grid axes, runs (grid order, seeds innermost) and SFT references by workdir."""

    workdir: str
    axes: tuple[Axis, ...]
    runs: tuple[Run, ...]
    references: dict[str, ml_collections.ConfigDict]


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """`text` parsed to the type of config field `key` (int, float, bool or str); UserError naming key and text."""
    try:
        kind = config_path.get_type(key, config)
    except (AttributeError, KeyError, IndexError, ValueError) as error:  # ConfigDict adds "Did you mean ..."
        message: Any = error
        while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(text))
            message = message.args[0]
        hint = " ".join(str(message).splitlines()[1:])
        raise errors.UserError(f"--grid {key}: the config has no key {key!r}" + (f" ({hint})" if hint else ""))
    if kind not in PARSERS:
        raise errors.UserError(f"--grid {key}: config.{key} holds {kind.__name__} values; a grid sets int, float, "
                               "bool or str keys (override others with --config.KEY=VALUE)")
    try:
        return PARSERS[kind].parse(text)
    except ValueError as error:
        raise errors.UserError(f"--grid {key}={text}: config.{key} holds {kind.__name__} values (it is "
                               f"{config_path.get_value(key, config)!r}): {error}") from None


def parse_grid(config: ml_collections.ConfigDict, specs: Sequence[str]) -> tuple[Axis, ...]:
    """The `KEY=V1,V2,...` specs as axes, values parsed to the config's types; UserError for a bad key or value."""
    axes: list[Axis] = []
    for spec in specs:
        key, sep, rest = (part.strip() for part in spec.partition("="))
        texts = tuple(text.strip() for text in rest.split(","))
        if not sep or not key or not all(texts):
            raise errors.UserError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE...] with no empty value")
        if key in RESERVED_KEYS:
            raise errors.UserError(f"--grid {key}: config.{key} is not a grid key ({RESERVED_KEYS[key]})")
        if any(axis.key == key for axis in axes):
            raise errors.UserError(f"--grid {key}: given twice; list all its values in one --grid")
        values = tuple(parse_value(config, key, text) for text in texts)
        for i, value in enumerate(values):
            if value in values[:i]:
                raise errors.UserError(f"--grid {key}: {texts[i]!r} repeats {texts[values.index(value)]!r}")
        axes.append(Axis(key, texts, values))
    return tuple(axes)


def label(pairs: Sequence[tuple[str, Any]]) -> str:
    """'key=value,key=value' (a directory name: '/', ',', '=' and other unsafe characters of values %-escaped)."""
    return ",".join(f"{key}={urllib.parse.quote(str(value), safe='')}" for key, value in pairs)


def shares_reference(key: str) -> bool:
    """Whether grid key `key` leaves the SFT model (π_ref) unchanged, so runs varying it can share one."""
    return key.split(".")[0] in SHARED_REFERENCE_SECTIONS


def _configured(base: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    config = base.copy_and_resolve_references()
    for key, value in values.items():
        config_path.set_value(key, config, value)
    return config


def plan(base_config: ml_collections.ConfigDict, grid: Sequence[str], seeds: Sequence[int], workdir: str,
         sft_seed: int | None = None) -> Sweep:
    """Every combination of `grid` ('KEY=V1,V2' specs) × `seeds` as a run with its validated config and workdir,
    and the SFT references they share (mode sft_then_dpo). UserError naming the run, key and value of a bad one."""
    mode = base_config.mode
    if mode not in ("sft", "dpo", "sft_then_dpo"):
        raise errors.UserError(f"config.mode = {mode!r}: a sweep runs sft, dpo or sft_then_dpo runs")
    if base_config.dry_run:
        raise errors.UserError("config.dry_run = True: a sweep trains (dry-run its config with dpo_jax.main)")
    if not seeds:
        raise errors.UserError("--seeds: a sweep needs at least one seed")
    axes = parse_grid(base_config, grid)
    shared = mode == "sft_then_dpo"
    if shared and any(axis.key == "dpo.reference_workdir" for axis in axes):
        raise errors.UserError("--grid dpo.reference_workdir: with config.mode = 'sft_then_dpo' the sweep trains the "
                               "SFT reference; sweep SFT workdirs with config.mode = 'dpo'")
    references: dict[str, ml_collections.ConfigDict] = {}
    runs: list[Run] = []
    for combination in itertools.product(*(zip(axis.texts, axis.values) for axis in axes)):
        texts = tuple((axis.key, text) for axis, (text, _) in zip(axes, combination))
        values = {axis.key: value for axis, (_, value) in zip(axes, combination)}
        reference_texts = [(key, text) for key, text in texts if not shares_reference(key)]
        reference = os.path.join(workdir, "sft", *([label(reference_texts)] if reference_texts else []))
        if shared and reference not in references:
            sft = _configured(base_config, {key: values[key] for key, _ in reference_texts})
            sft.mode, sft.seed, sft.ref.cache = "sft", base_config.seed if sft_seed is None else sft_seed, ""
            references[reference] = sft
        for seed in seeds:
            config = _configured(base_config, values)
            config.seed = seed
            if shared:
                config.mode, config.dpo.reference_workdir = "dpo", reference
            if config.ref.cache:  # its key holds the data (seeded) and π_ref: one cache per seed and reference
                config.ref.cache = os.path.join(config.ref.cache, label([*reference_texts, ("seed", seed)]))
            name = label([*texts, ("seed", seed)])
            runs.append(Run(len(runs), name, texts, seed, config, os.path.join(workdir, "runs", name),
                            reference if shared else ""))
    for what, config in [*((f"SFT reference {w}", c) for w, c in references.items()),
                         *((f"run {r.index} ({r.name})", r.config) for r in runs)]:
        try:
            config_lib.validate(config)
        except errors.UserError as error:
            raise errors.UserError(f"{what}: {error}") from error
    return Sweep(workdir, axes, tuple(runs), references)


def read_summary(workdir: str) -> dict | None:
    """A run's summary.json, or None when absent or torn (run.py writes it in place, so a kill can cut it short)."""
    try:
        with open(os.path.join(workdir, SUMMARY_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status(workdir: str, config: ml_collections.ConfigDict) -> str:
    """'done' (summary.json of this config), 'stale' (of another config: a rerun resumes it), 'stopped' (by
    non-finite training), 'incomplete' (started), or 'not started'."""
    summary = read_summary(workdir)
    if summary is not None:
        return "stale" if config_lib.changed_keys(summary.get("config", {}), config.to_dict()) else "done"
    if os.path.exists(os.path.join(workdir, STOPPED_FILE)):
        return "stopped"
    return "incomplete" if os.path.isdir(workdir) else "not started"


def train_one(workdir: str, config: ml_collections.ConfigDict, what: str) -> float | None:
    """Train `config` in `workdir` unless it is done there, resuming what the workdir holds; its wall seconds, None
    when skipped."""
    state = status(workdir, config)
    if state == "done":
        print(f"{what}: done before, skipped ({workdir})", flush=True)
        return None
    if os.path.exists(os.path.join(workdir, STOPPED_FILE)):
        os.remove(os.path.join(workdir, STOPPED_FILE))
    print(f"{what}: {'starting' if state == 'not started' else 'resuming'} in {workdir}", flush=True)
    started = time.perf_counter()
    run_lib.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - started
    print(f"{what}: finished in {seconds:.1f} s", flush=True)
    return seconds


def train(sweep: Sweep, indices: Sequence[int] | None = None, references_only: bool = False) -> list[str]:
    """Train the runs at `indices` (default: all) in turn, after the SFT references they need; finished ones are
    skipped, others resumed. Returns the names of runs stopped by non-finite training (marked; the rest go on)."""
    if indices is not None and not all(0 <= i < len(sweep.runs) for i in indices):
        raise errors.UserError(f"--run_index={','.join(map(str, indices))}: the sweep has runs 0-{len(sweep.runs) - 1}")
    runs = sweep.runs if indices is None else [sweep.runs[i] for i in indices]
    for reference in dict.fromkeys(run.reference for run in runs if run.reference):
        train_one(reference, sweep.references[reference], "SFT reference")  # a stop here stops the sweep
    if references_only:
        return []
    stopped = []
    for run in runs:
        try:
            train_one(run.workdir, run.config, f"run {run.index} {run.name}")
        except errors.NonFiniteTraining as stop:
            stopped.append(run.name)
            print(f"run {run.index} {run.name}: stopped, the sweep goes on: {stop}", file=sys.stderr, flush=True)
            if run_lib.is_main_process():
                with open(os.path.join(run.workdir, STOPPED_FILE), "w") as f:
                    f.write(f"{stop}\n")
    return stopped


def summary_metrics(summary: dict) -> dict[str, float]:
    """summary.json's final metrics, flat: 'dpo/<name>' (the policy's on held-out pairs and samples), 'dpo_initial/…'
    (π_ref's), 'sft/…', and wall_time_seconds. (Its "samples" section repeats dpo's samples/ metrics.)"""
    metrics = {f"{section}/{name}": value
               for section in METRIC_SECTIONS for name, value in summary.get(section, {}).items()}
    metrics["wall_time_seconds"] = summary["wall_time_seconds"]
    return metrics


def result_row(run: Run) -> dict[str, Any]:
    """A run's results.csv row: index, name, grid values, seed, status, workdir, then its final metrics when done."""
    row = {"index": run.index, "name": run.name, **dict(run.values), "seed": run.seed,
           "status": status(run.workdir, run.config), "workdir": run.workdir}
    if row["status"] == "done":
        row.update(summary_metrics(read_summary(run.workdir)))
    return row


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """`rows` as CSV (columns in order of first appearance), written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f.name, path)


def final_stage(sweep: Sweep) -> str:
    """The stage whose metrics the plots show: 'sft' for a sweep of SFT runs, else 'dpo'."""
    return "sft" if sweep.runs and sweep.runs[0].config.mode == "sft" else "dpo"


def seed_statistics(rows: Sequence[dict[str, Any]], metric: str, values: dict[str, str]) -> tuple[float, float] | None:
    """(mean, sample standard deviation; 0 for one seed) of `metric` over the rows whose grid values include
    `values` (key → text as given), i.e. over seeds: a point of a plot and its error bar; None for no such row."""
    found = [row[metric] for row in rows if metric in row and all(row[k] == t for k, t in values.items())]
    if not found:
        return None
    return float(np.mean(found)), float(np.std(found, ddof=1)) if len(found) > 1 else 0.0


def plot_axis(sweep: Sweep, x_key: str | None) -> Axis:
    """The grid axis the plots' x axis shows: `x_key`'s, by default the last; UserError if it is no grid key."""
    if x_key is not None and all(axis.key != x_key for axis in sweep.axes):
        keys = ", ".join(axis.key for axis in sweep.axes) or "none"
        raise errors.UserError(f"--plot_x={x_key}: not a grid key (the grid keys: {keys})")
    if not sweep.axes:  # seeds of the base config alone: one point
        return Axis("", ("all",), ())
    return next((axis for axis in sweep.axes if axis.key == x_key), sweep.axes[-1])


def plot_results(sweep: Sweep, rows: Sequence[dict[str, Any]], x_key: str | None = None) -> list[str]:
    """A PNG per final-stage metric in WORKDIR/plots/: the mean over seeds with ± the sample standard deviation
    as error bars, against `x_key`'s values (default: the last grid key), a line per combination of the others."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch (as metrics_writer)

    x_axis = plot_axis(sweep, x_key)
    others = [axis for axis in sweep.axes if axis is not x_axis]
    numeric_x = bool(x_axis.values) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in x_axis.values)
    done = [row for row in rows if row["status"] == "done"]
    prefix = final_stage(sweep) + "/"
    metrics = sorted({key for row in done for key in row if key.startswith(prefix)})
    num_seeds = len({run.seed for run in sweep.runs})
    os.makedirs(os.path.join(sweep.workdir, PLOTS_DIRECTORY), exist_ok=True)
    paths = []
    for metric in metrics:
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.subplots()
        series = list(itertools.product(*([(a.key, t) for t in a.texts] for a in others)))
        for j, pairs in enumerate(series):
            points = []
            for x, x_text in enumerate(x_axis.texts):
                point = seed_statistics(done, metric, dict(pairs, **({x_axis.key: x_text} if x_axis.key else {})))
                if point is not None:
                    points.append((x + 0.06 * (j - (len(series) - 1) / 2), *point))
            if points:
                xs, means, stds = zip(*points)
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, linestyle="-" if numeric_x else "none",
                            label=", ".join(f"{k}={t}" for k, t in pairs) or None)
        ax.set_xticks(range(len(x_axis.texts)), x_axis.texts)
        ax.set_xlabel(x_axis.key or "the base config")
        ax.set_ylabel(metric, fontsize=8)
        ax.set_title(f"{metric}: mean ± std over {num_seeds} seed{'s' * (num_seeds > 1)}", fontsize=9)
        if len(series) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(sweep.workdir, PLOTS_DIRECTORY, metric.replace("/", "_") + ".png")
        fig.savefig(path, dpi=90)
        paths.append(path)
    return paths


def collect(sweep: Sweep, x_key: str | None = None) -> list[dict[str, Any]]:
    """Write WORKDIR/results.csv (a row per run, in run order) and the plots of the finished runs; return the rows."""
    rows = [result_row(run) for run in sweep.runs]
    os.makedirs(sweep.workdir, exist_ok=True)
    write_csv(rows, os.path.join(sweep.workdir, RESULTS_FILE))
    plot_results(sweep, rows, x_key)
    return rows


def run_sweep(base_config: ml_collections.ConfigDict, grid: Sequence[str], seeds: Sequence[int], workdir: str, *,
              sft_seed: int | None = None, x_key: str | None = None) -> list[dict[str, Any]]:
    """Plan, train every run in turn (skipping finished ones, resuming the others) and collect the results; returns
    the results.csv rows. Raises NonFiniteTraining after collecting if any run stopped on non-finite training."""
    sweep = plan(base_config, grid, seeds, workdir, sft_seed)
    plot_axis(sweep, x_key)  # a bad --plot_x fails now, not after training
    stopped = train(sweep)
    rows = collect(sweep, x_key) if run_lib.is_main_process() else [result_row(run) for run in sweep.runs]
    if stopped:
        raise errors.NonFiniteTraining(f"{len(stopped)} of {len(sweep.runs)} runs stopped on non-finite training "
                                       f"({', '.join(stopped)}); results of the others are in {workdir}")
    return rows


def describe(sweep: Sweep) -> str:
    """What --list prints: each SFT reference and run with its status (runs with their index)."""
    lines = [f"{len(sweep.runs)} runs in {os.path.join(sweep.workdir, 'runs')}, "
             f"{len(sweep.references)} SFT reference(s)"]
    lines += [f"sft  {status(w, c):12s} {w}" for w, c in sweep.references.items()]
    lines += [f"{run.index:<4d} {status(run.workdir, run.config):12s} {run.name}" for run in sweep.runs]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """python -m experiments.sweep (see the module docstring)."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    if FLAGS["verbosity"].using_default_value:  # a line per run here; --verbosity=0 adds the trainer's INFO logs
        logging.set_verbosity(logging.WARNING)
    try:
        actions = [FLAGS.list, FLAGS.collect, FLAGS.sft_only, bool(FLAGS.run_index)]
        if sum(actions) > 1:
            raise errors.UserError("--list, --collect, --sft_only and --run_index: one at a time")
        args = (FLAGS.config, FLAGS.grid, range(FLAGS.seeds), FLAGS.workdir)
        if not any(actions):
            rows = run_sweep(*args, sft_seed=FLAGS.sft_seed, x_key=FLAGS.plot_x)
            print(f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs done: "
                  f"{os.path.join(FLAGS.workdir, RESULTS_FILE)}, {os.path.join(FLAGS.workdir, PLOTS_DIRECTORY)}/")
            return
        sweep = plan(*args, FLAGS.sft_seed)
        if FLAGS.list:
            print(describe(sweep))
        elif FLAGS.collect:
            rows = collect(sweep, FLAGS.plot_x)
            print(f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs done: "
                  f"{os.path.join(FLAGS.workdir, RESULTS_FILE)}")
        else:
            with errors.user_errors("--run_index"):
                indices = [int(i) for i in FLAGS.run_index] if FLAGS.run_index else None
            stopped = train(sweep, indices, references_only=FLAGS.sft_only)
            if stopped:
                raise errors.NonFiniteTraining(f"stopped on non-finite training: {', '.join(stopped)}")
    except errors.RunStopped as stop:
        if FLAGS.verbose:
            traceback.print_exc()
        print(f"{'error' if isinstance(stop, errors.UserError) else 'stopped'}: {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)


def define_flags() -> None:
    """Define the command-line flags of `python -m experiments.sweep` (importing this module defines none)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "The base config file (a get_config()); --config.KEY=VALUE "
                                    "overrides apply to every run.")
    flags.DEFINE_string("workdir", None, "The sweep's directory: runs/, sft/, results.csv, plots/.")
    flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a config key and its values (repeat for a product).")
    flags.DEFINE_integer("seeds", 1, "Runs each combination with config.seed = 0 .. seeds-1.", lower_bound=1)
    flags.DEFINE_integer("sft_seed", None, "Seed of the shared SFT reference (default: the config's seed).")
    flags.DEFINE_string("plot_x", None, "The grid key on the plots' x axis (default: the last --grid key).")
    flags.DEFINE_bool("list", False, "Print each run's index, status and name, and exit.")
    flags.DEFINE_bool("sft_only", False, "Train only the SFT reference(s) (before launching runs as separate jobs).")
    flags.DEFINE_list("run_index", [], "Train only these runs (indices from --list), e.g. one per job.")
    flags.DEFINE_bool("collect", False, "Only write results.csv and the plots from the runs' workdirs.")
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error or a stop.")
    flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
