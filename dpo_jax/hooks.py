"""What hangs on the training loop, each piece with its own interval: non-finite step checks, preemption, held-out
evaluation (and samples), metrics logging and checkpointing.

The loop (run.train_stage) only steps and calls `Hooks.run(info)` after each step; a hook is a function of
`StepInfo`, registered with `Hooks.add(fn, every=N)` and called at every N-th step and at the stage's last step
(checkpointing also at a step where a stop was requested), in the order added, as levanter's `add_hook` and
nanodo's periodic actions do. The time of the interval hooks (evaluation, logging, saving) is kept out of the
logged throughput; the every-step checks wait on the device, whose time is the training's.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
from absl import logging

from dpo_jax import checkpoint, data, sharding
from dpo_jax.errors import NonFiniteTraining
from dpo_jax.guards import PreemptionSignals
from dpo_jax.metrics_writer import MetricsWriter, NullWriter

Metrics = dict[str, float]


@dataclasses.dataclass
class StepInfo:
    """What the hooks see after a step: its number (steps done), the new state and its metrics (device arrays)."""

    stage: str
    step: int
    num_steps: int
    state: Any
    metrics: dict[str, jax.Array]
    stop_requested: bool = False  # a preemption signal reached every process during this step
    logs: Metrics = dataclasses.field(default_factory=dict)  # what earlier hooks add to this step's logged line
    overhead_seconds: float = 0.0  # time spent so far in this stage's overhead hooks (kept out of the throughput)

    @property
    def last(self) -> bool:
        """Whether this is the stage's final step."""
        return self.step == self.num_steps


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int
    on_stop: bool  # also due at a step where a stop was requested
    overhead: bool  # its time is kept out of the throughput


class Hooks:
    """An ordered list of hooks with intervals; `run` calls the due ones and times the overhead ones."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []
        self.overhead_seconds = 0.0

    def add(self, fn: Callable[[StepInfo], None], every: int = 1, on_stop: bool = False,
            overhead: bool = True) -> None:
        """Call `fn(info)` at every `every`-th step, at the last step, and (`on_stop`) when a stop is requested;
        `overhead=False` for a check whose time is the device's (it waits on a step), not the hook's."""
        self._hooks.append(Hook(fn, every, on_stop, overhead))

    def run(self, info: StepInfo) -> None:
        """Call each due hook in order. Before the first overhead hook the step is waited for, so that its time is
        the training's, not the hook's."""
        waited = False
        for hook in self._hooks:
            if not (info.step % hook.every == 0 or info.last or (hook.on_stop and info.stop_requested)):
                continue
            if hook.overhead and not waited:
                jax.block_until_ready(info.metrics)
                waited = True
            info.overhead_seconds = self.overhead_seconds
            started = time.perf_counter()
            hook.fn(info)
            if hook.overhead:
                self.overhead_seconds += time.perf_counter() - started


class NonFiniteSteps:
    """Counts the steps the train step skipped for a non-finite loss or gradient, reading each step's flag only
    once the device has moved on (so the host never waits), and stops the run after `limit` in a row."""

    def __init__(self, stage: str, limit: int, total: int = 0):
        self.stage, self.limit, self.total = stage, limit, total
        self.in_a_row = 0
        self._unread: list[tuple[int, jax.Array]] = []

    def __call__(self, info: StepInfo) -> None:
        """The every-step hook: record this step's flag, read the earlier ones (the device is busy with this one)."""
        self.add(info.step, info.metrics["skipped"])
        self.settle(keep_latest=True)

    def add(self, step: int, skipped: jax.Array) -> None:
        """Record step `step`'s `skipped` flag (a device scalar) for a later `settle`."""
        self._unread.append((step, skipped))

    def settle(self, keep_latest: bool = False) -> None:
        """Read the recorded flags (all but the newest with `keep_latest`); log skips; raise past the limit."""
        ready = self._unread[:-1] if keep_latest else self._unread
        self._unread = self._unread[len(ready):]
        for step, flag in zip([s for s, _ in ready], jax.device_get([f for _, f in ready])):
            if not flag:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.total += 1
            logging.warning("%s step %d: loss or gradient not finite; the step was skipped (params and optimizer "
                            "state unchanged), %d in a row", self.stage, step, self.in_a_row)
            if self.in_a_row >= self.limit:
                raise NonFiniteTraining(
                    f"{self.stage}: {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}) had a "
                    f"non-finite loss or gradient (train.max_nonfinite_steps = {self.limit}); stopping. No "
                    "checkpoint was written during them: lower the learning rate and rerun to resume from the last"
                )


