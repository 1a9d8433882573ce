"""Iterative (online) DPO, mode = iterative_dpo: pairing rules by hand, the prompt schedule, the encoding of generated
pairs, a two-round run end to end (files, metrics, plot), a run killed while scoring and again inside a round's
training that resumes to the uninterrupted run's params bitwise, the online shape (one step per round), and the stops:
no usable pairs, a reward that cannot score, a judge that keeps failing, bad config values."""

import json
import os
import re
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import _DieAt, make_short_config
from test_judges import JudgeServer, chat_response

from dpo_jax import checkpoint, config as config_lib, data, iterative, judges, run
from dpo_jax.data.generated import encode_generated_pair
from dpo_jax.errors import UserError
from dpo_jax.metrics_writer import read_metrics

ROUNDS, STEPS = 2, 3  # per round


def make_iterative_config():
    """The short demo config in mode iterative_dpo from a random model: 2 rounds of 16 prompts × 4 samples, 3 steps
    each, a checkpoint every 2 steps (so a kill inside round 2 resumes mid-round)."""
    config = make_short_config()
    config.mode = "iterative_dpo"
    config.data.update(num_train_pairs=64, num_eval_pairs=16, num_eval_prompts=8)
    config.train.update(batch_size=8, eval_batch_size=16, checkpoint_every=2, eval_every=100)
    config.dpo.update(warmup_steps=0, learning_rate=1e-3)
    config.iterative.update(rounds=ROUNDS, prompts_per_round=16, samples_per_prompt=4, steps_per_round=STEPS,
                            reference="previous")
    return config


def nan_reward(texts):
    """A reward that cannot score (NaN): the round stops naming the spec."""
    return [float("nan")] * len(texts)


# --- pairing, prompts, encoding (no model) ---------------------------------------------------------------------------

def test_best_vs_worst_pairs_drop_ties_and_pairs_under_the_margin():
    scores = np.array([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0], [0.0, 0.5, 0.2]])
    pairs, counts = iterative.build_pairs(scores, "best_vs_worst", margin=1.0)
    assert pairs == [(1, 0)]  # prompt 0: sample 1 (3) over sample 0 (1); prompt 1 ties; prompt 2: 0.5 < margin
    assert counts == {"ties": 1, "below_margin": 1}


def test_all_pairs_orders_each_two_samples_by_score():
    scores = np.array([[1.0, 3.0, 1.0]])
    pairs, counts = iterative.build_pairs(scores, "all_pairs", margin=0.0)
    assert pairs == [(1, 0), (1, 2)] and counts == {"ties": 1, "below_margin": 0}


def test_round_prompts_take_every_prompt_once_per_pass_and_depend_only_on_seed_and_round():
    first = [iterative.round_prompt_indices(10, 4, seed=0, round_=r) for r in (1, 2, 3, 4, 5)]
    assert all(len(indices) == 4 for indices in first)
    assert sorted(np.concatenate(first[:2] + [first[2][:2]]).tolist()) == list(range(10))  # the first pass
    assert sorted(np.concatenate([first[2][2:], first[3], first[4]]).tolist()) == list(range(10))  # the second
    assert np.array_equal(iterative.round_prompt_indices(10, 4, seed=0, round_=3), first[2])
    assert not np.array_equal(iterative.round_prompt_indices(10, 4, seed=1, round_=1), first[0])


def test_a_generated_pair_keeps_its_tokens_and_ends_each_completion_with_one_eos():
    eos = 2
    pair = encode_generated_pair([5, 6], [7, 8, eos], [], eos_id=eos, max_length=8, max_prompt_length=4)
    assert pair["prompt"].tolist() == [5, 6] and pair["chosen"].tolist() == [7, 8, eos]
    assert pair["rejected"].tolist() == [eos] and not pair["truncated"]  # stopping at once is a completion too
    assert encode_generated_pair([5, 6], [7, 8, 9, 9, 9, 9, 9], [7], eos_id=eos, max_length=6,
                                 max_prompt_length=2)["chosen"].tolist() == [7, 8, 9, 9]
    with pytest.raises(data.BadRecord, match="identical"):
        encode_generated_pair([5], [7], [7, eos], eos_id=eos, max_length=8, max_prompt_length=4)


