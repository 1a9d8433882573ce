"""Where metrics go: `metrics.jsonl` (one object per logged step), TensorBoard, and a PNG of the curves."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
PLOTTED_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm")


class MetricsWriter:
    """Appends `{"stage", "step", **metrics}` lines to `<workdir>/metrics.jsonl` and TensorBoard scalars."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def forget_after(self, stage: str, step: int) -> None:
        """Drop lines of `stage` logged after `step`: a resumed run re-logs them from its checkpoint."""
        if not os.path.exists(self.path):
            return
        records = read_metrics(self.workdir)
        kept = [r for r in records if not (r["stage"] == stage and r["step"] > step)]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Record one logged step of `stage`."""
        record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"{stage}/{name}", float(value), int(step))

    def close(self) -> None:
        self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(workdir: str) -> str:
    """Draw train/eval curves of each stage from metrics.jsonl into `<workdir>/training_curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig, axes = plt.subplots(
        len(stages), len(PLOTTED_METRICS), figsize=(3.2 * len(PLOTTED_METRICS), 2.6 * len(stages)), squeeze=False
    )
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
    plt.close(fig)
    return path
