"""Batch layouts for speed: shared-prompt rows and completion-only log-probs give the plain layout's log-probs
(within 1e-5) and gradients (within 1e-4 relative), for every kind of position and attention the families have."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import data, losses, models, step
from dpo_jax.data import pipeline

VOCAB = 61
PLAIN = data.Layout()
LAYOUTS = {"completion_only": data.Layout(completion_only=True), "shared_prompt": data.Layout("shared_prompt"),
           "packed": data.Layout("packed")}
FAMILIES = {  # rotary positions, a sliding window over positions, learned positions
    "llama": dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64),
    "mistral": dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                    sliding_window=5),
    "gpt2": dict(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, max_position_embeddings=64),
}


def random_pairs(n=6, seed=0, max_prompt=11, max_completion=8):
    """Encoded pairs of varied lengths (prompts and completions down to one token)."""
    rng = np.random.default_rng(seed)
    ids = lambda low, high: rng.integers(1, VOCAB, rng.integers(low, high + 1)).astype(np.int32)  # noqa: E731
    return [{"prompt": ids(1, max_prompt), "chosen": ids(1, max_completion), "rejected": ids(1, max_completion)}
            for _ in range(n)]


def batch_of(examples, layout, max_length=20):
    return data.collate(examples, data.length_buckets(max_length, pack=layout.pack), 0, layout=layout)


def make_model(family, seed=0):
    return models.split_params(models.create_model(family, nnx.Rngs(seed), vocab_size=VOCAB, **FAMILIES[family]))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layout_gives_the_plain_log_probs(family):
    graphdef, params = make_model(family)
    examples = random_pairs()
    sequence_logps = jax.jit(step.make_pair_logps(graphdef, chunk_size=5))
    expected = np.asarray(sequence_logps(params, batch_of(examples, PLAIN)))
    assert expected[1].tolist() == [[len(e[k]) for e in examples] for k in ("chosen", "rejected")]  # the lengths
    for name, layout in LAYOUTS.items():
        np.testing.assert_allclose(sequence_logps(params, batch_of(examples, layout)), expected, rtol=0, atol=1e-5,
                                   err_msg=name)


def test_every_layout_gives_the_plain_gradient():
    graphdef, params = make_model("llama")
    examples = random_pairs(seed=1)
    loss_fn = step.make_loss_fn(graphdef, "dpo", losses.LossParams(beta=0.5), chunk_size=5)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, ref_params, b)[0]))
    expected = grad_fn(params, batch_of(examples, PLAIN))
    for name, layout in LAYOUTS.items():
        grads = grad_fn(params, batch_of(examples, layout))
        for path, got, want in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(grads),
                                   jax.tree.leaves(expected)):
            scale = float(jnp.abs(want).max()) + 1e-12
            assert float(jnp.abs(got - want).max()) <= 1e-4 * scale, (name, jax.tree_util.keystr(path[0]))


def test_shared_prompt_rows_hold_both_completions_after_one_prompt():
    example = {"prompt": np.array([5, 6, 7], np.int32), "chosen": np.array([8, 9], np.int32),
               "rejected": np.array([10, 11, 12], np.int32)}
    batch = data.collate([example], (10,), pad_id=0, layout=data.Layout("shared_prompt"))
    assert isinstance(batch, data.SharedPromptBatch)
    rows = batch.rows
    assert rows.tokens_BxT.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 0, 0]]
    assert rows.positions_BxT.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 0]]  # rejected continues the prompt
    assert rows.branch_ids_BxT.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 3, 3]]
    # Both completions' first tokens are predicted from the prompt's last position (2); the block pads to 8.
    assert rows.targets_BxN.tolist() == [[8, 9, 10, 11, 12, 0, 0, 0]]
    assert rows.sources_BxN.tolist() == [[2, 3, 2, 5, 6, 0, 0, 0]]
    assert rows.slots_BxN.tolist() == [[0, 0, 1, 1, 1, -1, -1, -1]]
    assert rows.loss_mask_BxT is None and batch.reference_chosen is None and batch.weight is None


def test_attention_branches_see_the_prompt_and_themselves_only():
    branches = jnp.array([[0, 0, 1, 1, 2, 2]])
    mask = np.asarray(models.layers.attention_mask(jnp.array([[0, 1, 2, 3, 2, 3]]), jnp.zeros((1, 6), jnp.int32),
                                                   branch_ids_BxT=branches))[0, 0]
    assert mask[5].tolist() == [True, True, False, False, True, True]  # rejected: prompt and itself, not chosen
    assert mask[3].tolist() == [True, True, True, True, False, False]
    assert mask[1].tolist() == [True, True, False, False, False, False]


def test_completion_only_kto_equals_all_positions():
    """Unpaired rows (and KTO's mismatched kl rows, cut to the row) score the same completion-only."""
    graphdef, params = make_model("llama", seed=1)
    examples = [{"prompt": e["prompt"], "completion": e["chosen"], "label": i % 2 == 0}
                for i, e in enumerate(random_pairs(seed=3))]
    loss_fn = step.make_loss_fn(graphdef, "kto", losses.LossParams(), chunk_size=4)
    ref_params = jax.tree.map(lambda x: x * 1.1, params)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, ref_params, b)[0]))
    (loss, grads), (loss_co, grads_co) = (
        value_and_grad(params, data.collate(examples, (24,), 0, layout=layout))
        for layout in (PLAIN, data.Layout("shared_prompt"))  # shared_prompt: unpaired rows stay one per completion
    )
    batch = data.collate(examples, (24,), 0, layout=data.Layout("shared_prompt"))
    assert isinstance(batch, data.UnpairedBatch) and batch.completion.completion_only and batch.kl.completion_only
    np.testing.assert_allclose(loss_co, loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_co), jax.tree.leaves(grads)):
        assert float(jnp.abs(got - want).max()) <= 1e-4 * (float(jnp.abs(want).max()) + 1e-12)


