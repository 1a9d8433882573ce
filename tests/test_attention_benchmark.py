"""benchmarks/attention.py measures the masks dpo_jax builds: its dense masks equal models.layers.attention_mask's for
the same layouts, and the benchmark runs (on the CPU: the XLA cases; cuDNN reported as unavailable)."""

import json

import jax.numpy as jnp
import numpy as np

from benchmarks import attention
from dpo_jax.models import layers


def test_benchmark_masks_are_the_models_masks():
    T = 32
    masks = attention.dpo_masks(T)
    t = jnp.arange(T)[None]
    zeros = jnp.zeros((1, T), jnp.int32)
    np.testing.assert_array_equal(masks["causal"], layers.attention_mask(t, zeros))
    np.testing.assert_array_equal(masks["sliding window"], layers.attention_mask(t, zeros, sliding_window=T // 8))
    branches = jnp.repeat(jnp.array([0, 1, 2]), jnp.array([16, 8, 8]))[None]
    np.testing.assert_array_equal(masks["shared prompt"], layers.attention_mask(t, zeros, None, branches))
    segments = (jnp.arange(T) // 8)[None]
    local = jnp.tile(jnp.repeat(jnp.array([0, 1, 2]), jnp.array([4, 2, 2])), 4)[None]
    np.testing.assert_array_equal(masks["packed"], layers.attention_mask(t % 8, segments, None, local))


def test_benchmark_runs_and_reports_what_it_cannot_run(tmp_path, capsys):
    path = tmp_path / "attention.json"
    assert attention.main(["--lengths", "64", "--heads", "4", "--kv_heads", "2", "--head_dim", "8", "--repeats", "1",
                           "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    by_case = {row["case"]: row for row in report["rows"]}
    assert by_case["xla, is_causal"]["max_abs_difference"] < 1e-2  # the same attention as the dense mask
    assert by_case["xla, dense mask"]["seconds"] > 0
    if report["device"].startswith("cpu"):
        assert "cuDNN" in by_case["cudnn, is_causal"]["error"]
        assert all("error" in row for row in report["mask_parity"])
