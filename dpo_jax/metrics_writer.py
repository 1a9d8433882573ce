"""Where metrics go: `metrics.jsonl` (one object per logged step), the tracking backends written from it
(TensorBoard, Weights & Biases), samples, and a PNG of the curves.

metrics.jsonl is the record every backend is written from. TensorBoard (one run per stage, `tensorboard/<stage>/`)
is rebuilt from it whenever a stage (re)starts, so after any kill and resume both hold each (stage, step) exactly
once. Weights & Biases cannot take back what it was sent, so its backend keeps (in `wandb_run.json`, beside the
run's files) the run id and the last step of each stage it sent, marked before each send: a resumed run continues
the same W&B run, sends the records metrics.jsonl holds beyond that mark, and never sends a step twice. Samples drawn
at an evaluation go to `samples/<stage>/step_<N>.jsonl` (`samples/dpo/step_0.jsonl` is π_ref's: DPO starts from
it), to TensorBoard as text and to W&B as a table, replayed from those files in the same way. Only process 0 writes
(the others hold a NullWriter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
from typing import Any, Mapping

import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

from dpo_jax.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIRECTORY = "tensorboard"
WANDB_STATE_FILE = "wandb_run.json"  # the W&B run id and what was sent of each stage
PLOT_FILE = "training_curves.png"
SAMPLES_DIRECTORY = "samples"
SAMPLES_SHOWN = 8  # samples per evaluation shown as TensorBoard text (the files hold them all)
SAMPLE_COLUMNS = ("prompt", "completion", "reward", "kl")
PLOTTED_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm")
LOGGERS = ("tensorboard", "wandb")  # train.loggers: the tracking backends beside metrics.jsonl


class MissingTracker(UserError, ImportError):
    """A tracking backend was asked for whose package is not installed."""


def check_loggers(loggers) -> None:
    """ValueError unless `loggers` is a tuple/list of distinct names of LOGGERS; MissingTracker when one's package
    is absent."""
    if not isinstance(loggers, (tuple, list)) or not all(isinstance(name, str) for name in loggers):
        raise ValueError(f"expected a tuple of names among {', '.join(LOGGERS)}, got {loggers!r}")
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown or len(set(loggers)) != len(loggers):
        raise ValueError(f"expected distinct names among {', '.join(LOGGERS)}, got {tuple(loggers)!r}")
    if "wandb" in loggers and importlib.util.find_spec("wandb") is None:
        raise MissingTracker("train.loggers includes 'wandb' but the wandb package is not installed: "
                             "pip install 'dpo_jax[wandb]' (or pip install wandb)")


class TensorBoardLogger:
    """Scalars and sample tables of each stage in `<workdir>/tensorboard/<stage>/`, rebuilt on (re)start."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._boards: dict[str, SummaryWriter] = {}

    def _board(self, stage: str) -> SummaryWriter:
        if stage not in self._boards:
            self._boards[stage] = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIRECTORY, stage))
        return self._boards[stage]

    def replay(self, stage: str, records: list[dict], samples: list[tuple[int, list[dict]]]) -> None:
        """Rebuild `stage`'s run from its kept records and samples (what a killed run wrote after them is gone)."""
        if stage in self._boards:
            self._boards.pop(stage).close()
        shutil.rmtree(os.path.join(self.workdir, TENSORBOARD_DIRECTORY, stage), ignore_errors=True)
        for record in records:
            self.scalars(stage, record["step"], record)
        for step, rows in samples:
            self.samples(stage, step, rows, rewritten=False)

    def scalars(self, stage: str, step: int, record: Mapping) -> None:
        """One logged step's scalars."""
        for name, value in record.items():
            if name not in ("stage", "step"):
                self._board(stage).add_scalar(name, float(value), step)

    def samples(self, stage: str, step: int, records: list[dict], rewritten: bool) -> None:
        """The first few samples as a markdown table (not again for a file a resumed run rewrote: replay has it)."""
        if rewritten:
            return
        columns = [c for c in SAMPLE_COLUMNS if records and c in records[0]]
        rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for record in records[:SAMPLES_SHOWN]:
            cells = (f"{record[c]:.3f}" if isinstance(record[c], float) else str(record[c]).replace("|", "\\|")
                     for c in columns)
            rows.append("| " + " | ".join(cell.replace("\n", " ") for cell in cells) + " |")
        self._board(stage).add_text("samples", "\n".join(rows), step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        for board in self._boards.values():
            board.flush()

    def close(self) -> None:
        """Close every stage's event file."""
        for board in self._boards.values():
            board.close()
        self._boards.clear()


class WandbLogger:
    """One Weights & Biases run per workdir (resumed by its stored id), the config as its config; each stage's
    metrics as `<stage>/<name>` against the `<stage>/step` axis, its samples as a `<stage>/samples` table."""

    def __init__(self, workdir: str, run_config: Mapping | None = None, project: str = "", entity: str = ""):
        check_loggers(("wandb",))
        import wandb  # an optional extra: only its users import it

        self.path = os.path.join(workdir, WANDB_STATE_FILE)
        self.state = {"id": "", "step": 0, "sent": {}, "samples": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.state.update(json.load(f))
        self.state["id"] = self.state["id"] or secrets.token_hex(4)  # W&B ids: 8 lowercase alphanumerics
        self._save()
        self._wandb = wandb
        self.run = wandb.init(project=project or "dpo_jax", entity=entity or None, id=self.state["id"],
                              resume="allow", dir=workdir, config=dict(run_config or {}),
                              name=os.path.basename(os.path.abspath(workdir)))
        for stage in ("sft", "dpo"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    @property
    def run_id(self) -> str:
        """The W&B run id (stored with each checkpoint, and in wandb_run.json)."""
        return self.state["id"]

    def _save(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.state, f)
        os.replace(self.path + ".tmp", self.path)

    def _send(self, kind: str, stage: str, step: int, data: dict) -> None:
        """Send `data` once: marked as sent (and the W&B step advanced) before the send, so a kill in between
        loses the point rather than sending it twice."""
        if step <= self.state[kind].get(stage, -1):
            return
        self.state[kind][stage] = step
        self.state["step"] += 1
        self._save()
        self.run.log({**data, f"{stage}/step": step}, step=self.state["step"])

    def replay(self, stage: str, records: list[dict], samples: list[tuple[int, list[dict]]]) -> None:
        """Send what metrics.jsonl and the sample files hold beyond what this run sent (nothing, usually)."""
        for step, rows in samples:
            self.samples(stage, step, rows, rewritten=False)
        for record in records:
            self.scalars(stage, record["step"], record)

    def scalars(self, stage: str, step: int, record: Mapping) -> None:
        """One logged step's scalars, unless this stage's step was sent already."""
        self._send("sent", stage, step, {f"{stage}/{k}": float(v) for k, v in record.items()
                                         if k not in ("stage", "step")})

    def samples(self, stage: str, step: int, records: list[dict], rewritten: bool) -> None:
        """One evaluation's samples as a table, unless sent already."""
        columns = [c for c in SAMPLE_COLUMNS if records and c in records[0]]
        table = self._wandb.Table(columns=["step", *columns], data=[[step, *(r[c] for c in columns)] for r in records])
        self._send("samples", stage, step, {f"{stage}/samples": table})

    def flush(self) -> None:
        """W&B writes in its own process; nothing to push."""

    def close(self) -> None:
        """Finish the run (its files complete; online, the upload)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


class MetricsWriter:
    """Appends `{"stage", "step", **metrics}` lines to `<workdir>/metrics.jsonl`, and writes each to the tracking
    backends named in `loggers` (see LOGGERS); `run_config` becomes the W&B run's config."""

    def __init__(self, workdir: str, loggers=("tensorboard",), run_config: Mapping | None = None,
                 wandb_project: str = "", wandb_entity: str = ""):
        check_loggers(loggers)
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.path = os.path.join(workdir, METRICS_FILE)
        self.backends: list[Any] = []
        for name in loggers:
            self.backends.append(TensorBoardLogger(workdir) if name == "tensorboard"
                                 else WandbLogger(workdir, run_config, wandb_project, wandb_entity))

    def tracking(self) -> dict[str, str]:
        """What a checkpoint records of the trackers: the W&B run id when there is one."""
        return {"wandb_run_id": b.run_id for b in self.backends if isinstance(b, WandbLogger)}

    def truncate(self, stage: str, step: int) -> None:
        """Keep `stage`'s records up to `step` (and every other stage's), and replay them to each backend: a resumed
        stage logs again what a killed run logged after the checkpoint it resumes from."""
        records = read_metrics(self.workdir) if os.path.exists(self.path) else []
        kept = [r for r in records if not (r["stage"] == stage and r["step"] > step)]
        partial = self.path + ".tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(partial, self.path)  # atomic: a kill leaves the old file or the new one, never half of one
        samples = []
        for sample_step, path in stage_sample_files(self.workdir, stage):
            if sample_step > step:
                os.remove(path)
            else:
                with open(path) as f:
                    samples.append((sample_step, [json.loads(line) for line in f]))
        for backend in self.backends:
            backend.replay(stage, [r for r in kept if r["stage"] == stage], samples)
        self.flush()

    def write_samples(self, stage: str, step: int, records: list[dict]) -> str:
        """Write one evaluation's samples (a JSON object per sample) to `samples/<stage>/step_<step>.jsonl` and to
        the backends; returns the file's path."""
        path = sample_file(self.workdir, stage, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rewritten = os.path.exists(path)  # by a resumed run: replayed already (see truncate)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
        for backend in self.backends:
            backend.samples(stage, step, records, rewritten)
        return path

    def write(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        """Record one logged step of `stage`: a line of metrics.jsonl, then each backend."""
        record = {"stage": stage, "step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for backend in self.backends:
            backend.scalars(stage, int(step), record)

    def flush(self) -> None:
        """Push buffered backend events to disk (metrics.jsonl is written line by line)."""
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        """Close every backend (a W&B run is finished)."""
        for backend in self.backends:
            backend.close()


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

    def tracking(self) -> dict[str, str]:
        """Nothing: process 0's checkpoint meta names the trackers."""
        return {}

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
