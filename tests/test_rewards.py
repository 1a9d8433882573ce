"""Rewards of generated samples: HF sequence classifiers in JAX against transformers' scores, the task's ground
truth, python: functions, and the errors each form gives."""

import json
import os
import shutil

import numpy as np
import pytest

from dpo_jax import data, rewards

REWARD_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reward")
SOURCE_WITH_TRUTH = "synthetic_sentiment"


def fixture_dir(name):
    return os.path.join(REWARD_FIXTURES, name)


def golden(name):
    with open(os.path.join(fixture_dir(name), "golden.json")) as f:
        pairs = json.load(f)
    return [p["prompt"] for p in pairs], [p["completion"] for p in pairs], np.array([p["score"] for p in pairs])


@pytest.fixture(scope="module")
def classifiers():
    """Both fixtures loaded once, with batches that hold every golden text (padded to a common length)."""
    return {name: rewards.make_reward(f"hf:{fixture_dir(name)}", "file", batch_size=8) for name in ("gpt2", "llama")}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_classifier_scores_match_transformers(classifiers, name):
    prompts, completions, expected = golden(name)
    scores = classifiers[name](prompts, completions)
    assert scores.dtype == np.float64 and scores.shape == expected.shape
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # Scores come back in the texts' order, whatever order the batches run them in.
    np.testing.assert_allclose(classifiers[name](prompts[::-1], completions[::-1]), expected[::-1], atol=1e-4)
    np.testing.assert_allclose(classifiers[name](prompts[1:2], completions[1:2]), expected[1:2], atol=1e-4)


def test_classifier_label_choice(classifiers):
    prompts, completions, p_positive = golden("gpt2")
    negative = rewards.make_reward(f"hf:{fixture_dir('gpt2')}#NEGATIVE", "file", batch_size=8)
    np.testing.assert_allclose(negative(prompts, completions), 1 - p_positive, atol=1e-4)
    assert classifiers["gpt2"]([], []).shape == (0,)
    id2label = {"0": "neg", "1": "Positive", "2": "neutral"}
    assert rewards.label_index(id2label, None, "x") == 1  # POSITIVE in any case, by default
    assert rewards.label_index(id2label, "NEG", "x") == 0  # a named label, in any case
    assert rewards.label_index({"0": "LABEL_0", "1": "LABEL_1"}, None, "x") == 1  # else the last label


def test_classifier_truncates_long_texts_on_the_left(classifiers):
    prompts, completions, expected = golden("gpt2")
    tail = "the and was really " * 40  # far beyond the 32 positions: only the end of the text counts
    scores = classifiers["gpt2"](["anything at all " + tail, "something else entirely " + tail], ["", ""])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)


def copy_fixture(tmp_path, name):
    directory = tmp_path / name
    shutil.copytree(fixture_dir(name), directory)
    return directory


def edit_config(directory, **fields):
    with open(directory / "config.json") as f:
        config = json.load(f)
    config.update(fields)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)


def test_classifier_errors_name_the_path_and_the_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local directory"):
        rewards.make_reward(f"hf:{tmp_path / 'absent'}", "file")
    with pytest.raises(FileNotFoundError, match="local"):
        rewards.make_reward("hf:someone/sentiment-model", "file")  # a Hub id: never fetched
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*no config\.json.*ForSequenceClassification"):
        rewards.make_reward(f"hf:{tmp_path / 'empty'}", "file")

    causal = copy_fixture(tmp_path, "gpt2")
    edit_config(causal, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"gpt2.*'GPT2LMHeadModel'.*GPT2ForSequenceClassification"):
        rewards.make_reward(f"hf:{causal}", "file")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"architectures": ["T5ForSequenceClassification"]}))
    with pytest.raises(ValueError, match="T5ForSequenceClassification"):
        rewards.make_reward(f"hf:{tmp_path / 't5'}", "file")

    with pytest.raises(ValueError, match=r"label 'NEUTRAL' is not in config.json's id2label \['NEGATIVE', 'POSITIVE'"):
        rewards.make_reward(f"hf:{fixture_dir('gpt2')}#NEUTRAL", "file")


