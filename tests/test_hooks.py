"""The loop's hooks: when each is due, and a throughput that leaves the hooks' own time out."""

from __future__ import annotations

import time

import jax.numpy as jnp
import pytest

from dpo_jax.errors import NonFiniteTraining
from dpo_jax.hooks import Hooks, MetricsLogger, NonFiniteSteps, StepInfo


class _Writer:
    def __init__(self):
        self.lines = []

    def write(self, stage, step, metrics):
        self.lines.append((step, dict(metrics)))


class _Bar:
    def set_postfix(self, **_):
        pass


def _metrics(skipped: float = 0.0) -> dict:
    return {"loss": jnp.float32(0.5), "rewards/accuracies": jnp.float32(1.0), "rewards/margins": jnp.float32(0.1),
            "skipped": jnp.float32(skipped)}


def test_each_hook_runs_at_its_interval_at_the_last_step_and_on_a_requested_stop():
    calls = {"every": [], "saves": []}
    hooks = Hooks()
    hooks.add(lambda info: calls["every"].append(info.step), every=3)
    hooks.add(lambda info: calls["saves"].append(info.step), every=4, on_stop=True)
    for step in range(1, 8):
        hooks.run(StepInfo("dpo", step, 7, state=None, metrics=_metrics(), stop_requested=step == 5))
    assert calls == {"every": [3, 6, 7], "saves": [4, 5, 7]}


def test_throughput_leaves_out_the_time_of_overhead_hooks_and_stays_positive():
    writer, batch_size = _Writer(), 8
    nonfinite = NonFiniteSteps("dpo", limit=3)
    hooks = Hooks()
    hooks.add(nonfinite, overhead=False)
    hooks.add(lambda info: time.sleep(0.1))  # an evaluation or a save: 0.1 s at every step
    hooks.add(MetricsLogger(writer, batch_size, nonfinite, _Bar(), first_step=0), every=2)
    for step in range(1, 7):
        time.sleep(0.01)  # the step itself
        hooks.run(StepInfo("dpo", step, 6, state=None, metrics=_metrics()))
    rates = [metrics["examples_per_second"] for _, metrics in writer.lines]
    assert [step for step, _ in writer.lines] == [2, 4, 6]
    # 2 steps of 8 examples a log: about 0.02 s of steps (~800/s); counting the hooks' 0.2 s would give < 80/s.
    assert all(rate > 2 * batch_size / 0.1 for rate in rates), rates


def test_nonfinite_steps_are_counted_in_the_logged_line_and_stop_the_run_past_the_limit():
    writer, nonfinite = _Writer(), NonFiniteSteps("dpo", limit=2)
    hooks = Hooks()
    hooks.add(nonfinite, overhead=False)
    hooks.add(MetricsLogger(writer, 8, nonfinite, _Bar(), first_step=0), every=1)
    hooks.run(StepInfo("dpo", 1, 9, state=None, metrics=_metrics(skipped=1.0)))
    assert writer.lines[-1][1]["skipped_steps"] == 1.0
    with pytest.raises(NonFiniteTraining, match="2 steps in a row"):
        hooks.run(StepInfo("dpo", 2, 9, state=None, metrics=_metrics(skipped=1.0)))
