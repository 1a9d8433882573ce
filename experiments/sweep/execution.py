"""Training a planned sweep: each run's status from its workdir, one run (skipped when done, else resumed), and
all of them in turn after the SFT references they need."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

import ml_collections

from dpo_jax import config as config_lib
from dpo_jax import errors, sharding
from dpo_jax import run as run_lib
from experiments.sweep.grid import Sweep

SUMMARY_FILE = "summary.json"
STOPPED_FILE = "sweep_stopped.txt"  # in a run's workdir: why non-finite training stopped it


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


def describe(sweep: Sweep) -> str:
    """What --list prints: each SFT reference and run with its status (runs with their index)."""
    lines = [f"{len(sweep.runs)} runs in {os.path.join(sweep.workdir, 'runs')}, "
             f"{len(sweep.references)} SFT reference(s)"]
    lines += [f"sft  {status(w, c):12s} {w}" for w, c in sweep.references.items()]
    lines += [f"{run.index:<4d} {status(run.workdir, run.config):12s} {run.name}" for run in sweep.runs]
    return "\n".join(lines)


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
            if sharding.is_main_process():
                with open(os.path.join(run.workdir, STOPPED_FILE), "w") as f:
                    f.write(f"{stop}\n")
    return stopped
