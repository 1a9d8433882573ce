"""An interrupted and resumed run ends bitwise where an uninterrupted one does (on the CPU)."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import interrupt_stage_at
from dpo_jax import checkpoint, run
from dpo_jax.errors import UserError


class Interrupted(Exception):
    pass


def final_state(workdir, stage):
    directory = checkpoint.stage_directory(workdir, stage)
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    return step, ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state"))


def stage_records(workdir, stage):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records if r["stage"] == stage]


@pytest.mark.parametrize("interrupt_stage", ["sft", "dpo"])
def test_resume_after_interruption_is_bitwise(tmp_path, monkeypatch, interrupt_stage, short_config):
    config = short_config
    uninterrupted, resumed = str(tmp_path / "uninterrupted"), str(tmp_path / "resumed")
    run.train_and_evaluate(config, uninterrupted)

    with monkeypatch.context() as patch:  # killed after the step-2 checkpoint, before step 4's
        interrupt_stage_at(patch, config.seed + run.STAGE_DATA_STREAMS[interrupt_stage], 3, Interrupted())
        with pytest.raises(Interrupted):
            run.train_and_evaluate(config, resumed)
    assert final_state(resumed, interrupt_stage)[0] == 2
    run.train_and_evaluate(config, resumed)

    for stage in ("sft", "dpo"):
        (step_a, state_a), (step_b, state_b) = final_state(uninterrupted, stage), final_state(resumed, stage)
        assert step_a == step_b == 5
        leaves_a, leaves_b = (ocp.tree.to_flat_dict(s) for s in (state_a, state_b))
        assert leaves_a.keys() == leaves_b.keys()
        for key in leaves_a:
            np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=f"{stage} {key}")
        # The resumed run re-logs the lost steps instead of duplicating them.
        assert stage_records(uninterrupted, stage) == stage_records(resumed, stage)


def test_keeps_only_the_last_checkpoints(tmp_path, short_config):
    config = short_config
    config.mode = "sft"
    run.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(n) for n in os.listdir(checkpoint.stage_directory(str(tmp_path), "sft")) if n.isdigit())
    assert steps == [4, 5]
    with open(os.path.join(checkpoint.stage_directory(str(tmp_path), "sft"), "5", "meta", "metadata")) as f:
        meta = json.load(f)
    assert meta["data_position"] == 5 * 16 and meta["config"]["train"]["batch_size"] == 16


def test_dpo_mode_takes_reference_from_an_sft_workdir(tmp_path, short_config):
    config = short_config
    config.mode = "sft"
    run.train_and_evaluate(config, str(tmp_path / "sft"))
    config.mode, config.dpo.reference_workdir = "dpo", str(tmp_path / "sft")
    summary = run.train_and_evaluate(config, str(tmp_path / "dpo"))
    # π_ref's samples have KL 0 to themselves; a missing SFT workdir is an error naming the path.
    assert summary["samples"]["reference"]["kl"] == pytest.approx(0.0, abs=1e-5)
    config.dpo.reference_workdir = str(tmp_path / "missing")
    with pytest.raises(UserError, match=r"config\.dpo\.reference_workdir: no sft checkpoints under .*missing"):
        run.train_and_evaluate(config, str(tmp_path / "dpo2"))