def test_a_round_with_no_usable_pair_stops_with_the_counts():
    config = make_iterative_config()
    samples = [{"prompt": "p", "completion": "c", "prompt_ids": [1], "completion_ids": [3 + i]} for i in range(8)]
    with pytest.raises(iterative.NoUsablePairs, match="2 prompts, 8 samples, 2 ties, 0 under"):
        iterative.round_pairs(config, data.get_tokenizer("synthetic_words"), samples, np.ones((2, 4)))


def test_fewer_pairs_than_a_batch_are_repeated_to_fill_it_and_counted():
    config = make_iterative_config()
    samples = [{"prompt": "p", "completion": "c", "prompt_ids": [1], "completion_ids": [3 + i]} for i in range(4)]
    examples, records, counts = iterative.round_pairs(config, data.get_tokenizer("synthetic_words"), samples,
                                                      np.array([[0.0, 1.0, 2.0, 0.0]]))
    assert counts["pairs"] == 1 and counts["repeated"] == config.train.batch_size - 1
    assert len(examples) == config.train.batch_size and records[0]["chosen_score"] == 2.0


def test_a_reward_that_cannot_score_stops_the_round_naming_it(tmp_path):
    config = make_iterative_config()
    config.iterative.reward = "python:test_iterative:nan_reward"
    score = iterative.make_scorer(config, str(tmp_path))
    samples = [{"prompt": "p ", "completion": "c"}] * 4
    with pytest.raises(UserError, match="round 3: config.iterative.reward = 'python:test_iterative:nan_reward' "
                                        "could not score"):
        score(3, samples)


class _Judge:
    """Prefers the longer completion; ties equal lengths; fails when told to."""

    def __init__(self, fail=False):
        self.fail = fail

    def judge(self, comparisons):
        if self.fail:
            raise judges.JudgeError("http://judge still failing after 7 attempts: HTTP 503")
        return [judges.FIRST if len(c.first) > len(c.second) else judges.SECOND if len(c.second) > len(c.first)
                else judges.TIE for c in comparisons]


def test_judge_scores_count_wins_against_the_prompts_other_samples():
    samples = [{"prompt": "p", "completion": text} for text in ("a", "aaa", "aa", "aa")]
    assert iterative.judge_scores(_Judge(), 1, samples, 4, "/w").tolist() == [[0.0, 3.0, 1.5, 1.5]]


def test_a_judge_failing_beyond_its_retries_stops_the_round_pointing_at_its_verdict_cache():
    samples = [{"prompt": "p", "completion": text} for text in ("a", "aa")]
    with pytest.raises(judges.JudgeError, match="round 2: the judge failed: .*HTTP 503.* cached in "
                                                "/w/judge_cache.jsonl: rerun the same command to resume"):
        iterative.judge_scores(_Judge(fail=True), 2, samples, 2, "/w")


