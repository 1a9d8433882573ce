"""experiments/sweep/: the grid × seeds expansion and its errors, one shared SFT reference, results.csv and plots,
an interrupted run resumed from its checkpoint, a rerun that trains nothing, runs stopped by non-finite training,
and the command. One real sweep (an SFT reference and two DPO runs, one of them killed and resumed) is shared."""

import csv
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import interrupt_stage_at, make_short_config
from dpo_jax import build, checkpoint, errors, run
from dpo_jax.metrics_writer import read_metrics
from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_config():
    """The short demo config without samples: a sweep's runs in seconds."""
    config = make_short_config()
    config.data.num_eval_prompts = 0
    return config


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_is_the_product_of_the_grid_and_the_seeds():
    plan = sweep.plan(tiny_config(), ["loss.name=dpo,unweighted", "loss.beta=0.05,1"], [0, 1], "/tmp/s")
    names = [r.name for r in plan.runs]
    assert names == [f"loss.name={n},loss.beta={b},seed={s}"
                     for n in ("dpo", "unweighted") for b in ("0.05", "1") for s in (0, 1)]
    last = plan.runs[-1]
    assert (last.index, last.workdir) == (7, "/tmp/s/runs/loss.name=unweighted,loss.beta=1,seed=1")
    assert (last.config.loss.name, last.config.loss.beta, last.config.seed) == ("unweighted", 1.0, 1)
    assert isinstance(last.config.loss.beta, float)
    # sft_then_dpo: every run is a DPO run from the one SFT reference, trained with the config's seed.
    assert list(plan.references) == ["/tmp/s/sft"]
    assert (plan.references["/tmp/s/sft"].mode, plan.references["/tmp/s/sft"].seed) == ("sft", 0)
    assert {(r.config.mode, r.config.dpo.reference_workdir, r.reference) for r in plan.runs} == {
        ("dpo", "/tmp/s/sft", "/tmp/s/sft")}

    typed = sweep.plan(tiny_config(), ["loss.reference_free=true,False", "train.batch_size=8"], [3], "/tmp/s",
                       sft_seed=5)
    assert [(r.config.loss.reference_free, r.config.train.batch_size, r.config.seed) for r in typed.runs] == [
        (True, 8, 3), (False, 8, 3)]
    assert [c.seed for c in typed.references.values()] == [5]

    plain = sweep.plan(tiny_config(), [], [0, 1], "/tmp/s")  # no grid: the config at each seed
    assert [r.name for r in plain.runs] == ["seed=0", "seed=1"]
    dpo = tiny_config()
    dpo.mode = "dpo"
    assert sweep.plan(dpo, ["loss.beta=0.1"], [0], "/tmp/s").references == {}  # no SFT added


def test_keys_that_change_the_sft_model_train_one_reference_each():
    config = tiny_config()
    config.ref.cache = "/tmp/cache"
    plan = sweep.plan(config, ["model.num_layers=1,2", "loss.beta=0.1,1"], [0, 1], "/tmp/s")
    assert sorted(plan.references) == ["/tmp/s/sft/model.num_layers=1", "/tmp/s/sft/model.num_layers=2"]
    assert [c.model.num_layers for c in plan.references.values()] == [1, 2]
    assert plan.references["/tmp/s/sft/model.num_layers=1"].ref.cache == ""  # Preferred-FT has no reference
    for r in plan.runs:
        assert r.config.dpo.reference_workdir == f"/tmp/s/sft/model.num_layers={r.config.model.num_layers}"
        # π_ref's log-probs depend on the reference and the (seeded) data, not on β: shared across β only
        assert r.config.ref.cache == f"/tmp/cache/model.num_layers={r.config.model.num_layers},seed={r.seed}"
    assert sweep.label([("data.path", "/d/x,y=1.jsonl")]) == "data.path=%2Fd%2Fx%2Cy%3D1.jsonl"