def test_classifier_without_score_head_fails(tmp_path):
    from safetensors.numpy import load_file, save_file

    headless = copy_fixture(tmp_path, "llama")
    tensors = load_file(str(headless / "model.safetensors"))
    del tensors["score.weight"]
    save_file(tensors, str(headless / "model.safetensors"))
    with pytest.raises(ValueError, match=r"llama.*LlamaForSequenceClassification.*no tensor\(s\) \['score.weight'\]"):
        rewards.make_reward(f"hf:{headless}", "file")


def test_task_reward_is_the_sources_ground_truth():
    truth = data.ground_truth_reward_fn(SOURCE_WITH_TRUTH)
    completions = ["great loved excellent", "awful boring", "the and", ""]
    for spec in ("", "task"):
        scores = rewards.make_reward(spec, SOURCE_WITH_TRUTH)(["ignored"] * 4, completions)
        assert scores.dtype == np.float64
        np.testing.assert_array_equal(scores, [truth(c) for c in completions])
    assert rewards.make_reward("", "file") is None
    with pytest.raises(ValueError, match="'file' has no ground-truth reward"):
        rewards.make_reward("task", "file")


SCORER = '''
import math

def count_letters(texts):
    return [sum(ch.isalpha() for ch in text) for text in texts]

def not_finite(texts):
    return [math.nan if "bad" in text else 1.0 for text in texts]

def too_few(texts):
    return [1.0] * (len(texts) - 1)

def words(texts):
    return [text.split() for text in texts]
'''


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    (tmp_path / "reward_scorers.py").write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "reward_scorers"


def test_python_reward_scores_prompt_plus_completion(scorer_module):
    reward = rewards.make_reward(f"python:{scorer_module}:count_letters", "file")
    scores = reward(["ab ", "", "x1"], ["cd", "e", "!"])
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [4, 1, 1])


def test_python_reward_errors_name_the_spec(scorer_module):
    with pytest.raises(ValueError, match="python:no_such_module_here:f"):
        rewards.make_reward("python:no_such_module_here:f", "file")
    with pytest.raises(ValueError, match="cannot import missing"):
        rewards.make_reward(f"python:{scorer_module}:missing", "file")
    with pytest.raises(ValueError, match="expected python:package.module:function"):
        rewards.make_reward(f"python:{scorer_module}", "file")
    not_finite = rewards.make_reward(f"python:{scorer_module}:not_finite", "file")
    with pytest.raises(ValueError, match=r"not_finite'.*score nan of text 1 is not finite"):
        not_finite(["", "", ""], ["good", "bad", "bad"])
    with pytest.raises(ValueError, match=r"too_few'.*shape \(2,\) for 3 texts"):
        rewards.make_reward(f"python:{scorer_module}:too_few", "file")(["a", "b", "c"], ["", "", ""])
    with pytest.raises(ValueError, match="words'.*not one float per text"):
        rewards.make_reward(f"python:{scorer_module}:words", "file")(["a b", "c"], ["", ""])


def test_unknown_spec_lists_the_forms():
    forms = r"unknown reward.*\"task\".*hf:PATH\[#LABEL\].*python:package.module:function"
    for spec in ("sentiment", "hf", "judge:gpt4"):
        with pytest.raises(ValueError, match=forms):
            rewards.make_reward(spec, SOURCE_WITH_TRUTH)


def test_check_reward_spec_loads_nothing():
    for spec in ("", "task", "hf:/no/such/dir#POSITIVE", "python:no_such_module:f"):
        rewards.check_reward_spec(spec, SOURCE_WITH_TRUTH)
    for spec, message in [("task", "no ground-truth"), ("hf:", "no checkpoint directory"),
                          ("python:module_only", "expected python:"), ("other", "unknown reward")]:
        with pytest.raises(ValueError, match=message):
            rewards.check_reward_spec(spec, "file")
