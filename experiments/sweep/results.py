"""A sweep's results: results.csv (a row per run with its final metrics) and a plot per final-stage metric, the mean
over seeds with ± their sample standard deviation as error bars."""

from __future__ import annotations

import csv
import itertools
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from dpo_jax import errors
from experiments.sweep.execution import read_summary, status
from experiments.sweep.grid import Axis, PlannedRun, Sweep

METRIC_SECTIONS = ("sft", "dpo_initial", "dpo")  # summary.json's final held-out metrics of each stage
RESULTS_FILE, PLOTS_DIRECTORY, TABLE_FILE = "results.csv", "plots", "results.md"
# The columns of results.md, where the runs have them: held-out reward accuracy and margin, samples' reward and KL.
TABLE_METRICS = ("rewards/accuracies", "rewards/margins", "samples/reward", "samples/kl")


def summary_metrics(summary: dict) -> dict[str, float]:
    """summary.json's final metrics, flat: 'dpo/<name>' (the policy's on held-out pairs and samples), 'dpo_initial/…'
    (π_ref's), 'sft/…', and wall_time_seconds. (Its "samples" section repeats dpo's samples/ metrics.)"""
    metrics = {f"{section}/{name}": value
               for section in METRIC_SECTIONS for name, value in summary.get(section, {}).items()}
    metrics["wall_time_seconds"] = summary["wall_time_seconds"]
    return metrics


def result_row(run: PlannedRun) -> dict[str, Any]:
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


def markdown_table(sweep: Sweep, rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with a row per grid combination (in grid order) and, for each of TABLE_METRICS the final
    stage has, its mean ± sample standard deviation over the finished seeds, with the number of seeds."""
    done = [row for row in rows if row["status"] == "done"]
    prefix = final_stage(sweep) + "/"
    metrics = [m for m in TABLE_METRICS if any(prefix + m in row for row in done)]
    keys = [axis.key for axis in sweep.axes]
    lines = ["| " + " | ".join(keys + metrics + ["seeds"]) + " |", "|" + "---|" * (len(keys) + len(metrics) + 1)]
    for texts in itertools.product(*(axis.texts for axis in sweep.axes)):
        values = dict(zip(keys, texts))
        cells = [f"`{t}`" for t in texts]
        for metric in metrics:
            point = seed_statistics(done, prefix + metric, values)
            cells.append("–" if point is None else f"{point[0]:.3f} ± {point[1]:.3f}")
        cells.append(str(sum(all(row.get(k) == t for k, t in values.items()) for row in done)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def collect(sweep: Sweep, x_key: str | None = None) -> list[dict[str, Any]]:
    """Write WORKDIR/results.csv (a row per run, in run order), results.md (mean ± std over seeds of each grid
    combination) and the plots of the finished runs; return the rows."""
    rows = [result_row(run) for run in sweep.runs]
    os.makedirs(sweep.workdir, exist_ok=True)
    write_csv(rows, os.path.join(sweep.workdir, RESULTS_FILE))
    with open(os.path.join(sweep.workdir, TABLE_FILE), "w") as f:
        f.write(markdown_table(sweep, rows))
    plot_results(sweep, rows, x_key)
    return rows