def test_an_llm_judge_failing_mid_round_resumes_from_its_verdict_cache(tmp_path, monkeypatch):
    """Three samples of one prompt: the endpoint answers two comparisons, then fails; the rerun asks only the third,
    and each sample's score is its wins (the fake judge prefers the longer summary)."""
    server = JudgeServer()
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    answered, lock = [], threading.Lock()

    def longer_wins(payload, fail_after=None):
        first, second = re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nFIRST", payload["messages"][0]["content"],
                                  re.DOTALL).groups()
        with lock:
            if fail_after is not None and len(answered) >= fail_after:
                return 503, {}, "overloaded"
            answered.append((first, second))
        label = "A" if len(first) > len(second) else "B"
        return chat_response(f"Comparison: {label} says more.\nPreferred: {label}")

    monkeypatch.setenv("ITERATIVE_TEST_KEY", "sk-test")
    config = make_iterative_config()
    config.iterative.update(judge="llm", judge_url=server.url, judge_model="m", judge_api_key_env="ITERATIVE_TEST_KEY",
                            judge_max_retries=0, samples_per_prompt=3)
    config_lib.validate(config)
    samples = [{"prompt": "post", "completion": text} for text in ("a b", "a b c d", "a")]
    try:
        server.reset(lambda payload: longer_wins(payload, fail_after=2))
        with pytest.raises(judges.JudgeError, match="round 1: the judge failed: .*HTTP 503.*rerun"):
            iterative.make_scorer(config, str(tmp_path))(1, samples)
        assert len(answered) == 2
        server.reset(longer_wins)
        scores = iterative.make_scorer(config, str(tmp_path))(1, samples)
        assert len(server.requests) == 1 and len(answered) == 3
        assert scores.tolist() == [[1.0, 2.0, 0.0]]
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


@pytest.mark.parametrize("key, value, message", [
    ("samples_per_prompt", 1, "an integer >= 2"),
    ("pairs", "best", "one of best_vs_worst, all_pairs"),
    ("reference", "moving", "one of fixed, previous"),
    ("margin", -1.0, "a finite number >= 0"),
    ("reward", "bogus", "unknown reward"),
])
def test_bad_iterative_values_are_refused_naming_the_key(key, value, message):
    config = make_iterative_config()
    config.iterative[key] = value
    with pytest.raises(config_lib.ConfigError, match=f"iterative.{key}.*{message}"):
        config_lib.validate(config)


def test_a_source_without_ground_truth_needs_a_reward_or_a_judge(tmp_path):
    config = make_iterative_config()
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    config.data.update(source="file", path=str(path), tokenizer="synthetic_words")
    with pytest.raises(config_lib.ConfigError, match="iterative.reward.*has no ground-truth reward"):
        config_lib.validate(config)


# --- end to end ------------------------------------------------------------------------------------------------------