@pytest.mark.parametrize("grid, message", [
    (["loss.betta=0.1"], "--grid loss.betta: the config has no key 'loss.betta' (Did you mean \"beta\""),
    (["los.beta=0.1"], "the config has no key 'los.beta'"),
    (["loss.beta=abc"], "--grid loss.beta=abc: config.loss.beta holds float values"),
    (["train.batch_size=1.5"], "--grid train.batch_size=1.5: config.train.batch_size holds int values"),
    (["loss.reference_free=maybe"], "--grid loss.reference_free=maybe"),
    (["loss.beta=0.1", "loss.beta=-1"], "--grid loss.beta: given twice"),
    (["loss.beta=0.1,-1"], "run 1 (loss.beta=-1,seed=0): config.loss.beta = -1.0 is invalid: expected a finite "
                           "number > 0"),
    (["loss.name=dpo,dpoo"], "config.loss.name = 'dpoo' is invalid: unknown loss 'dpoo'; valid losses:"),
    (["loss.beta=1,1.0"], "--grid loss.beta: '1.0' repeats '1'"),
    (["loss.beta="], "expected KEY=VALUE[,VALUE...]"),
    (["seed=1,2"], "--grid seed: config.seed is not a grid key (set by --seeds)"),
    (["data.length_buckets=8"], "config.data.length_buckets holds tuple values; a grid sets int, float, bool or str"),
    (["dpo.reference_workdir=/a"], "with config.mode = 'sft_then_dpo' the sweep trains the SFT reference"),
])
def test_bad_grids_fail_before_anything_runs_naming_key_and_value(grid, message, monkeypatch, tmp_path):
    monkeypatch.setattr(run, "train_and_evaluate", lambda *a: pytest.fail("a bad grid trained"))
    with pytest.raises(errors.UserError) as error:
        sweep.run_sweep(tiny_config(), grid, [0], str(tmp_path))
    assert message in str(error.value)
    assert not os.listdir(tmp_path)


def test_bad_plot_key_and_run_index_fail_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(run, "train_and_evaluate", lambda *a: pytest.fail("trained"))
    with pytest.raises(errors.UserError, match=r"--plot_x=loss.name: not a grid key \(the grid keys: loss.beta\)"):
        sweep.run_sweep(tiny_config(), ["loss.beta=0.1,1"], [0], str(tmp_path), x_key="loss.name")
    with pytest.raises(errors.UserError, match="--run_index=2: the sweep has runs 0-1"):
        sweep.train(sweep.plan(tiny_config(), ["loss.beta=0.1,1"], [0], str(tmp_path)), [2])
    assert not os.listdir(tmp_path)


class Killed(Exception):
    """Stands for the process dying in the middle of a run."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real sweep, β = 0.1 at seeds 0 and 1 from one SFT reference, killed in seed 1's DPO stage when step 4 is
    due (its checkpoint at step 2 saved), then run again; every train_and_evaluate call and restore recorded."""
    workdir = str(tmp_path_factory.mktemp("sweep"))
    calls, restores = [], []
    original_train, original_restore = run.train_and_evaluate, checkpoint.StageCheckpoints.restore

    def recording_train(config, run_workdir):
        calls.append((config.mode, run_workdir, config.dpo.reference_workdir))
        return original_train(config, run_workdir)

    def recording_restore(self, abstract_state):
        restored = original_restore(self, abstract_state)
        restores.append((os.path.basename(self.workdir), self.stage, restored and int(restored[0].step)))
        return restored

    args = (tiny_config(), ["loss.beta=0.1"], [0, 1], workdir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "train_and_evaluate", recording_train)
        patch.setattr(checkpoint.StageCheckpoints, "restore", recording_restore)
        with pytest.MonkeyPatch.context() as kill:
            interrupt_stage_at(kill, seed=1 + build.STAGE_DATA_STREAMS["dpo"], step=3, error=Killed())
            with pytest.raises(Killed):
                sweep.run_sweep(*args)
        killed = [sweep.status(r.workdir, r.config) for r in sweep.plan(*args).runs]
        rows = sweep.run_sweep(*args)
    with open(os.path.join(workdir, sweep.RESULTS_FILE)) as f:
        text = f.read()
    return types.SimpleNamespace(workdir=workdir, args=args, rows=rows, calls=calls, restores=restores,
                                 killed=killed, csv=text)


