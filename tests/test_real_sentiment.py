"""The controlled-sentiment experiment on a real LM (experiments/real_sentiment, issue 20): its prompts, the VADER
reward on the continuation, best-vs-worst pairs, the report's lexicon counts, and one shared --quick run of every
stage on the tiny Llama fixture (no GGUF needed); one `realmodel` test checks SmolLM2's decoded chat prompt."""

import csv
import json
import os

import numpy as np
import pytest

from dpo_jax import data, fetch, judges, rewards
from experiments.real_sentiment import pipeline, prompts, report
from experiments.real_sentiment import reward as vader
from experiments.sentiment.jsonl import read_jsonl

CHATML_PROMPT = ("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\nuser\n"
                 "Continue this movie review: I watched Static, a western about two rival chefs in Paris, and\n"
                 "assistant\n")


def test_openings_are_seeded_disjoint_and_carry_no_sentiment():
    split = prompts.openings(300, 100, seed=0)
    assert split == prompts.openings(300, 100, seed=0) and split != prompts.openings(300, 100, seed=1)
    assert len(set(split["train"])) == 300 and len(set(split["eval"])) == 100
    assert not set(split["train"]) & set(split["eval"])
    assert all(vader.analyzer().polarity_scores(o)["compound"] == 0 for o in split["train"] + split["eval"])
    assert prompts.chat_prompt("I watched X, and") == [
        {"role": "user", "content": "Continue this movie review: I watched X, and"}]
    with pytest.raises(ValueError, match="the pool holds"):
        prompts.openings(len(prompts.opening_pool()), 1, seed=0)


def test_reward_scores_the_continuation_after_the_assistant_header():
    good, bad, plain = vader.vader_compound([CHATML_PROMPT + "I loved it, a wonderful film!",
                                             CHATML_PROMPT + "It was boring and awful.", CHATML_PROMPT + "The end."])
    assert good > 0.5 and bad < -0.5
    assert plain == 0.0  # the system turn's "helpful" is prompt, not continuation
    assert vader.vader_compound(["helpful"])[0] > 0  # no header: the whole text
    reward = rewards.make_reward(vader.SPEC, "file")  # the trainer's route: prompt + completion texts
    scores = reward([CHATML_PROMPT, CHATML_PROMPT], ["I loved it, a wonderful film!", "The end."])
    assert scores.dtype == np.float64 and scores.tolist() == [good, plain]
    assert vader.lexicon_words("Great, GREAT fun. The end!") == [("great", 3.1), ("great", 3.1), ("fun", 2.3)]


def test_pairs_are_best_against_worst_and_ties_are_dropped():
    texts = [" a", " b", " c", " d"]
    pair = pipeline.best_and_worst("I watched X, and", texts, np.array([0.1, 0.9, -0.4, 0.9]))
    assert (pair["chosen"], pair["rejected"], pair["chosen_reward"], pair["rejected_reward"]) == (" b", " c", .9, -.4)
    assert pair["prompt"] == prompts.chat_prompt("I watched X, and")
    assert pipeline.best_and_worst("x", texts, np.zeros(4)) is None


