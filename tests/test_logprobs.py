"""Completion-only float32 sequence log-probs: prompt and padding ignored, chunking changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import sequence_logprobs, token_kl, token_logprobs

B, T, D, V = 3, 10, 8, 13


def setup(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(keys[0], (B, T, D))
    unembed = jax.random.normal(keys[1], (D, V))
    tokens = jax.random.randint(keys[2], (B, T), 0, V)
    # Row 0: prompt 0..2, completion 3..6, padding 7..9; row 1: completion 5..9; row 2: completion 1..2.
    mask = np.zeros((B, T), np.float32)
    mask[0, 3:7] = 1
    mask[1, 5:] = 1
    mask[2, 1:3] = 1
    return hidden, (lambda h: h @ unembed), tokens, jnp.array(mask), unembed


def naive_sequence_logprobs(hidden, unembed, tokens, mask):
    logprobs = jax.nn.log_softmax(np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64), axis=-1)
    total = np.zeros(B)
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                total[b] += logprobs[b, t - 1, tokens[b, t]]
    return total


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 128])
def test_matches_naive_sum_for_any_chunk_size(chunk_size):
    hidden, logits_fn, tokens, mask, unembed = setup()
    logps, lengths = sequence_logprobs(hidden, logits_fn, tokens, mask, chunk_size)
    np.testing.assert_allclose(logps, naive_sequence_logprobs(hidden, unembed, tokens, mask), rtol=1e-5)
    np.testing.assert_array_equal(lengths, [4, 5, 2])
    assert logps.dtype == jnp.float32


def test_prompt_and_padding_tokens_change_nothing():
    hidden, logits_fn, tokens, mask, _ = setup()
    before, _ = sequence_logprobs(hidden, logits_fn, tokens, mask, 4)
    changed = jnp.where(mask == 0, (tokens + 5) % V, tokens)  # every non-completion token replaced
    after, _ = sequence_logprobs(hidden, logits_fn, changed, mask, 4)
    np.testing.assert_array_equal(before, after)
    # ... while a completion token does change the sum.
    moved, _ = sequence_logprobs(hidden, logits_fn, tokens.at[0, 4].set((tokens[0, 4] + 1) % V), mask, 4)
    assert moved[0] != before[0]


def test_bfloat16_logits_are_summed_in_float32():
    hidden, _, tokens, mask, unembed = setup()
    logps, _ = sequence_logprobs(hidden, lambda h: (h @ unembed).astype(jnp.bfloat16), tokens, mask)
    assert logps.dtype == jnp.float32


def test_gradient_through_chunks_matches_unchunked():
    hidden, _, tokens, mask, unembed = setup()

    def total(unembed, chunk_size):
        return sequence_logprobs(hidden, lambda h: h @ unembed, tokens, mask, chunk_size)[0].sum()

    np.testing.assert_allclose(jax.grad(total)(unembed, 3), jax.grad(total)(unembed, 128), rtol=1e-5, atol=1e-6)


def test_token_kl_is_zero_for_same_model_and_matches_definition():
    hidden, logits_fn, tokens, _, unembed = setup()
    np.testing.assert_allclose(token_kl(hidden, logits_fn, hidden, logits_fn, 4), 0.0, atol=1e-6)
    other = hidden[::-1]
    kl = token_kl(hidden, logits_fn, other, logits_fn, 4)
    logp = jax.nn.log_softmax(hidden[:, :-1] @ unembed)
    logq = jax.nn.log_softmax(other[:, :-1] @ unembed)
    np.testing.assert_allclose(kl, (jnp.exp(logp) * (logp - logq)).sum(-1), rtol=1e-5, atol=1e-6)
    assert token_logprobs(hidden, logits_fn, tokens).shape == (B, T - 1)
