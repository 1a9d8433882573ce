"""benchmarks/workloads.py: the realistic length distributions are reproducible and within their bounds, and the
padding report counts what the collated batches hold."""

import numpy as np

from benchmarks import workloads
from dpo_jax import data


def test_lengths_are_seeded_and_within_each_workloads_bounds():
    for name, spec in workloads.WORKLOADS.items():
        lengths = workloads.pair_lengths(name, 400, seed=3)
        np.testing.assert_array_equal(lengths, workloads.pair_lengths(name, 400, seed=3))
        assert not np.array_equal(lengths, workloads.pair_lengths(name, 400, seed=4))
        assert spec.prompt_clip[0] <= lengths[:, 0].min() and lengths[:, 0].max() <= spec.prompt_clip[1]
        assert spec.completion_clip[0] <= lengths[:, 1:].min() and lengths[:, 1:].max() <= spec.completion_clip[1]
        assert (lengths[:, 0] + lengths[:, 1:].max(axis=1)).max() <= spec.max_length  # nothing is truncated
        assert abs(np.median(lengths[:, 0]) - spec.prompt_median) < 0.15 * spec.prompt_median
        assert not np.array_equal(lengths[:, 1], lengths[:, 2])  # chosen and rejected drawn independently


def test_padding_counts_the_collated_rows():
    lengths = np.array([[5, 3, 2], [9, 4, 6]])
    epoch = [workloads.encoded_pairs(lengths, 50)]
    plain = workloads.padding("tldr", data.Layout(), epoch)
    # Rows per completion: prompt + completion ≤ 15 → bucket 128 (512 / 4); 4 rows of 128.
    assert plain["padded_tokens"] == 4 * 128 and plain["real_tokens"] == (5 + 3) + (5 + 2) + (9 + 4) + (9 + 6)
    assert plain["unscored_head_fraction"] == 1 - (3 + 2 + 4 + 6) / (4 * 127)
    shared = workloads.padding("tldr", data.Layout("shared_prompt", completion_only=True), epoch)
    assert shared["padded_tokens"] == 2 * 128 and shared["real_tokens"] == (5 + 3 + 2) + (9 + 4 + 6)
    assert shared["unscored_head_fraction"] is None
    assert workloads.main(["--pairs", "16", "--batch_size", "4"]) == 0
