"""Tests for dpo_jax.evaluate (the KL of samples, the evaluator's records, references) and the samples files."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dpo_jax.data import WordTokenizer
from dpo_jax.evaluate import reference_texts
from dpo_jax.sample_eval import SampleEvaluator, sequence_kl
from dpo_jax.metrics_writer import MetricsWriter, stage_sample_files
from dpo_jax.models import create_model, split_params
from dpo_jax.sampling import SamplingSettings, sample
from test_models import TINY
from test_sampling import full_logits

TOKENIZER = WordTokenizer([f"w{i}" for i in range(29)])
PROMPTS = np.array([[3, 4, 5], [6, 7, 0], [8, 0, 0]], np.int32)
LENGTHS = np.array([3, 2, 1], np.int32)


@pytest.fixture(scope="module")
def two_models():
    graphdef, policy = split_params(create_model("llama", nnx.Rngs(0), **TINY))
    _, reference = split_params(create_model("llama", nnx.Rngs(1), **TINY))
    return graphdef, policy, reference


def test_sequence_kl_equals_a_direct_computation(two_models):
    graphdef, policy, reference = two_models
    samples = sample(graphdef, policy, PROMPTS, LENGTHS, tokenizer=TOKENIZER, rng=jax.random.key(0), batch_size=2,
                     settings=SamplingSettings(max_new_tokens=5, temperature=1.0))
    kl = sequence_kl(graphdef, policy, reference, samples, batch_size=2, chunk_size=3)
    log_p = np.asarray(jax.nn.log_softmax(full_logits(graphdef, policy, samples.tokens)), np.float64)
    log_q = np.asarray(jax.nn.log_softmax(full_logits(graphdef, reference, samples.tokens)), np.float64)
    per_position = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # KL(π(·|prefix) ‖ π_ref(·|prefix)) at each position
    expected = [per_position[i, np.nonzero(m)[0] - 1].sum() for i, m in enumerate(samples.completion_mask)]
    np.testing.assert_allclose(kl, expected, rtol=1e-4)
    assert (kl > 0).all()
    assert sequence_kl(graphdef, policy, policy, samples, 2, 3) == pytest.approx(np.zeros(3), abs=1e-5)


def test_evaluator_records_and_means(two_models):
    graphdef, policy, reference = two_models
    evaluator = SampleEvaluator(graphdef, PROMPTS, LENGTHS, TOKENIZER, SamplingSettings(max_new_tokens=4),
                                reward=lambda prompts, texts: np.array([len(t) for t in texts], float),
                                rng=jax.random.key(0), batch_size=2)
    means, records = evaluator(policy, reference)
    assert [r["prompt"] for r in records] == ["w0 w1 w2", "w3 w4", "w5"]  # ids 0-2 are pad, eos, unk
    for name in ("kl", "reward"):
        assert means[name] == pytest.approx(np.mean([r[name] for r in records]))
    assert means["completion_length"] == np.mean([r["length"] for r in records]) == 4
    assert all(r["reward"] == len(r["completion"]) for r in records)
    no_reference, records = evaluator(policy, None)
    assert "kl" not in no_reference and "kl" not in records[0]


def test_samples_files_are_cut_back_on_resume(tmp_path):
    """A resumed stage drops the samples written after the checkpoint it resumes from, as its metrics."""
    writer = MetricsWriter(str(tmp_path))
    for step in (0, 10, 20):
        writer.write_samples("dpo", step, [{"prompt": "p", "completion": f"c{step}", "reward": 1.0}])
    writer.truncate("dpo", 10)
    writer.close()
    assert [step for step, _ in stage_sample_files(str(tmp_path), "dpo")] == [0, 10]
    with open(tmp_path / "samples" / "dpo" / "step_10.jsonl") as f:
        assert json.loads(f.readline())["completion"] == "c10"


def test_reference_texts_by_prompt_and_their_errors(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps({"prompt": "a b ", "reference": "r1"}) + "\n" + json.dumps({"prompt": "c", "reference": "r2"}) + "\n")
    assert reference_texts(str(path), ["c", " a b"]) == ["r2", "r1"]
    with pytest.raises(ValueError, match=r"refs.jsonl: no reference for 1 of 2 eval prompts, e.g. 'd'"):
        reference_texts(str(path), ["c", "d"])
    path.write_text('{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"refs.jsonl:1: expected an object with 'prompt' and 'reference'"):
        reference_texts(str(path), ["c"])
