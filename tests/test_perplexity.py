"""The forgetting check (eval.perplexity_path): the held-out text in windows, its perplexity by hand-checkable cases,
and a run that logs it for the policy and π_ref at each evaluation."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import make_short_config
from dpo_jax import build, data, models, run
from dpo_jax import config as config_lib
from dpo_jax.metrics_writer import read_metrics
from dpo_jax.perplexity import PerplexityCheck, perplexity

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_hub_dataset import TEXTS, make_hub_cache  # noqa: E402

WORDS = data.WORDS


def test_text_windows(tmp_path):
    tokenizer = data.get_tokenizer("synthetic_words")
    path = tmp_path / "held_out.txt"
    path.write_text(" ".join(WORDS[:10]))
    tokens, mask = data.text_windows(str(path), tokenizer, 4)
    ids = tokenizer.encode(" ".join(WORDS[:10]))
    assert tokens.tolist() == [ids[0:4], ids[4:8], ids[8:10] + [tokenizer.pad_token_id] * 2]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]]
    assert len(data.text_windows(str(path), tokenizer, 4, max_windows=2)[0]) == 2
    path.write_text("")
    with pytest.raises(ValueError, match="held_out.txt: no text to score"):
        data.text_windows(str(path), tokenizer, 4)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="held_out.txt: cannot read the held-out text"):
        data.text_windows(str(path), tokenizer, 4)


def test_text_of_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = make_hub_cache(str(tmp_path / "hub"))
    tokenizer = data.get_tokenizer("synthetic_words")
    tokens, mask = data.text_windows("hf:acme/text_tiny?split=test", tokenizer, 4, cache_dir=cache)
    expected, expected_mask = data.text_windows(str(write_text(tmp_path, "\n\n".join(TEXTS))), tokenizer, 4)
    assert tokens.tolist() == expected.tolist() and mask.tolist() == expected_mask.tolist()
    with pytest.raises(ValueError, match=r"hf:acme/columns_tiny\?split=train: .*expected a row with a 'text' string"):
        data.text_windows("hf:acme/columns_tiny?split=train", tokenizer, 4, cache_dir=cache)


def write_text(directory, text):
    path = directory / "text.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model():
    config = make_short_config()
    tokenizer = data.get_tokenizer(config.data.tokenizer)
    model_config = build.model_config_of(config, tokenizer.vocab_size)
    graphdef, params = models.split_params(models.model_from_config(model_config, nnx.Rngs(0)))
    return graphdef, params, tokenizer


def test_uniform_model_has_the_vocabulary_size_as_perplexity(model):
    graphdef, params, tokenizer = model
    # The final norm's scale at 0 makes every logit 0 (tied embeddings): a uniform next-token distribution.
    uniform = jax.tree_util.tree_map_with_path(
        lambda kp, x: jnp.zeros_like(x) if models.param_path(kp) == ("norm", "scale") else x, params)
    tokens = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]], np.int32)
    mask = np.array([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    assert perplexity(graphdef, uniform, tokens, mask, batch_size=1, chunk_size=2) == pytest.approx(
        tokenizer.vocab_size, rel=1e-5)


def test_perplexity_is_the_exp_of_the_mean_masked_nll(model):
    graphdef, params, _ = model
    tokens = np.array([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0], [11, 12, 13, 14, 15]], np.int32)
    mask = np.array([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0]], np.float32)
    hidden, logits_fn = models.apply_model(graphdef, params, jnp.asarray(tokens))
    logits = np.asarray(logits_fn(hidden), np.float64)  # all at once, in float64: an independent path
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logprobs[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    expected = math.exp((nll * mask[:, 1:]).sum() / mask.sum())
    for batch_size in (1, 2, 3):  # the last batch padded with masked-out rows
        assert perplexity(graphdef, params, tokens, mask, batch_size, chunk_size=2) == pytest.approx(expected,
                                                                                                     rel=1e-5)
    check = PerplexityCheck(graphdef, tokens, mask, batch_size=2, chunk_size=2)
    assert check(params) == {"perplexity/policy": pytest.approx(expected, rel=1e-5)}
    assert set(check(params, params)) == {"perplexity/policy", "perplexity/reference"}


def test_run_logs_policy_and_reference_perplexity(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(WORDS[i % 30] for i in range(200)))
    config = make_short_config()
    config.mode = "dpo"
    config.dpo.learning_rate = 1e-2  # moves the policy within 5 steps
    config.eval.perplexity_path = str(text)
    config.train.eval_every = 5
    config_lib.validate(config)
    summary = run.train_and_evaluate(config, str(tmp_path / "run"))
    before, after = summary["dpo_initial"], summary["dpo"]
    assert before["perplexity/policy"] == pytest.approx(before["perplexity/reference"], rel=1e-6)  # π = π_ref
    assert after["perplexity/reference"] == pytest.approx(before["perplexity/reference"], rel=1e-6)
    assert after["perplexity/policy"] != pytest.approx(after["perplexity/reference"], rel=1e-3)
    logged = [r for r in read_metrics(str(tmp_path / "run")) if "eval/perplexity/policy" in r]
    assert [r["step"] for r in logged] == [5] and logged[0]["eval/perplexity/policy"] == after["perplexity/policy"]
    config.eval.perplexity_path = str(tmp_path / "absent.txt")
    with pytest.raises(config_lib.ConfigError, match=r"config.eval.perplexity_path = .*absent.txt' is invalid: "
                                                      "expected an existing text file"):
        config_lib.validate(config)
