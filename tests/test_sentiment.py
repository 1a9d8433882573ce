"""The controlled sentiment experiment (experiments/sentiment, issue 12): its corpus and scorer, the Bradley–Terry
pairs, and one shared --quick run of the whole pipeline (SFT, sampling, pairs, every method, the report)."""

import csv
import json
import math
import os

import numpy as np
import pytest

from dpo_jax import config as config_lib
from dpo_jax import data, rewards
from experiments.sentiment import corpus, jsonl, pairs, pipeline, report


def test_corpus_is_deterministic_and_its_streams_are_disjoint():
    assert corpus.make_reviews(50, 0, "train") == corpus.make_reviews(50, 0, "train")
    assert corpus.make_reviews(50, 0, "train") != corpus.make_reviews(50, 1, "train")
    streams = [set(corpus.make_reviews(200, 0, split)) for split in corpus.STREAMS]
    assert all(len(a & b) < 20 for i, a in enumerate(streams) for b in streams[i + 1:])  # short reviews may recur
    assert corpus.sft_records(20, 0) == corpus.sft_records(20, 0)


def test_reviews_are_well_formed_and_prompts_are_2_to_8_word_prefixes():
    reviews = corpus.make_reviews(300, 0, "eval")
    assert all(corpus.MIN_WORDS <= len(r.split()) <= corpus.MAX_WORDS and corpus.is_well_formed(r) for r in reviews)
    assert all(set(r.split()) <= set(corpus.WORDS) for r in reviews)
    prompts = corpus.prefixes(300, 0, "eval")
    assert all(2 <= len(p.split()) <= 8 and r.startswith(p + " ") for p, r in zip(prompts, reviews))
    assert {len(p.split()) for p in prompts} == set(range(2, 9))
    for record in corpus.sft_records(100, 0):
        assert 2 <= len(record["prompt"].split()) <= 8 and record["completion"].startswith(" ")
        assert record["label"] == (corpus.score([record["prompt"] + record["completion"]])[0] > 0.5)
    assert not corpus.is_well_formed("the movie was very very good .")  # a degenerate repetition
    assert not corpus.is_well_formed("i loved the plot")  # cut short
    assert corpus.is_well_formed("i loved the plot . the plot was", cut=True)  # ... by the token limit: judged to "."
    assert not corpus.is_well_formed("i loved loved the plot . the plot was", cut=True)


def test_scorer_is_a_probability_with_negation_and_intensifiers():
    scores = corpus.score(corpus.make_reviews(500, 0, "sft"))
    assert all(0 <= s <= 1 for s in scores) and 0.3 < np.mean(scores) < 0.7 and np.std(scores) > 0.2
    good, not_good, bad, not_bad, very_good = corpus.score([
        "the movie was good .", "the movie was not good .", "the movie was bad .", "the movie was not bad .",
        "the movie was very good ."])
    assert bad < not_good < 0.5 < not_bad < good < very_good  # negation flips (and damps) the sentiment
    assert corpus.score(["i did not love the plot . the acting was great ."])[0] == pytest.approx(
        1 / (1 + math.exp(-corpus.SCALE * (-0.5 * 2 + 2))))
    # Negation ends with its clause: "and" starts a new one.
    assert corpus.lexicon_score("the plot was not bad and the acting was good".split()) == pytest.approx(1.5)
    assert corpus.logit("The movie was GOOD.") == pytest.approx(corpus.SCALE)  # any spacing and case


def test_tokenizer_loads_through_transformers_and_round_trips(tmp_path):
    corpus.save_tokenizer(str(tmp_path))
    tokenizer = data.get_tokenizer(f"hf:{tmp_path}")
    assert tokenizer.vocab_size == len(corpus.WORDS) + 3
    for record in corpus.sft_records(50, 0):
        prompt, completion = (tokenizer.encode(record[k]) for k in ("prompt", "completion"))
        assert tokenizer.tokenizer.unk_token_id not in prompt + completion
        # Decoded texts start with a space, so prompt + completion (what python: rewards score) is the review.
        assert tokenizer.decode(prompt) + tokenizer.decode(completion) == " " + record["prompt"] + record["completion"]


