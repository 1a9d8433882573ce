"""Where metrics go: `metrics.jsonl` (one object per logged step), TensorBoard, samples, and a PNG of the curves.

metrics.jsonl is the record; TensorBoard (one run per stage, `tensorboard/<stage>/`) is rebuilt from it whenever
a stage (re)starts, so after any kill and resume both hold each (stage, step) exactly once. Samples drawn at an
evaluation go to `samples/<stage>/step_<N>.jsonl` (`samples/dpo/step_0.jsonl` is π_ref's: DPO starts from it) and
to TensorBoard as text, rebuilt from those files in the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIRECTORY = "tensorboard"
PLOT_FILE = "training_curves.png"
SAMPLES_DIRECTORY = "samples"
SAMPLES_SHOWN = 8  # samples per evaluation shown as TensorBoard text (the files hold them all)
PLOTTED_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm")


class MetricsWriter:
    """Appends `{"stage", "step", **metrics}` lines to `<workdir>/metrics.jsonl`, and scalars to TensorBoard."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self._boards: dict[str, SummaryWriter] = {}

    def truncate(self, stage: str, step: int) -> None:
        """Keep `stage`'s records up to `step` (and every other stage's), and rebuild its TensorBoard run from them:
        a resumed stage logs again what a killed run logged after the checkpoint it resumes from."""
        records = read_metrics(self.workdir) if os.path.exists(self.path) else []
        kept = [r for r in records if not (r["stage"] == stage and r["step"] > step)]
        partial = self.path + ".tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(partial, self.path)  # atomic: a kill leaves the old file or the new one, never half of one
        if stage in self._boards:
            self._boards.pop(stage).close()
        shutil.rmtree(os.path.join(self.workdir, TENSORBOARD_DIRECTORY, stage), ignore_errors=True)
        for record in kept:
            if record["stage"] == stage:
                self._add_scalars(stage, record["step"], record)
        for sample_step, path in stage_sample_files(self.workdir, stage):
            if sample_step > step:
                os.remove(path)
            else:
                with open(path) as f:
                    self._add_text(stage, sample_step, [json.loads(line) for line in f])
        self.flush()

    def write_samples(self, stage: str, step: int, records: list[dict]) -> str:
        """Write one evaluation's samples (a JSON object per sample) to `samples/<stage>/step_<step>.jsonl` and the
        first few to TensorBoard as text; returns the file's path."""
        path = sample_file(self.workdir, stage, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shown = os.path.exists(path)  # rewritten by a resumed run: TensorBoard holds it already (see truncate)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
        if not shown:
            self._add_text(stage, step, records)
        return path

    def _add_text(self, stage: str, step: int, records: list[dict]) -> None:
        if stage not in self._boards:
            self._boards[stage] = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIRECTORY, stage))
        columns = [c for c in ("prompt", "completion", "reward", "kl") if records and c in records[0]]
        rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for record in records[:SAMPLES_SHOWN]:
            cells = (f"{record[c]:.3f}" if isinstance(record[c], float) else str(record[c]).replace("|", "\\|")
                     for c in columns)
            rows.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
        self._boards[stage].add_text("samples", "\n".join(rows), step)

    def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Record one logged step of `stage`."""
        record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._add_scalars(stage, int(step), record)

    def _add_scalars(self, stage: str, step: int, record: Mapping) -> None:
        if stage not in self._boards:
            self._boards[stage] = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIRECTORY, stage))
        for name, value in record.items():
            if name not in ("stage", "step"):
                self._boards[stage].add_scalar(name, float(value), step)

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (metrics.jsonl is written line by line)."""
        for board in self._boards.values():
            board.flush()

    def close(self) -> None:
        for board in self._boards.values():
            board.close()
        self._boards.clear()


def sample_file(workdir: str, stage: str, step: int) -> str:
    """Where the samples of `stage`'s evaluation at `step` are written."""
    return os.path.join(workdir, SAMPLES_DIRECTORY, stage, f"step_{step}.jsonl")


def stage_sample_files(workdir: str, stage: str) -> list[tuple[int, str]]:
    """(step, path) of every samples file of `stage`, by step."""
    directory = os.path.join(workdir, SAMPLES_DIRECTORY, stage)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = [(int(n[len("step_"):-len(".jsonl")]), os.path.join(directory, n)) for n in names
             if n.startswith("step_") and n.endswith(".jsonl") and n[len("step_"):-len(".jsonl")].isdigit()]
    return sorted(found)


class NullWriter:
    """What processes other than 0 of a multi-host run write: nothing (process 0 writes the one metrics file)."""

    def truncate(self, stage: str, step: int) -> None:
        """Nothing to truncate."""

    def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Drop the record."""

    def write_samples(self, stage: str, step: int, records: list[dict]) -> None:
        """Drop the samples."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl`, in order; a line that does not parse (the torn last line a killed
    write or a full disk leaves) is dropped with a warning."""
    records = []
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            where = "its torn last line" if number == len(lines) else f"unreadable line {number}"
            logging.warning("%s: dropped %s: %r", os.path.join(workdir, METRICS_FILE), where, line[:80])
    return records


def plot_training_curves(workdir: str) -> str:
    """Draw train/eval curves of each stage from metrics.jsonl into `<workdir>/training_curves.png`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep theirs

    records = read_metrics(workdir)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig = Figure(figsize=(3.2 * len(PLOTTED_METRICS), 2.6 * len(stages)))
    axes = fig.subplots(len(stages), len(PLOTTED_METRICS), squeeze=False)
    for row, stage in enumerate(stages):
        for col, name in enumerate(PLOTTED_METRICS):
            ax = axes[row, col]
            for prefix, style in (("", "-"), ("eval/", "o--")):
                points = [(r["step"], r[prefix + name]) for r in records if r["stage"] == stage and prefix + name in r]
                if points:
                    steps, values = np.array(points).T
                    ax.plot(steps, values, style, label=prefix.rstrip("/") or "train", markersize=3)
            ax.set_title(f"{stage}: {name}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(workdir, PLOT_FILE)
    fig.savefig(path, dpi=90)
    return path