def evaluate_pairs(
    eval_step: Callable, params: Any, ref_params: Any, examples: data.Examples, batch_size: int, buckets, pad_id: int,
    layout: data.Layout, mesh: jax.sharding.Mesh, loss_state: Any = None,
) -> Metrics:
    """Metrics over every held-out example exactly once (padding rows carry weight 0); `loss_state`: the train
    state's running means, read by a loss that keeps them."""
    totals: Metrics = {}
    weight_total = 0.0
    for batch in data.eval_batches(examples, batch_size, buckets, pad_id, layout):
        metrics, weight = jax.device_get(eval_step(params, ref_params, sharding.whole_batch(batch, mesh), loss_state))
        weight_total += float(weight)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * float(weight)
    return {name: total / weight_total for name, total in totals.items()}


class Evaluation:
    """The evaluation hook: `evaluate(state, step)` gives the held-out metrics of the train state (and sample
    metrics, the samples written); the hook adds them to the step's logged line as `eval/...` and keeps the latest."""

    def __init__(self, evaluate: Callable[[Any, int], Metrics]):
        self.evaluate = evaluate
        self.latest: Metrics = {}

    def __call__(self, info: StepInfo) -> None:
        self.latest = self.evaluate(info.state, info.step)
        info.logs.update({f"eval/{name}": value for name, value in self.latest.items()})


class MetricsLogger:
    """The logging hook: the step's metrics, the throughput since the last logged step (hook time left out), the
    skipped-step count and what earlier hooks added, written as one line of metrics.jsonl and on the progress bar."""

    def __init__(self, writer: MetricsWriter | NullWriter, batch_size: int, nonfinite: NonFiniteSteps, progress: Any,
                 first_step: int):
        self.writer, self.batch_size, self.nonfinite, self.progress = writer, batch_size, nonfinite, progress
        self._last_step, self._last_time = first_step, time.perf_counter()

    def __call__(self, info: StepInfo) -> None:
        self.nonfinite.settle()
        host = {name: float(value) for name, value in jax.device_get(info.metrics).items()}
        now = time.perf_counter() - info.overhead_seconds
        host["examples_per_second"] = (info.step - self._last_step) * self.batch_size / (now - self._last_time)
        host["skipped_steps"] = float(self.nonfinite.total)
        host.update(info.logs)
        self.writer.write(info.stage, info.step, host)
        self.progress.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['rewards/accuracies']:.2f}",
                                  margin=f"{host['rewards/margins']:.3f}")
        self._last_step, self._last_time = info.step, now


class Checkpointer:
    """The checkpointing hook: saves the train state with `meta(step)` (data position, config, ...), except at a
    step that was skipped as non-finite (its params are an earlier step's, its data position is not)."""

    def __init__(self, checkpoints: checkpoint.StageCheckpoints, nonfinite: NonFiniteSteps,
                 meta: Callable[[int], dict]):
        self.checkpoints, self.nonfinite, self.meta = checkpoints, nonfinite, meta

    def __call__(self, info: StepInfo) -> None:
        self.nonfinite.settle()
        if self.nonfinite.in_a_row:
            logging.warning("%s step %d: not saved, its step was skipped as non-finite", info.stage, info.step)
        else:
            self.checkpoints.save(info.step, info.state, self.meta(info.step))


class Preemption:
    """Preemption in two hooks around the others: `check` (first) marks the step at which every process agreed to
    stop, so the checkpointer saves it; `stop` (last) waits for the save and ends the run with Preempted."""

    def __init__(self, signals: PreemptionSignals, checkpoints: checkpoint.StageCheckpoints,
                 writer: MetricsWriter | NullWriter):
        self.signals, self.checkpoints, self.writer = signals, checkpoints, writer

    def check(self, info: StepInfo) -> None:
        """Every step, once: a signal that arrives while the hooks run stops at the next step."""
        self.checkpoints.poll()
        info.stop_requested = self.signals.should_stop(info.stage, info.step)

    def stop(self, info: StepInfo) -> None:
        """After the save: raise Preempted if a stop was requested at this step."""
        if info.stop_requested:
            self.checkpoints.wait()
            self.writer.flush()
            self.signals.stop(f"{info.stage} step {info.step} (resumes from {info.stage} step "
                              f"{self.checkpoints.latest_step()})")