def test_the_scorer_plugs_in_as_a_python_reward():
    reward = rewards.make_reward(pipeline.CORPUS_REWARD, "file")
    prompts, completions = [" the movie was", " i loved"], [" not good .", " the plot ."]
    np.testing.assert_allclose(reward(prompts, completions),
                               corpus.score([p + c for p, c in zip(prompts, completions)]))


def test_bradley_terry_forms_every_pair_of_distinct_completions():
    completions = [" a .", " b .", " c .", " d ."]
    records = pairs.preference_records(["x", "y"], [completions, completions[::-1]],
                                       [[0.0, 1.0, 2.0, 3.0]] * 2, seed=0)
    assert len(records) == 12  # 6 pairs per prompt
    for prompt in ("x", "y"):
        own = [r for r in records if r["prompt"] == prompt]
        assert len(own) == 6 and all(r["chosen"] != r["rejected"] for r in own)
        assert {frozenset((r["chosen"], r["rejected"])) for r in own} == {
            frozenset((a, b)) for i, a in enumerate(completions) for b in completions[i + 1:]}
    assert records == pairs.preference_records(["x", "y"], [completions, completions[::-1]],
                                               [[0.0, 1.0, 2.0, 3.0]] * 2, seed=0)
    assert pairs.one_per_prompt(records + [{"prompt": "z", "chosen": " a", "rejected": " a"}]) == [
        records[0], records[6]]