def test_shared_prompt_shards_agree_on_shapes_across_processes():
    """Each process pads its share to the global batch's row length and block size."""
    examples = data.Examples(random_pairs(n=16, seed=5), paired=True, report={})
    layout = data.Layout("shared_prompt")
    buckets = data.length_buckets(20, pack="shared_prompt")
    whole = data.TrainBatches(examples, batch_size=8, seed=1, buckets=buckets, pad_id=0, layout=layout)
    shares = [data.TrainBatches(examples, batch_size=8, seed=1, buckets=buckets, pad_id=0, layout=layout,
                                process_index=p, process_count=2) for p in range(2)]
    for step_index in range(3):
        paths, _ = jax.tree_util.tree_flatten_with_path(whole.batch_at(step_index))
        parts = [jax.tree.leaves(s.batch_at(step_index)) for s in shares]
        assert len(paths) == len(parts[0]) == len(parts[1]) == 6  # tokens, positions, branch ids and the block
        for (path, value), first, second in zip(paths, *parts):
            key = jax.tree_util.keystr(path)
            assert first.shape == second.shape == (4, *value.shape[1:]), key
            np.testing.assert_array_equal(np.stack([first, second], 1).reshape(value.shape), value, err_msg=key)


def test_length_buckets_for_shared_rows_reach_twice_max_length():
    assert data.length_buckets(512, pack="shared_prompt") == (128, 256, 384, 512, 640, 768, 896, 1024)
    assert data.length_buckets(64, (100, 200), pack="shared_prompt") == (100, 128)
    with pytest.raises(ValueError, match="pack must be one of"):
        data.Layout("interleaved")


def test_packed_rows_hold_several_pairs_each_its_own_segment():
    pairs = [{"prompt": np.array(p, np.int32), "chosen": np.array(c, np.int32), "rejected": np.array(r, np.int32)}
             for p, c, r in (([5, 6], [7], [8, 9]), ([10, 11, 12], [13, 14], [15]), ([16], [17], [18]))]
    # Pair lengths 5, 6, 3 in rows of 12: first-fit decreasing puts pair 1 (6), then 0 (5) in row 0; pair 2 (3) does
    # not fit the 1 token left, so row 1.
    assert data.pack_pairs([5, 6, 3], 12) == [[0, 1], [2]]
    batch = data.collate(pairs, (12,), pad_id=0, layout=data.Layout("packed"))
    assert isinstance(batch, data.PackedBatch) and batch.pair_ids.tolist() == [0, 1, 2]
    rows = batch.rows
    assert rows.tokens_BxT.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0], [16, 17, 18] + [0] * 9]
    assert rows.segment_ids_BxT.tolist() == [[0] * 5 + [1] * 6 + [-1], [0] * 3 + [-1] * 9]
    assert rows.positions_BxT.tolist()[0] == [0, 1, 2, 2, 3, 0, 1, 2, 3, 4, 3, 0]  # restart per pair
    assert rows.branch_ids_BxT.tolist()[0] == [0, 0, 1, 2, 2, 0, 0, 0, 1, 1, 2, 3]
    # Slot p: pair p's chosen, 3 + p its rejected; first tokens predicted from the pair's prompt end.
    assert rows.slots_BxN.tolist()[0] == [0, 3, 3, 1, 1, 4, -1, -1]
    assert rows.targets_BxN.tolist()[0][:6] == [7, 8, 9, 13, 14, 15]
    assert rows.sources_BxN.tolist()[0][:6] == [1, 1, 3, 7, 8, 7]
    assert rows.slots_BxN.tolist()[1][:2] == [2, 5]
    # Rows padded to a multiple (the process's data-parallel devices) with empty rows.
    padded = data.collate(pairs, (12,), pad_id=0, layout=data.Layout("packed", row_multiple=4)).rows
    assert padded.tokens_BxT.shape == (4, 12) and (padded.segment_ids_BxT[2:] == -1).all()
    assert (padded.slots_BxN[2:] == -1).all()


def test_packing_is_deterministic_and_shares_shapes_across_processes():
    examples = random_pairs(n=8, seed=9)
    layout = data.Layout("packed")
    buckets = data.length_buckets(20, pack="packed")
    first, again = (data.collate(examples, buckets, 0, layout=layout) for _ in range(2))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    shares = [pipeline._collate_share(examples, buckets, 0, slice(i, None, 2), layout) for i in range(2)]
    assert shares[0].rows.tokens_BxT.shape == shares[1].rows.tokens_BxT.shape
    assert shares[0].rows.slots_BxN.shape == shares[1].rows.slots_BxN.shape
    assert first.rows.tokens_BxT.shape[0] < len(examples)  # several pairs to a row