def test_sweep_trains_the_sft_reference_once_and_writes_results_and_plots(trained):
    sft, runs = os.path.join(trained.workdir, "sft"), os.path.join(trained.workdir, "runs")
    seed0, seed1 = os.path.join(runs, "loss.beta=0.1,seed=0"), os.path.join(runs, "loss.beta=0.1,seed=1")
    assert trained.calls == [("sft", sft, ""), ("dpo", seed0, sft), ("dpo", seed1, sft),  # killed in seed 1
                             ("dpo", seed1, sft)]  # the rerun: seed 1 only
    rows = read_csv(os.path.join(trained.workdir, sweep.RESULTS_FILE))
    assert list(rows[0])[:6] == ["index", "name", "loss.beta", "seed", "status", "workdir"]
    assert [(r["index"], r["loss.beta"], r["seed"], r["status"], r["workdir"]) for r in rows] == [
        ("0", "0.1", "0", "done", seed0), ("1", "0.1", "1", "done", seed1)]
    for row in rows:
        with open(os.path.join(row["workdir"], "summary.json")) as f:
            summary = json.load(f)
        assert float(row["dpo/rewards/accuracies"]) == summary["dpo"]["rewards/accuracies"]
        assert float(row["dpo_initial/loss"]) == pytest.approx(0.6931472)  # π_ref against itself: log 2
        assert float(row["wall_time_seconds"]) == summary["wall_time_seconds"]
    assert rows[0]["dpo/rewards/margins"] != rows[1]["dpo/rewards/margins"]  # the seeds differ
    metrics = sorted(name for name in rows[0] if name.startswith("dpo/"))
    plots = sorted(os.listdir(os.path.join(trained.workdir, sweep.PLOTS_DIRECTORY)))
    assert "dpo_rewards_accuracies.png" in plots
    assert plots == sorted(name.replace("/", "_") + ".png" for name in metrics)
    with open(os.path.join(trained.workdir, sweep.PLOTS_DIRECTORY, plots[0]), "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    # results.md: the combination's row, each metric's mean ± sample std over the two seeds, and the seed count.
    with open(os.path.join(trained.workdir, sweep.TABLE_FILE)) as f:
        header, rule, row = f.read().splitlines()
    assert header.startswith("| loss.beta | rewards/accuracies | rewards/margins |") and header.endswith(" seeds |")
    accuracies = [float(r["dpo/rewards/accuracies"]) for r in rows]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "`0.1`" and cells[-1] == "2"
    assert cells[1] == f"{np.mean(accuracies):.3f} ± {np.std(accuracies, ddof=1):.3f}"


def test_an_interrupted_run_resumes_from_its_checkpoint(trained):
    assert trained.killed == ["done", "incomplete"]
    assert [r for r in trained.restores if r[0] == "loss.beta=0.1,seed=1"] == [
        ("loss.beta=0.1,seed=1", "dpo", None),  # the first start
        ("loss.beta=0.1,seed=1", "dpo", 2),  # the rerun: resumed, not restarted
    ]
    assert len(trained.restores) == 4  # sft, seed 0 and seed 1 twice: nothing finished was opened again
    seed1 = os.path.join(trained.workdir, "runs", "loss.beta=0.1,seed=1")
    assert [r["step"] for r in read_metrics(seed1) if r["stage"] == "dpo"] == [1, 2, 3, 4, 5]  # each logged once


def test_rerun_trains_nothing_and_rewrites_the_same_results(trained, monkeypatch):
    monkeypatch.setattr(run, "train_and_evaluate", lambda config, workdir: pytest.fail(f"trained {workdir} again"))
    os.remove(os.path.join(trained.workdir, sweep.RESULTS_FILE))
    plots = os.path.join(trained.workdir, sweep.PLOTS_DIRECTORY)
    for name in os.listdir(plots):
        os.remove(os.path.join(plots, name))
    assert sweep.run_sweep(*trained.args) == trained.rows
    with open(os.path.join(trained.workdir, sweep.RESULTS_FILE)) as f:
        assert f.read() == trained.csv
    assert "dpo_loss.png" in os.listdir(plots)
    described = sweep.describe(sweep.plan(*trained.args)).splitlines()
    assert described[1].split()[:2] == ["sft", "done"]
    assert [line.split()[:2] for line in described[2:]] == [["0", "done"], ["1", "done"]]


def test_runs_stopped_by_nonfinite_training_are_marked_and_retried(monkeypatch, tmp_path):
    """Without training: a stand-in trainer writes summaries, and stops one run as non-finite training would."""
    calls = []

    def fake(config, workdir, fail=("loss.beta=1,seed=1",)):
        calls.append(os.path.basename(workdir))
        os.makedirs(workdir, exist_ok=True)
        if os.path.basename(workdir) in fail:
            raise errors.NonFiniteTraining("10 steps in a row had a non-finite loss")
        summary = {"config": config.to_dict(), "wall_time_seconds": 1.0,
                   "dpo": {"loss": float(config.seed) + config.loss.beta}}
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f)

    monkeypatch.setattr(run, "train_and_evaluate", fake)
    args = (tiny_config(), ["loss.beta=0.1,1"], [0, 1], str(tmp_path))
    with pytest.raises(errors.NonFiniteTraining, match=r"1 of 4 runs stopped.*loss.beta=1,seed=1"):
        sweep.run_sweep(*args)
    assert calls == ["sft", "loss.beta=0.1,seed=0", "loss.beta=0.1,seed=1", "loss.beta=1,seed=0",
                     "loss.beta=1,seed=1"]
    rows = read_csv(os.path.join(tmp_path, sweep.RESULTS_FILE))
    assert [r["status"] for r in rows] == ["done", "done", "done", "stopped"]
    assert rows[3]["dpo/loss"] == ""
    assert os.path.exists(os.path.join(tmp_path, "plots", "dpo_loss.png"))
    done = [r for r in sweep.collect(sweep.plan(*args)) if r["status"] == "done"]
    assert sweep.seed_statistics(done, "dpo/loss", {"loss.beta": "0.1"}) == pytest.approx((0.6, 0.5 ** 0.5))
    assert sweep.seed_statistics(done, "dpo/loss", {"loss.beta": "1"}) == (1.0, 0.0)  # one seed: no spread

    calls.clear()
    monkeypatch.setattr(run, "train_and_evaluate", lambda c, w: fake(c, w, fail=()))
    rows = sweep.run_sweep(*args)
    assert calls == ["loss.beta=1,seed=1"]  # only the stopped run, retried
    assert [r["status"] for r in rows] == ["done"] * 4
    assert not os.path.exists(os.path.join(tmp_path, "runs", "loss.beta=1,seed=1", sweep.STOPPED_FILE))


def test_command_lists_the_runs(tmp_path):
    """The command line: config file with an override, repeated --grid, --seeds and --list (which trains nothing)."""
    listed = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
         "--config.sft.num_steps=7", "--seeds=2", "--list", "--grid=loss.name=dpo,ipo", "--grid", "loss.beta=0.1,1"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"8 runs in {tmp_path}/runs, 1 SFT reference(s)"
    assert lines[1].split() == ["sft", "not", "started", f"{tmp_path}/sft"]
    assert lines[9].split() == ["7", "not", "started", "loss.name=ipo,loss.beta=1,seed=1"]
    assert not os.listdir(tmp_path)