def final_params(workdir, round_):
    directory = checkpoint.stage_directory(iterative.round_directory(workdir, round_), "dpo")
    step = max(int(name) for name in os.listdir(directory) if name.isdigit())
    state = ocp.tree.to_flat_dict(ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state")))
    return step, state


def comparable(records):
    """metrics.jsonl without what timing changes."""
    return [{k: v for k, v in r.items() if k != "examples_per_second" and not k.endswith("seconds")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("iterative"))
    return workdir, run.train_and_evaluate(make_iterative_config(), workdir)


def test_each_round_writes_its_samples_scores_pairs_metrics_and_the_reward_vs_kl_plot(uninterrupted):
    workdir, summary = uninterrupted
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for round_ in (1, 2):
        directory = iterative.round_directory(workdir, round_)
        samples = [json.loads(line) for line in open(os.path.join(directory, iterative.SAMPLES))]
        assert len(samples) == 16 * 4 and all("score" in s for s in samples)
        # The demo's task reward, recomputed from the text: the scores are the samples' own.
        assert [s["score"] for s in samples] == [data.ground_truth_reward(s["completion"]) for s in samples]
        pairs = [json.loads(line) for line in open(os.path.join(directory, iterative.PAIRS))]
        report = json.load(open(os.path.join(directory, iterative.PAIRS_REPORT)))
        assert len(pairs) == report["pairs"] == 16 - report["ties"] and report["samples"] == 64
        assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        record = json.load(open(os.path.join(directory, iterative.ROUND_FILE)))
        assert {"samples/reward", "samples/kl", "eval/rewards/accuracies", "pairs/pairs"} <= set(record)
    records = read_metrics(workdir)
    steps = [r["step"] for r in records if r["stage"] == iterative.STAGE]
    assert steps == list(range(1, ROUNDS * STEPS + 1))  # one curve: the optimizer carried through the rounds
    rounds = [r for r in records if r["stage"] == iterative.ROUNDS_STAGE]
    assert [r["step"] for r in rounds] == [0, 1, 2] and rounds[0]["samples/kl"] == 0.0
    assert rounds[2]["samples/kl"] > 0
    assert os.path.exists(os.path.join(workdir, iterative.PLOT_FILE))
    # Round 1's checkpoints were deleted once round 2 was done; round 2's final step is the run's last.
    assert not os.path.exists(checkpoint.stage_directory(iterative.round_directory(workdir, 1), "dpo"))
    assert final_params(workdir, 2)[0] == ROUNDS * STEPS


def test_killed_while_scoring_and_inside_a_round_the_rerun_ends_bitwise_equal(uninterrupted, tmp_path):
    reference_dir, _ = uninterrupted
    workdir = str(tmp_path)
    config = make_iterative_config()
    with pytest.MonkeyPatch.context() as patch:  # round 2's scoring fails once: its samples are on disk
        original = iterative.make_scorer

        def scorer(config, workdir):
            score = original(config, workdir)
            return lambda round_, samples: (score(round_, samples) if round_ < 2
                                            else (_ for _ in ()).throw(KeyboardInterrupt()))

        patch.setattr(iterative, "make_scorer", scorer)
        with pytest.raises(KeyboardInterrupt):
            run.train_and_evaluate(config, workdir)
    round_2 = iterative.round_directory(workdir, 2)
    assert os.path.exists(os.path.join(round_2, iterative.GENERATED))
    assert not os.path.exists(os.path.join(round_2, iterative.SAMPLES))
    with pytest.MonkeyPatch.context() as patch:  # then round 2's training dies before its third step
        original_iterator = data.TrainBatches.iterator
        patch.setattr(data.TrainBatches, "iterator",
                      lambda self, state=None, prefetch=2: _DieAt(original_iterator(self, state, prefetch), 2,
                                                                  KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            run.train_and_evaluate(config, workdir)
    assert final_params(workdir, 2)[0] == STEPS + 1  # saved mid-round (global step 4: every 2 steps)
    run.train_and_evaluate(config, workdir)
    (step, state), (reference_step, reference_state) = final_params(workdir, 2), final_params(reference_dir, 2)
    assert step == reference_step and state.keys() == reference_state.keys()
    for key in state:
        np.testing.assert_array_equal(state[key], reference_state[key], err_msg=str(key))
    assert comparable(read_metrics(workdir)) == comparable(read_metrics(reference_dir))
    for name in (iterative.SAMPLES, iterative.PAIRS):
        assert open(os.path.join(round_2, name)).read() == open(
            os.path.join(iterative.round_directory(reference_dir, 2), name)).read()


@pytest.mark.parametrize("optimizer", ["carry", "reset"])
def test_online_dpo_one_batch_of_prompts_and_one_step_per_round(tmp_path, optimizer):
    config = make_iterative_config()
    config.iterative.update(rounds=3, prompts_per_round=config.train.batch_size, steps_per_round=1, eval_every=3,
                            samples_per_prompt=2, reference="fixed", optimizer=optimizer)
    summary = run.train_and_evaluate(config, str(tmp_path))
    assert [r["steps"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert "samples/kl" in summary["rounds"][3] and "samples/kl" not in summary["rounds"][1]
    records = [r for r in read_metrics(str(tmp_path)) if r["stage"] == iterative.STAGE]
    assert [r["step"] for r in records] == [1, 2, 3]  # a reset round's steps continue the curve
    # The last round's train state counts the steps of all rounds (carried) or of its own (reset).
    final_step = final_params(str(tmp_path), 3)[0]
    assert final_step == (3 if optimizer == "carry" else 1)
