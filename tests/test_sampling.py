"""Tests for dpo_jax.sampling: KV-cache generation equals a full forward pass per token for every family (Mistral
past its window), log-probs equal teacher forcing, EOS and stop sequences, seeds, top-k / top-p, the host shell."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dpo_jax.data import WordTokenizer
from dpo_jax.models import apply_model, split_params
from dpo_jax.sampling import SamplingSettings, cut_at_stop, filter_logits, generate, sample, sample_tokens
from test_models import TINY_FAMILIES, tiny_model

PAD, NO_EOS, NEW = 31, -1, 6
PROMPTS = np.array([[5, 6, 7, 8], [9, 10, PAD, PAD], [11, PAD, PAD, PAD]], np.int32)
LENGTHS = np.array([4, 2, 1], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def full_logits(graphdef, params, tokens_BxT):
    """float32 logits [B, T, V] of one full forward pass (no cache)."""
    hidden, logits_fn = apply_model(graphdef, params, tokens_BxT)
    return logits_fn(hidden)


def full_forward_greedy(graphdef, params, eos_id=NO_EOS):
    """The oracle: rerun the whole model over the growing rows for every new token and append the argmax at each
    row's cursor (the foundation's sampler); rows stop after EOS."""
    tokens = np.full((len(LENGTHS), PROMPTS.shape[1] + NEW), PAD, np.int32)
    tokens[:, :PROMPTS.shape[1]] = PROMPTS
    ends = [None] * len(LENGTHS)
    for i in range(NEW):
        logits = np.asarray(full_logits(graphdef, params, jnp.asarray(tokens)))
        for row, length in enumerate(LENGTHS):
            if ends[row] is None:
                tokens[row, length + i] = logits[row, length + i - 1].argmax()
                if tokens[row, length + i] == eos_id:
                    ends[row] = length + i + 1
    return [tokens[row, :end or LENGTHS[row] + NEW].tolist() for row, end in enumerate(ends)]


def run(graphdef, params, eos_id=NO_EOS, **kwargs):
    kwargs.setdefault("rng", jax.random.key(0))
    kwargs.setdefault("temperature", 0.0)
    out = generate(graphdef, params, jnp.array(PROMPTS), jnp.array(LENGTHS), max_new_tokens=NEW, eos_id=eos_id,
                   pad_id=PAD, **kwargs)
    return jax.tree.map(np.asarray, out)


def check_rows(out, expected_rows):
    assert out.tokens.shape == out.completion_mask.shape == (len(LENGTHS), PROMPTS.shape[1] + NEW)
    for i, (length, seq) in enumerate(zip(LENGTHS, expected_rows)):
        np.testing.assert_array_equal(out.tokens[i, :len(seq)], seq)
        assert (out.tokens[i, len(seq):] == PAD).all()
        expected_mask = np.zeros(out.tokens.shape[1], np.int32)
        expected_mask[length:len(seq)] = 1
        np.testing.assert_array_equal(out.completion_mask[i], expected_mask)


def check_teacher_forced_logprobs(graphdef, params, out):
    """The returned log-probs are log_softmax of a full forward pass over the generated rows, at each token."""
    logp = np.asarray(jax.nn.log_softmax(full_logits(graphdef, params, jnp.asarray(out.tokens))))
    for row, col in zip(*np.nonzero(out.completion_mask)):
        np.testing.assert_allclose(out.logprobs[row, col], logp[row, col - 1, out.tokens[row, col]], atol=2e-5)
    assert (out.logprobs[out.completion_mask == 0] == 0).all()


@pytest.fixture(scope="module")
def llama():
    return split_params(tiny_model("llama"))


# Mistral's window is 3 positions, so every row decodes past it; GPT-2 uses learned positions, GPT-J interleaved
# partial rotary, GPT-NeoX the fused per-head q|k|v layout. Stacked blocks decode with a cache stacked over layers.
@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_greedy_kv_cache_equals_full_forward_argmax_and_teacher_forced_logprobs(family, scan_layers):
    graphdef, params = split_params(tiny_model(family, scan_layers=scan_layers))
    out = run(graphdef, params)
    check_rows(out, full_forward_greedy(graphdef, params))
    check_teacher_forced_logprobs(graphdef, params, out)


def test_eos_stops_a_row_midway(llama):
    # Pick as EOS a token row 0 first emits at its 3rd greedy step or later, so the row must stop there.
    free_run = full_forward_greedy(*llama)[0][LENGTHS[0]:]
    step = next((k for k in range(2, NEW) if free_run[k] not in free_run[:k]), None)
    assert step is not None, "tiny model repeats itself; pick another seed"
    eos = free_run[step]
    out = run(*llama, eos_id=eos)
    expected = full_forward_greedy(*llama, eos_id=eos)
    assert len(expected[0]) == LENGTHS[0] + step + 1 and expected[0][-1] == eos
    check_rows(out, expected)


def test_forced_eos_ends_every_row_at_once(llama):
    # A zero final-norm scale makes every logit 0, so argmax is token 0: use it as EOS.
    graphdef, params = llama
    params = jax.tree.map(jnp.array, params)  # a copy: leave the shared model untouched
    params["norm"]["scale"][...] = jnp.zeros_like(params["norm"]["scale"][...])
    check_rows(run(graphdef, params, eos_id=0), [list(PROMPTS[i, :n]) + [0] for i, n in enumerate(LENGTHS)])


def test_stop_sequence_ends_a_row_after_it(llama):
    free_run = full_forward_greedy(*llama)[0][LENGTHS[0]:]
    stop = tuple(free_run[2:4])  # a two-token sequence row 0 emits at its 3rd and 4th steps
    first = next(k for k in range(1, NEW) if tuple(free_run[k:k + 2]) == stop)
    out = run(*llama, stop_sequences=(stop,))
    assert out.completion_mask[0].sum() == first + 2
    np.testing.assert_array_equal(out.tokens[0, LENGTHS[0]:LENGTHS[0] + first + 2], free_run[:first + 2])
    assert cut_at_stop("good day. bad", ["bad", " day"]) == "good" and cut_at_stop("plain", ["x"]) == "plain"


def test_sampling_is_seeded_and_its_logprobs_are_teacher_forced(llama):
    a = run(*llama, temperature=1.0, rng=jax.random.key(1))
    b = run(*llama, temperature=1.0, rng=jax.random.key(1))
    c = run(*llama, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    for i, n in enumerate(LENGTHS):  # prompts preserved; no EOS, so every row generates NEW tokens
        np.testing.assert_array_equal(a.tokens[i, :n], PROMPTS[i, :n])
        assert a.completion_mask[i].sum() == NEW and a.completion_mask[i, n:n + NEW].all()
    check_teacher_forced_logprobs(*llama, a)


@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (0, 0.3), (3, 0.5)])
def test_top_k_and_top_p_never_emit_an_excluded_token(llama, top_k, top_p):
    graphdef, params = llama
    out = run(graphdef, params, temperature=1.5, top_k=top_k, top_p=top_p, rng=jax.random.key(4))
    logits = np.asarray(full_logits(graphdef, params, jnp.asarray(out.tokens)))
    for row, col in zip(*np.nonzero(out.completion_mask)):
        allowed = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits[row, col - 1] / 1.5)[None], top_p, top_k)))
        assert allowed[0, out.tokens[row, col]]
        if top_k:
            assert allowed.sum() <= top_k


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5, width=32), min_size=2, max_size=8, unique=True), st.integers(0, 8),
       st.floats(0.01, 1.0))
def test_filter_logits_keeps_the_top_k_then_the_smallest_nucleus(values, top_k, top_p):
    logits = np.asarray(values, np.float32)
    kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits)[None], top_p, top_k)))[0]
    order = np.argsort(-logits)
    candidates = order[:top_k] if top_k else order
    probs = np.exp(logits[candidates] - logits[candidates].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    expected = candidates[: max(int((mass_before < top_p).sum()), 1)]
    assert set(np.nonzero(kept)[0]) == set(expected.tolist())


def _sort_depths(jaxpr, depth=0):
    """How many `cond`s enclose each sort in a jaxpr (branches, scans and jits looked into)."""
    depths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sort":
            depths.append(depth)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            depths += _sort_depths(sub, depth + (eqn.primitive.name == "cond"))
    return depths


def test_the_vocabulary_is_sorted_only_when_a_filter_is_asked_for_with_one_compile_for_every_setting():
    logits = jax.random.normal(jax.random.key(0), (4, 4096)) * 3
    rng = jax.random.key(1)
    draw = jax.jit(sample_tokens)
    # No filter: exactly the plain categorical draw; the sort sits in a branch of its own inside the sampling branch.
    np.testing.assert_array_equal(draw(logits, rng, 0.7, 1.0, 0),
                                  jax.random.categorical(rng, logits / 0.7, axis=-1))
    jaxpr = jax.make_jaxpr(sample_tokens)(logits, rng, 0.7, 1.0, 0).jaxpr
    assert _sort_depths(jaxpr) and min(_sort_depths(jaxpr)) == 2
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    for _ in range(3):
        rng, key = jax.random.split(rng)
        tokens = np.asarray(draw(logits, key, 1.0, 1.0, 5))
        assert all(token in row for token, row in zip(tokens, top5))
    draw(logits, rng, 1.0, 0.5, 0)
    assert draw._cache_size() == 1  # temperature, top_p and top_k are traced: one compile serves a sweep


def test_tiny_top_p_is_greedy(llama):
    greedy = run(*llama)
    nucleus = run(*llama, temperature=1.0, top_p=1e-6, rng=jax.random.key(3))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_sample_batches_pads_and_decodes(llama):
    """Five prompts in batches of two (the last padded) give what one batch gives, decoded to text."""
    graphdef, params = llama
    tokenizer = WordTokenizer([f"w{i}" for i in range(29)])
    prompts = np.array([[3, 4, 5], [6, 7, 0], [8, 0, 0], [9, 10, 11], [12, 13, 0]], np.int32)
    lengths = np.array([3, 2, 1, 3, 2], np.int32)
    settings_ = SamplingSettings(max_new_tokens=4)
    whole = sample(graphdef, params, prompts, lengths, tokenizer=tokenizer, settings=settings_,
                   rng=jax.random.key(0), batch_size=5)
    batched = sample(graphdef, params, prompts, lengths, tokenizer=tokenizer, settings=settings_,
                     rng=jax.random.key(0), batch_size=2)
    np.testing.assert_array_equal(batched.tokens, whole.tokens)
    assert batched.tokens.shape == (5, 7) and len(batched.texts) == 5
    for text, row, mask in zip(batched.texts, batched.tokens, batched.completion_mask):
        assert text == tokenizer.decode(row[mask > 0].tolist())
    np.testing.assert_allclose(batched.sequence_logprobs, batched.logprobs.sum(-1))
