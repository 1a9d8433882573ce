"""Fault injection: kills and signals at random moments, non-finite training, corrupt checkpoints, a second process,
a full disk and user errors — each followed by what the user would do next. docs/reliability.md maps each fault
to the test here that proves what the code does.

CLI runs go through tests/fault_launcher.py in subprocesses; a persistent compilation cache keeps relaunches short.
"""

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX.proto import event_pb2

from conftest import interrupt_stage_at, make_fault_config, make_short_config
from dpo_jax import build, checkpoint, run
from dpo_jax.errors import UserError
from dpo_jax.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12  # per stage, in make_fault_config
CONFIG_FILE = "from conftest import make_fault_config\n\ndef get_config(arg=None):\n    return make_fault_config()\n"


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """launch(workdir, *flags, faults=()) -> Popen of the CLI on make_fault_config, sharing one compilation cache of
    its own (not the session's: these processes are killed mid-write and run under a file-size limit)."""
    directory = tmp_path_factory.mktemp("cli")
    config_file = directory / "fault_config.py"
    config_file.write_text(CONFIG_FILE)
    env = {
        **os.environ, "PYTHONPATH": os.path.join(REPO, "tests"), "JAX_COMPILATION_CACHE_DIR": str(directory / "jax"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_COMPILATION_CACHE_MAX_SIZE": "-1",
    }

    def launch(workdir, *flags, faults=()):
        command = [sys.executable, os.path.join(REPO, "tests", "fault_launcher.py"), *faults, "--",
                   f"--config={config_file}", f"--workdir={workdir}", *flags]
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return launch


def finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def progress(workdir):
    """How far the logged steps reach: sft step s is s, dpo step s is STEPS + s (0 before any)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    reached = 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            reached = max(reached, record["step"] + (STEPS if record["stage"] == "dpo" else 0))
    return reached


def final_state(workdir, stage):
    directory = checkpoint.stage_directory(workdir, stage)
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    return step, ocp.tree.to_flat_dict(ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state")))


def comparable_records(workdir):
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in read_metrics(workdir)]


def tensorboard_points(workdir, stage):
    """(tag, step) of every scalar in the stage's TensorBoard run (TFRecord files of Event protos)."""
    points = []
    directory = os.path.join(workdir, "tensorboard", stage)
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            buffer = f.read()
        offset = 0
        while offset < len(buffer):
            (length,) = struct.unpack("<Q", buffer[offset:offset + 8])
            event = event_pb2.Event.FromString(buffer[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            points += [(value.tag, event.step) for value in event.summary.value]
    return points


def assert_logged_exactly_once(workdir, reference):
    records = comparable_records(workdir)
    keys = [(r["stage"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) == 2 * STEPS
    assert records == comparable_records(reference)
    for stage in ("sft", "dpo"):
        points = tensorboard_points(workdir, stage)
        assert len(points) == len(set(points))
        assert {step for tag, step in points if not tag.startswith("samples")} == set(range(1, STEPS + 1))
        assert {tag for tag, step in points if step == STEPS} >= {"loss", "rewards/accuracies", "eval/loss"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of make_fault_config, in process."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    run.train_and_evaluate(make_fault_config(), workdir)
    return workdir


def test_kills_and_signals_at_random_moments_then_relaunch_end_bitwise(cli, reference, tmp_path):
    """SIGKILL at 5 moments (one during an async save, one before training starts), SIGTERM and Ctrl-C once each,
    a relaunch after each: the final params equal an uninterrupted run's bitwise, and metrics.jsonl and
    TensorBoard hold every step exactly once."""
    workdir = str(tmp_path / "run")
    rng = random.Random(0)
    faults = ["SIGKILL", "save", "startup", "SIGTERM", "SIGKILL", "SIGINT", "SIGKILL"]
    for fault in faults:
        reached = progress(workdir)
        if fault == "save":  # the process kills itself while the save of the next checkpoint is in flight
            step = min(reached + 3 - reached % 3 + 3, 2 * STEPS)
            stage, stage_step = ("sft", step) if step <= STEPS else ("dpo", step - STEPS)
            returncode, _, stderr = finish(cli(workdir, faults=["--kill-during-save", f"{stage}:{stage_step}"]))
            assert returncode == -signal.SIGKILL, stderr[-2000:]
            assert os.path.isdir(checkpoint.stage_directory(workdir, stage))
            continue
        process = cli(workdir)
        if fault == "startup" or reached >= 2 * STEPS - 2:
            fault = "startup"
            time.sleep(rng.uniform(1.0, 3.0))
        else:
            target = rng.randint(reached + 1, min(reached + 4, 2 * STEPS - 1))
            while progress(workdir) < target and process.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.2))
        process.send_signal(getattr(signal, "SIGKILL" if fault == "startup" else fault))
        returncode, _, stderr = finish(process)
        if fault in ("SIGTERM", "SIGINT"):
            signum = getattr(signal, fault)
            assert returncode == 128 + signum, stderr[-2000:]
            message = stderr.strip().splitlines()[-1]
            assert message.startswith(f"stopped: {fault} at ") and "Traceback" not in stderr, stderr[-2000:]
            assert message.endswith("; rerun the same command to resume")
            stage, step = message.split(f"{fault} at ")[1].split()[:3:2]  # "dpo step 7 (...)": its checkpoint
            assert os.path.isdir(os.path.join(checkpoint.stage_directory(workdir, stage), step.rstrip(","))), message
        else:
            assert returncode == -signal.SIGKILL, stderr[-2000:]
    returncode, stdout, stderr = finish(cli(workdir))
    assert returncode == 0, stderr[-3000:]
    assert "after (DPO)" in stdout

    for stage in ("sft", "dpo"):
        (step_a, state_a), (step_b, state_b) = final_state(reference, stage), final_state(workdir, stage)
        assert step_a == step_b == STEPS and state_a.keys() == state_b.keys()
        for key in state_a:
            np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=f"{stage} {key}")
    assert_logged_exactly_once(workdir, reference)


def all_checkpoints_finite(workdir):
    """(stage, step, non-finite leaves) of every checkpoint in the workdir."""
    found = []
    for stage in ("sft", "dpo"):
        directory = checkpoint.stage_directory(workdir, stage)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            state = ocp.PyTreeCheckpointer().restore(os.path.join(directory, name, "state"))
            found.append((stage, int(name), checkpoint.nonfinite_leaves(state)))
    return found


def test_nonfinite_training_never_writes_a_nonfinite_checkpoint_and_a_sane_rerun_completes(cli, tmp_path):
    """The issue's scenario: lr 1e30, a log every 7 steps, a checkpoint every 5."""
    workdir = str(tmp_path / "run")
    returncode, _, stderr = finish(cli(
        workdir, "--config.dpo.learning_rate=1e30", "--config.train.log_every=7", "--config.train.checkpoint_every=5",
        "--config.train.max_nonfinite_steps=4",
    ))
    assert returncode == 3, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(
        "stopped: dpo: 4 steps in a row (steps 2-5) had a non-finite loss or gradient (train.max_nonfinite_steps = 4)")
    assert "dpo step 2: loss or gradient not finite; the step was skipped" in stderr  # step 1's lr is 0 (warmup)
    checkpoints = all_checkpoints_finite(workdir)
    assert [(stage, step) for stage, step, _ in checkpoints] == [("sft", 10), ("sft", 12)]
    assert all(not bad for _, _, bad in checkpoints)

    config = make_fault_config()
    config.train.update(log_every=7, checkpoint_every=5)
    summary = run.train_and_evaluate(config, workdir)  # the sane learning rate: resumes after SFT and completes
    assert summary["dpo"]["rewards/accuracies"] > 0.5
    assert all(not bad for _, _, bad in all_checkpoints_finite(workdir))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An SFT-only run (checkpoints at steps 4 and 5) and its config."""
    config = make_short_config()
    config.mode = "sft"
    workdir = str(tmp_path_factory.mktemp("sft_run"))
    run.train_and_evaluate(config, workdir)
    return workdir, config


def corrupt_truncated_data(step_dir):
    for name in os.listdir(os.path.join(step_dir, "state", "ocdbt.process_0", "d")):
        with open(os.path.join(step_dir, "state", "ocdbt.process_0", "d", name), "r+b") as f:
            f.truncate(10)


def corrupt_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("garbage{")


def lose_meta(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


@pytest.mark.parametrize("corrupt", [corrupt_truncated_data, corrupt_metadata, lose_meta])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(sft_run, corrupt, tmp_path, caplog):
    reference, config = sft_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    directory = checkpoint.stage_directory(workdir, "sft")
    corrupt(os.path.join(directory, "5"))
    run.train_and_evaluate(config, workdir)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.pathname.endswith("checkpoint.py")]
    assert len(errors) == 1 and errors[0].startswith("sft checkpoint at step 5 could not be restored (")
    assert errors[0].endswith("moved it to " + os.path.join(workdir, "sft", "corrupt_checkpoints", "5")
                              + " and trying the previous one")
    assert os.path.isdir(os.path.join(workdir, "sft", "corrupt_checkpoints", "5"))
    (step_a, state_a), (step_b, state_b) = final_state(reference, "sft"), final_state(workdir, "sft")
    assert step_a == step_b == 5
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=str(key))


def test_another_models_checkpoint_is_refused_and_changed_config_is_listed(sft_run, tmp_path, caplog):
    reference, config = sft_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    other = make_short_config()
    other.mode = "sft"
    other.model.intermediate_size = 96
    with pytest.raises(UserError, match=r"sft/checkpoints/5 holds another model or optimizer than this config builds: "
                                        r"opt_state/.*/layers/0/mlp/down_proj/kernel/value has shape \[128, 64\] there "
                                        r"and \[96, 64\] here"):
        run.train_and_evaluate(other, workdir)
    longer = make_short_config()
    longer.mode = "sft"
    longer.sft.num_steps = 6
    run.train_and_evaluate(longer, workdir)
    warnings = [r.getMessage() for r in caplog.records if "resuming a run whose config differed" in r.getMessage()]
    assert warnings == ["sft: resuming a run whose config differed: sft.num_steps: 5 -> 6"]


def test_a_kill_before_the_first_checkpoint_and_a_torn_line_leave_every_step_logged_once(tmp_path, monkeypatch, caplog):
    config = make_short_config()
    config.data.num_eval_prompts = 0  # and no evaluation on samples, which is allowed
    workdir = str(tmp_path / "run")

    class Killed(Exception):
        pass

    with monkeypatch.context() as patch:  # sft step 1 is logged, its first checkpoint is at step 2
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS["sft"], 1, Killed())
        with pytest.raises(Killed):
            run.train_and_evaluate(config, workdir)
    assert [r["step"] for r in read_metrics(workdir)] == [1]
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"stage": "sft", "step": 2, "lo')  # what a kill in mid-write leaves
    summary = run.train_and_evaluate(config, workdir)
    assert "samples" not in summary and os.path.exists(os.path.join(workdir, "summary.json"))
    assert any("dropped its torn last line" in r.getMessage() for r in caplog.records)
    keys = [(r["stage"], r["step"]) for r in read_metrics(workdir)]
    assert keys == [("sft", s) for s in range(1, 6)] + [("dpo", s) for s in range(1, 6)]


def test_a_second_process_on_the_workdir_is_refused_while_the_first_completes(cli, tmp_path):
    workdir = str(tmp_path / "run")
    first = cli(workdir, "--config.sft.num_steps=40", "--config.dpo.num_steps=40")
    lock = os.path.join(workdir, ".lock")
    while first.poll() is None and not (os.path.exists(lock) and str(first.pid) in open(lock).read()):
        time.sleep(0.05)
    returncode, _, stderr = finish(cli(workdir))
    assert returncode == 2
    assert stderr.strip().splitlines()[-1].startswith(f"error: workdir {workdir} is in use by process {first.pid} on ")
    returncode, _, stderr = finish(first)
    assert returncode == 0, stderr[-3000:]


def test_failed_saves_are_reported_at_once_retried_then_limited(cli, tmp_path):
    """RLIMIT_FSIZE makes checkpoint writes fail with EFBIG, as a full disk does; metrics still fit."""
    workdir = str(tmp_path / "recovers")
    returncode, _, stderr = finish(cli(workdir, "--config.mode=sft",
                                       faults=["--fsize-limit", "20000", "--recover-after", "1"]))
    assert returncode == 0, stderr[-3000:]
    reports = [line for line in stderr.splitlines() if "could not be saved" in line]
    assert len(reports) == 1 and "sft checkpoint at step 3 could not be saved (" in reports[0]
    assert "File too large" in reports[0] and "(1 of 3 failures in a row allowed)" in reports[0]
    assert "Traceback" not in stderr
    directory = checkpoint.stage_directory(workdir, "sft")
    assert sorted(os.listdir(directory)) == ["12", "9"]  # no partial save left behind

    workdir = str(tmp_path / "full")
    returncode, _, stderr = finish(cli(workdir, "--config.mode=sft", "--config.train.max_save_failures=2",
                                       faults=["--fsize-limit", "20000"]))
    assert returncode == 4, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped: sft: 2 checkpoint saves failed in a row, the last at step 6")
    assert len([line for line in stderr.splitlines() if "could not be saved" in line]) == 2
    assert "Traceback" not in stderr and os.listdir(checkpoint.stage_directory(workdir, "sft")) == []


def test_user_errors_are_one_line_with_status_2(cli, tmp_path):
    workdir = str(tmp_path / "run")
    returncode, _, stderr = finish(cli(workdir, "--config.train.nope=1"))
    assert (returncode, stderr.strip()) == (2, "error: --config.train.nope=1: the config has no key 'nope'")
    returncode, _, stderr = finish(cli(workdir, "--config=configs/demo.py:big"))
    assert returncode == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert stderr.startswith("error: flag --config=configs/demo.py:big: Error whilst parsing config file") and stderr.strip(
        ).endswith("ValueError: configs/demo.py: unknown argument 'big'; valid: 'smoke' or none")
    returncode, _, stderr = finish(cli(workdir, "--config.mode=dpo", "--config.dpo.reference_workdir=/no/sft/run"))
    assert returncode == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "error: config.dpo.reference_workdir: no sft checkpoints under /no/sft/run/sft/checkpoints")
    returncode, _, stderr = finish(cli(workdir, "--config.loss.beta=inf", "--verbose"))
    assert returncode == 2 and "Traceback" in stderr
    assert stderr.strip().splitlines()[-1] == "error: config.loss.beta = inf is invalid: expected a finite number > 0"


def test_bad_data_and_a_missing_tokenizer_are_user_errors(tmp_path, monkeypatch):
    config = make_short_config()
    config.data.strict = True
    monkeypatch.setattr(run.data.sources.synthetic, "make_preference_pairs",
                        lambda num, seed: [{"prompt": "review of the film :", "chosen": "", "rejected": "dull"}])
    with pytest.raises(UserError, match=r"^data: synthetic_sentiment/train: synthetic_sentiment/train 0: "
                                        r"empty_completion: 'chosen' is empty \(data.strict = True\)$"):
        run.train_and_evaluate(config, str(tmp_path / "run"))
    config.data.strict = False
    with pytest.raises(UserError, match=r"^data: synthetic_sentiment/train: no usable records among 1 "
                                        r"\(skipped: \{'empty_completion': 1\}\)$"):
        run.train_and_evaluate(config, str(tmp_path / "run"))
    config.data.tokenizer = f"hf:{tmp_path / 'no_tokenizer'}"
    with pytest.raises(UserError, match=r"^config\.data\.tokenizer = 'hf:.*no_tokenizer': tokenizer 'hf:.*"
                                        r"transformers\.AutoTokenizer could not load"):
        run.train_and_evaluate(config, str(tmp_path / "run"))
