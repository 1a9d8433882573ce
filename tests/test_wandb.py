"""The Weights & Biases backend, offline (WANDB_MODE=offline: nothing leaves the machine): what a run sends is read
back from the offline run files (`wandb/offline-run-*/run-<id>.wandb`, a LevelDB-style log of W&B's Record
protos) and compared with metrics.jsonl; a run killed and resumed continues the same W&B run and sends each step once.
"""

import glob
import json
import os
import struct
import time

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from conftest import interrupt_stage_at, make_short_config  # noqa: E402
from dpo_jax import build, checkpoint, run  # noqa: E402
from dpo_jax import config as config_lib  # noqa: E402
from dpo_jax.metrics_writer import MetricsWriter, MissingTracker, check_loggers, read_metrics  # noqa: E402

BLOCK = 32768  # the log's block size; each chunk has a 7-byte header (crc32, length, type)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def offline_records(workdir, timeout=60.0):
    """(run id, Record protos) of every offline run W&B wrote in `workdir`, oldest first, once each holds its exit
    record (W&B's service process may still be writing the file when `finish` has returned)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_offline_runs(workdir)
        complete = all(any(r.WhichOneof("record_type") == "exit" for r in records) for _, records in runs)
        if (runs and complete) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def _read_offline_runs(workdir):
    runs = []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B"
        position, chunks, records = 7, b"", []
        while position + 7 <= len(data):
            left = BLOCK - position % BLOCK
            if left < 7:
                position += left
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            if kind == 0 and length == 0:  # the rest of the block is padding
                position += left
                continue
            chunks += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # FULL or LAST
                records.append(wandb_internal_pb2.Record.FromString(chunks))
                chunks = b""
        run_id = os.path.basename(path)[len("run-"):-len(".wandb")]
        runs.append((run_id, records))
    return runs


def history(workdir):
    """Every history row W&B was sent, as {key: decoded value}, in order, over all its offline runs."""
    rows = []
    for _, records in offline_records(workdir):
        for record in records:
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def run_config(workdir):
    """The config of the first offline run, as W&B recorded it."""
    for record in offline_records(workdir)[0][1]:
        if record.WhichOneof("record_type") == "run":
            return {item.key: json.loads(item.value_json) for item in record.run.config.update}
    raise AssertionError("no run record")


def test_writer_resumed_after_a_kill_sends_each_step_once(tmp_path):
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir, ("tensorboard", "wandb"), {"loss": {"beta": 0.1}})
    writer.write_samples("dpo", 0, [{"prompt": "p", "completion": "c0", "reward": 0.5}])
    for step in range(1, 6):
        writer.write("dpo", step, {"loss": 1.0 / step})
    writer.write_samples("dpo", 5, [{"prompt": "p", "completion": "c5", "reward": 0.7}])
    run_id = writer.tracking()["wandb_run_id"]
    writer.close()
    # Resumed from a checkpoint at step 3: steps 4-5 and their samples are written again, 6 is new.
    writer = MetricsWriter(workdir, ("tensorboard", "wandb"), {"loss": {"beta": 0.1}})
    assert writer.tracking() == {"wandb_run_id": run_id}
    writer.truncate("dpo", 3)
    for step in range(4, 7):
        writer.write("dpo", step, {"loss": 1.0 / step})
    writer.write_samples("dpo", 5, [{"prompt": "p", "completion": "c5", "reward": 0.7}])
    writer.close()

    runs = offline_records(workdir)
    assert [i for i, _ in runs] == [run_id, run_id]  # the same W&B run, continued
    rows = history(workdir)
    scalars = [(r["dpo/step"], r["dpo/loss"]) for r in rows if "dpo/loss" in r]
    assert scalars == [(s, 1.0 / s) for s in range(1, 7)]  # each once, in order, as metrics.jsonl holds them
    assert [(r["dpo/step"], r["dpo/loss"]) for r in rows if "dpo/loss" in r] == [
        (r["step"], r["loss"]) for r in read_metrics(workdir)]
    tables = [r["dpo/step"] for r in rows if "dpo/samples" in r or "dpo/samples/_type" in r]
    assert tables == [0, 5] and all(r.get("dpo/samples/_type", r.get("dpo/samples", {}).get("_type")) ==
                                    "table-file" for r in rows if r["dpo/step"] in (0, 5) and "dpo/loss" not in r)
    steps = [r["_step"] for r in rows]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # W&B's own step only grows
    assert run_config(workdir)["loss"] == {"beta": 0.1}


def test_metrics_written_before_wandb_was_asked_for_are_sent_on_resume(tmp_path):
    workdir = str(tmp_path)
    writer = MetricsWriter(workdir, ("tensorboard",))
    for step in (1, 2):
        writer.write("sft", step, {"loss": float(step)})
    writer.close()
    writer = MetricsWriter(workdir, ("wandb",))
    writer.truncate("sft", 2)
    writer.write("sft", 3, {"loss": 3.0})
    writer.close()
    assert [(r["sft/step"], r["sft/loss"]) for r in history(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_loggers_are_checked(monkeypatch):
    check_loggers(())
    for bad in (("tensorboard", "tensorboard"), ("mlflow",), "wandb"):
        with pytest.raises(ValueError, match="expected"):
            check_loggers(bad)
    config = make_short_config()
    config.train.loggers = ("tensorboard", "comet")
    with pytest.raises(config_lib.ConfigError, match=r"config.train.loggers = .*expected distinct names among "
                                                      "tensorboard, wandb"):
        config_lib.validate(config)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(MissingTracker, match=r"'wandb' but the wandb package is not installed: pip install"):
        check_loggers(("wandb",))


def test_killed_run_resumes_its_wandb_run(tmp_path, monkeypatch):
    """End to end: a DPO run killed at step 3 (checkpoint at 2) and resumed logs each step once to the same W&B run,
    whose id its checkpoints record, with the config and a samples table at each evaluation."""

    class Killed(Exception):
        pass

    config = make_short_config()
    config.mode = "dpo"
    config.train.loggers = ("tensorboard", "wandb")
    workdir = str(tmp_path / "run")
    with monkeypatch.context() as patch:
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS["dpo"], 3, Killed())
        with pytest.raises(Killed):
            run.train_and_evaluate(config, workdir)
    run.train_and_evaluate(config, workdir)
    records = [r for r in read_metrics(workdir) if r["stage"] == "dpo"]
    rows = history(workdir)
    sent = [r for r in rows if "dpo/loss" in r]
    assert [r["dpo/step"] for r in sent] == [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["dpo/loss"] for r in sent] == [r["loss"] for r in records]
    assert sent[-1]["dpo/eval/rewards/accuracies"] == records[-1]["eval/rewards/accuracies"]
    assert sorted(r["dpo/step"] for r in rows if "dpo/samples/_type" in r or "dpo/samples" in r) == [0, 5]
    ids = {i for i, _ in offline_records(workdir)}
    _, meta = checkpoint.read_meta(workdir, "dpo")
    assert ids == {meta["wandb_run_id"]}
    assert run_config(workdir)["loss"]["beta"] == config.loss.beta
