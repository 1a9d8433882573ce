"""benchmarks/compare.py: the workload file every arm reads round-trips, the realistic workloads are
benchmarks/workloads.py's pairs, our arm on a tiny workload gives well-formed rows, and a peer whose venv or
framework is absent is reported as "not installed" in the table. The peer runners themselves (TRL, Tunix) need
torch/TRL/Tunix, which are no test dependency: they are run by hand (docs/speed.md)."""

import os
import sys

import numpy as np
import pytest

from benchmarks import compare, workloads
from benchmarks.peers import workload_file

TINY_MODEL = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16, intermediate_size=64,
                  vocab_size=128, rope_theta=10000.0, rms_norm_eps=1e-6)


def test_workload_file_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pairs = [{key: rng.integers(3, 100, n).astype(np.int32) for key, n in zip(("prompt", "chosen", "rejected"), ls)}
             for ls in ((5, 2, 3), (1, 4, 1), (7, 1, 2))]
    spec = dict(compare.workload_spec("small", 2), note="anything JSON")
    path = str(tmp_path / "w.npz")
    workload_file.save(path, spec, pairs)
    loaded_spec, loaded = workload_file.load(path)
    assert loaded_spec == spec
    assert len(loaded) == 3
    for a, b in zip(pairs, loaded):
        for key in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(a[key], b[key])
    assert [len(b) for b in workload_file.batches(spec, loaded)] == [2]  # the partial last batch is dropped
    assert workload_file.real_tokens(loaded[:2]) == 5 + 2 + 3 + 1 + 4 + 1
    with pytest.raises(ValueError, match="lacks.*beta"):
        workload_file.save(path, {k: v for k, v in spec.items() if k != "beta"}, pairs)
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not a compare.py workload file"):
        workload_file.load(str(tmp_path / "other.npz"))


def test_workloads_are_the_benchmarks_pairs():
    pairs = compare.workload_pairs("tldr", 2, 4, 8192)
    lengths = workloads.pair_lengths("tldr", 8)
    epoch = workloads.batches(workloads.encoded_pairs(lengths, 8192), 4)
    expected = [pair for batch in epoch for pair in batch]
    for a, b in zip(pairs, expected, strict=True):
        for key in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(a[key], b[key])
    small = compare.workload_pairs("small", 1, 3, 8192)
    assert [(len(p["prompt"]), len(p["chosen"]), len(p["rejected"])) for p in small] == [(96, 32, 32)] * 3
    spec = compare.workload_spec("tldr", 8)
    assert spec["model"]["num_layers"] == 4 and spec["max_length"] == 512 and spec["dtype"] == "float32"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`measure` on the `small` lengths with a tiny model: ours (default) in its subprocess, TRL with no venv, Tunix
    with an interpreter that lacks it (this one)."""
    spec = dict(compare.workload_spec("small", 2), model=TINY_MODEL)
    original = compare.workload_spec
    compare.workload_spec = lambda name, batch_size: spec
    try:
        rows = {}
        for arm, python in (("trl", None), ("tunix", sys.executable), ("trl", "/nonexistent/bin/python")):
            rows[(arm, python)] = compare.measure("small", [arm], 2, 2, python, 100.0)
        rows["ours"] = compare.measure("small", ["ours:default"], 2, 2, None, 100.0,
                                       workdir=str(tmp_path_factory.mktemp("compare")))
    finally:
        compare.workload_spec = original
    return rows


def test_our_arm_gives_well_formed_rows(tiny_run):
    (row,) = tiny_run["ours"]
    assert row["arm"] == "ours, default" and row["workload"] == "small"
    assert row["seconds_per_step"] > 0 and row["ours_default_vs_this"] == pytest.approx(1.0)
    assert row["pairs_per_second"] == pytest.approx(2 / row["seconds_per_step"])
    assert row["tokens_per_second"] == pytest.approx(2 * (96 + 32 + 32) / row["seconds_per_step"])
    assert row["raw"]["timed_steps"] == 2 and row["raw"]["shapes_compiled"] == 1
    assert row["raw"]["padded_shapes"][0][:2] == [2, 96 + 2 * 32]  # shared-prompt rows: a row per pair
    assert row["padding_fraction"] == pytest.approx(0.0)
    assert 0 < row["gflops"] and 0 < row["peak_rss_gib"] < 64
    assert "| small | ours, default |" in compare.table(tiny_run["ours"])


def test_missing_peer_is_reported_not_installed(tiny_run):
    no_venv, no_module, no_python = (tiny_run[("trl", None)], tiny_run[("tunix", sys.executable)],
                                     tiny_run[("trl", "/nonexistent/bin/python")])
    assert "not installed (no peer venv" in no_venv[0]["error"]
    assert compare.PEER_PYTHON_ENV in no_venv[0]["error"]
    if compare.peer_status("tunix", sys.executable) is not None:  # this venv has no Tunix (a test dependency rule)
        assert "not installed (tunix is not importable" in no_module[0]["error"]
    assert "not installed (no interpreter at /nonexistent" in no_python[0]["error"]
    text = compare.table(no_venv + no_module + tiny_run["ours"])
    assert text.count("not installed") >= 1 and "| small | TRL DPOTrainer | not installed" in text


def test_peer_runners_exist():
    for runner, _ in compare.PEERS.values():
        assert os.path.exists(os.path.join(compare.PEERS_DIR, runner))