def test_bradley_terry_labels_follow_the_logit_difference():
    n, gap = 20_000, 1.2
    records = pairs.preference_records(["x"] * n, [[" high", " low"]] * n, [[gap, 0.0]] * n, seed=3)
    wins = sum(r["chosen"] == " high" for r in records)
    expected = 1 / (1 + math.exp(-gap))
    assert abs(wins / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    assert pairs.logits_of([0.5, corpus.score(["it is a great film ."])[0]]) == pytest.approx(
        [0.0, corpus.logit("it is a great film .")])


def test_dominance_asks_for_a_dpo_point_with_no_less_reward_at_no_more_kl():
    rows = [dict(method="dpo", family="DPO", step=s, kl=kl, reward=r, reward_se=0.01)
            for s, kl, r in ((0, 0, .5), (1, 1, .7), (2, 3, .9))]
    rows += [dict(method="ul", family="Unlikelihood", step=s, kl=kl, reward=r, reward_se=0.01)
             for s, kl, r in ((0, 0, .5), (1, 1.5, .7), (2, 1.5, .705), (3, 0.5, .6))]
    results = report.dominance(rows)
    assert [(r["step"], r["dominated"], r["by"]) for r in results] == [
        (1, True, "dpo@1"), (2, False, "dpo@1"), (3, False, "dpo@0")]
    # Mixing dpo@1 and dpo@2 reaches .75 at KL 1.5; dpo@0 and dpo@1, .6 at KL .5.
    assert [r["dpo_mixture_reward"] for r in results] == pytest.approx([.75, .75, .6])
    assert all(r["dominated_by_mixture"] for r in results)
    assert report.mixture_reward(rows[:3], 4.0) == .9 and report.mixture_reward(rows[1:3], 0.5) is None
    summary = report.dominance_summary(results)
    assert "DPO dominates 1 of 3 trained non-DPO points" in summary
    assert "of the 2 others, 1 miss by less than one standard error" in summary
    assert "A mixture of two DPO policies dominates 3 of 3" in summary


def test_paper_scale_method_configs_keep_the_configs_model_and_validate(tmp_path):
    from configs import imdb

    paths = pipeline.Paths(str(tmp_path))
    for name in ("pairs_train", "pairs_eval"):
        jsonl.write_jsonl(getattr(paths, name), [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    sft = imdb.get_config()
    for method in pipeline.config_methods():
        config = pipeline.method_config(sft, method, paths, num_steps=1000, eval_every=100, warmup_steps=150)
        config_lib.validate(config)
        assert (config.mode, config.model.path, config.dpo.learning_rate) == ("dpo", "gpt2-large", 1e-6)
        assert config.dpo.reference_workdir == paths.sft
        # Losses without π_ref keep a checkpoint per evaluation, for their KL afterwards; the others the default.
        assert config.train.keep_checkpoints == (2 if method.family in ("DPO", "Unweighted") else 11)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sentiment"))
    return workdir, pipeline.run_experiment(workdir, pipeline.QUICK)


def test_quick_run_traces_every_method_from_the_reference(quick):
    workdir, result = quick
    with open(os.path.join(workdir, "frontier.csv")) as f:
        rows = list(csv.DictReader(f))
    expected_steps = set(range(0, pipeline.QUICK.method_steps + 1, pipeline.QUICK.eval_every))
    assert {r["method"] for r in rows} == set(pipeline.QUICK.methods)
    for method in pipeline.QUICK.methods:
        own = [r for r in rows if r["method"] == method]
        assert {int(r["step"]) for r in own} == expected_steps and len(own) == len(expected_steps)
        assert all(math.isfinite(float(r["kl"])) and math.isfinite(float(r["reward"])) for r in own)
        assert any(float(r["kl"]) > 0 for r in own if int(r["step"]) > 0)  # training moved the policy
    start = [r for r in rows if r["step"] == "0"]
    assert {float(r["kl"]) for r in start} == {0.0}  # step 0 is π_ref itself, for every method
    assert len({r["reward"] for r in start}) == 1  # ... sampled with the same rng
    # Losses without π_ref (Unlikelihood, Preferred-FT) get their KL afterwards, from each step's checkpoint.
    assert {r["method"] for r in result["dominance"]} == {m for m in pipeline.QUICK.methods if "dpo" not in m}
    assert all(isinstance(r["dominated"], bool) for r in result["dominance"])
    assert "DPO dominates" in result["dominance_summary"]


def test_quick_run_writes_the_plot_table_and_degeneration_report(quick):
    workdir, result = quick
    assert os.path.getsize(os.path.join(workdir, "frontier.png")) > 20_000
    with open(os.path.join(workdir, "frontier.md")) as f:
        assert f.readline().startswith("| method | family | hyperparameter | step | kl | reward |")
    with open(os.path.join(workdir, "degeneration.md")) as f:
        text = f.read()
    assert all(f"## {method} (step {pipeline.QUICK.method_steps})" in text for method in pipeline.QUICK.methods)
    assert "## SFT (π_ref) (step 0)" in text
    stats = {r["method"]: r for r in result["degeneration"]}
    assert set(stats) == {*pipeline.QUICK.methods, "SFT (π_ref)"}
    assert all(0 <= s["well_formed"] <= 1 and 0 <= s["repeated"] < 1 and s["perplexity"] >= 1 and 0 <= s["at_limit"] <= 1
               for s in stats.values())
    with open(os.path.join(workdir, "experiment.json")) as f:
        assert json.load(f)["dominance_summary"] == result["dominance_summary"]


def test_quick_run_restarts_without_running_finished_stages(quick, capsys):
    workdir, first = quick
    before = os.path.getmtime(os.path.join(workdir, "corpus", "pairs_train.jsonl"))
    again = pipeline.run_experiment(workdir, pipeline.QUICK)
    output = capsys.readouterr().out
    assert all(f"{name}: done before, skipped" in output for name in ("sft", *pipeline.QUICK.methods))
    stages = ("sft", "samples_and_pairs", *pipeline.QUICK.methods)  # keep the seconds of the call that ran them
    assert all(again["timings_seconds"][name] == first["timings_seconds"][name] > 0 for name in stages)
    assert os.path.getmtime(os.path.join(workdir, "corpus", "pairs_train.jsonl")) == before
    assert again["dominance"] == first["dominance"]
