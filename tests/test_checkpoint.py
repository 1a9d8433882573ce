"""An interrupted and resumed run ends bitwise where an uninterrupted one does (on the CPU)."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import interrupt_stage_at, make_short_config
from dpo_jax import build, checkpoint, run
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted SFT-then-DPO run of the short config, shared read-only: the run both resumed runs must
    equal, the checkpoints the retention test counts, and the SFT workdir the DPO-only run takes π_ref from."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    run.train_and_evaluate(make_short_config(), workdir)
    return workdir


@pytest.mark.parametrize("interrupt_stage", ["sft", "dpo"])
def test_resume_after_interruption_is_bitwise(tmp_path, monkeypatch, interrupt_stage, short_config, uninterrupted):
    config = short_config
    resumed = str(tmp_path / "resumed")

    with monkeypatch.context() as patch:  # killed after the step-2 checkpoint, before step 4's
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS[interrupt_stage], 3, Interrupted())
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


def test_keeps_only_the_last_checkpoints(uninterrupted):
    for stage in ("sft", "dpo"):  # 5 steps, a checkpoint every 2, keep_checkpoints = 2
        directory = checkpoint.stage_directory(uninterrupted, stage)
        assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [4, 5]
        with open(os.path.join(directory, "5", "meta", "metadata")) as f:
            meta = json.load(f)
        assert meta["data_position"] == 5 * 16 and meta["config"]["train"]["batch_size"] == 16


def test_dpo_mode_takes_reference_from_an_sft_workdir(tmp_path, short_config, uninterrupted):
    config = short_config
    config.mode, config.dpo.reference_workdir = "dpo", uninterrupted  # its SFT stage's final checkpoint
    summary = run.train_and_evaluate(config, str(tmp_path / "dpo"))
    # π_ref's samples have KL 0 to themselves; a missing SFT workdir is an error naming the path.
    assert summary["samples"]["reference"]["kl"] == pytest.approx(0.0, abs=1e-5)
    config.dpo.reference_workdir = str(tmp_path / "missing")
    with pytest.raises(UserError, match=r"config\.dpo\.reference_workdir: no sft checkpoints under .*missing"):
        run.train_and_evaluate(config, str(tmp_path / "dpo2"))