def test_lexicon_statistics_count_repeated_sentiment_words():
    stats = report.lexicon_statistics(["great great great film!", "a fine plot", "Glad you liked your plot"])
    assert stats["positive_words"] == pytest.approx(6 / 3)
    assert stats["repeats_a_word"] == pytest.approx(1 / 3)
    assert stats["exclamations"] == pytest.approx(1 / 3)
    assert stats["top_words"] == "great×3, fine×1, glad×1, liked×1"
    assert stats["addresses_you"] == pytest.approx(1 / 3)
    assert report.opening_of(CHATML_PROMPT) == "I watched Static, a western about two rival chefs in Paris, and"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(workdir, experiment.json's contents) of one --quick run, shared by the tests below."""
    workdir = str(tmp_path_factory.mktemp("real_sentiment"))
    return workdir, pipeline.run_experiment(workdir, pipeline.QUICK)


def test_quick_run_samples_pairs_and_trains_every_method_from_the_model(quick):
    workdir, result = quick
    scale, paths = pipeline.QUICK, pipeline.Paths(workdir)
    for split, prompts_asked in (("train", scale.train_prompts), ("eval", scale.eval_prompts)):
        counts = result["pairs"][split]
        assert counts["prompts"] == prompts_asked and counts["samples"] == 4 * prompts_asked
        assert counts["pairs"] + counts["ties_dropped"] == prompts_asked and counts["pairs"] > 0
        records = read_jsonl(paths.pairs_train if split == "train" else paths.pairs_eval)
        assert len(records) == counts["pairs"]
        assert all(r["chosen_reward"] > r["rejected_reward"] for r in records)
        samples = {s["opening"]: s for s in read_jsonl(paths.samples(split))}
        assert len(samples) == prompts_asked
        assert all(len(s["completions"]) == len(s["rewards"]) == 4 for s in samples.values())
        assert all((r["chosen_reward"], r["rejected_reward"]) == (max(samples[r["opening"]]["rewards"]),
                                                                  min(samples[r["opening"]]["rewards"]))
                   for r in records)
    with open(os.path.join(workdir, "frontier.csv")) as f:
        rows = list(csv.DictReader(f))
    names = {m.name for m in pipeline.methods(scale)}
    assert names == {"dpo_beta0.1", "dpo_beta0.5", "preferred_ft"} == {r["method"] for r in rows}
    for name in names:
        config = json.load(open(os.path.join(workdir, "methods", name, "config.json")))
        assert config["model"]["path"] == pipeline.STAND_IN and config["dpo"]["reference_workdir"] == ""
        own = [r for r in rows if r["method"] == name]
        assert [int(r["step"]) for r in own] == list(range(0, scale.method_steps + 1, scale.eval_every))
        assert any(float(r["kl"]) > 0 for r in own if r["step"] != "0")  # training moved the policy
    start = [r for r in rows if r["step"] == "0"]
    assert {float(r["kl"]) for r in start} == {0.0} and len({r["reward"] for r in start}) == 1  # π_ref, same rng


def test_quick_run_reports_win_rates_plot_and_samples(quick):
    workdir, result = quick
    eval_prompts = result["pairs"]["eval"]["pairs"]
    wins = result["win_rates"]
    assert {(w["method"], w["step"]) for w in wins} == {
        (m.name, s) for m in pipeline.methods(pipeline.QUICK) for s in (1, 2)}
    for w in wins:
        assert w["n"] == w["wins"] + w["ties"] + w["losses"] == eval_prompts and w["unparseable"] == 0
        assert (w["win_rate"], w["ci_low"], w["ci_high"]) == pytest.approx(
            ((w["wins"] + w["ties"] / 2) / w["n"], *judges.wilson_interval(w["win_rate"], w["n"])))
    assert os.path.getsize(os.path.join(workdir, "frontier.png")) > 20_000
    with open(os.path.join(workdir, "samples.md")) as f:
        text = f.read()
    assert text.count("**SmolLM2-135M-Instruct (π_ref)** (step 0") == report.NUM_SHOWN
    assert all(f"**{name}** (step 2" in text for name in ("dpo_beta0.1", "dpo_beta0.5", "preferred_ft"))
    stats = {r["policy"]: r for r in result["sample_statistics"]}
    assert stats[report.REFERENCE]["kl"] == 0 and stats["preferred_ft"]["kl"] > 0  # the post-hoc KL
    assert "DPO dominates" in result["dominance_summary"]


def test_quick_run_restarts_without_running_finished_stages(quick, capsys):
    workdir, first = quick
    pairs_written = os.path.getmtime(pipeline.Paths(workdir).pairs_train)
    again = pipeline.run_experiment(workdir, pipeline.QUICK)
    output = capsys.readouterr().out
    assert all(f"{m.name}: done before, skipped" in output for m in pipeline.methods(pipeline.QUICK))
    stages = ("samples_and_pairs", *(m.name for m in pipeline.methods(pipeline.QUICK)))
    assert all(again["timings_seconds"][s] == first["timings_seconds"][s] > 0 for s in stages)
    assert os.path.getmtime(pipeline.Paths(workdir).pairs_train) == pairs_written
    assert again["win_rates"] == first["win_rates"]


@pytest.mark.realmodel
def test_smollm2_chat_prompt_decodes_to_the_header_the_reward_splits_at():
    gguf = fetch.model_path("smollm2")
    if not os.path.isfile(gguf):
        pytest.fail(f"{gguf} is missing: run `{fetch.fetch_command('smollm2')}` first", pytrace=False)
    tokenizer = data.get_tokenizer("model", gguf)
    opening = prompts.openings(1, 0, seed=0)["train"][0]
    tokens_NxP, lengths_N = data.encode_prompts([prompts.chat_prompt(opening)], tokenizer,
                                                max_prompt_length=pipeline.FULL.max_prompt_length)
    decoded = tokenizer.decode(tokens_NxP[0, :lengths_N[0]].tolist())
    assert lengths_N[0] < pipeline.FULL.max_prompt_length  # never truncated
    assert vader.continuation(decoded + "I loved it.") == "I loved it."
    assert report.opening_of(decoded) == opening
