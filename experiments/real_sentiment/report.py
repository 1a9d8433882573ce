"""What the real-model experiment reports: the reward-vs-KL frontier, each checkpoint's win rate against π_ref, and
samples before and after with the lexicon statistics that show reward hacking.

Every point is one evaluation of one method: its temperature-1 samples of the held-out prompts
(samples/dpo/step_N.jsonl; step 0 is π_ref). The frontier table, plot and dominance are experiments/sentiment's.
The win rate is the paper's (Section 6.2) with the reward as judge (dpo_jax.judges.RewardJudge): the checkpoint's
sample of each prompt against π_ref's sample of the same prompt (drawn with the same rng), ties counted half, with
its 95% Wilson interval.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Sequence

import numpy as np

from dpo_jax import judges, rewards
from dpo_jax.metrics_writer import stage_sample_files
from experiments.real_sentiment import prompts
from experiments.real_sentiment import reward as vader
from experiments.sentiment import report as frontier
from experiments.sentiment.jsonl import read_jsonl

REFERENCE = "SmolLM2-135M-Instruct (π_ref)"
NUM_SHOWN = 5  # prompts whose samples samples.md shows for every policy
TOP_WORDS = 8  # the most frequent positive lexicon words listed per policy
REPEATS = 3  # a continuation "repeats a sentiment word" when one positive lexicon word occurs this often in it
SECOND_PERSON = re.compile(r"\b(you|your|you're|yours)\b", re.IGNORECASE)


def win_rates(runs: Sequence[tuple[object, str]], reward_spec: str) -> list[dict]:
    """For each (method, run directory) and evaluated step > 0: judges.win_rate of its samples against π_ref's
    (step 0), judged by the reward, with the step's mean reward and KL."""
    judge = judges.RewardJudge(rewards.make_reward(reward_spec, "file"))
    rows = []
    for method, workdir in runs:
        files = stage_sample_files(workdir, "dpo")
        reference = read_jsonl(files[0][1])
        for step, path in files[1:]:
            samples = read_jsonl(path)
            if [s["prompt"] for s in samples] != [r["prompt"] for r in reference]:
                raise ValueError(f"{path}: its prompts are not step 0's; cannot compare them one by one")
            verdicts = judge.judge([judges.Comparison(s["prompt"], s["completion"], r["completion"])
                                    for s, r in zip(samples, reference)])
            rows.append({"method": method.name, "step": step, "kl": float(np.mean([s["kl"] for s in samples])),
                         "reward": float(np.mean([s["reward"] for s in samples])),
                         **judges.win_rate([judges.orient(v, evaluated_first=True) for v in verdicts])})
    return rows


def win_rate_markdown(rows: Sequence[dict]) -> str:
    """The win rates as a markdown table."""
    lines = ["| method | step | KL (nats) | reward | win rate vs π_ref | 95% Wilson interval | wins / ties / losses |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['step']} | {r['kl']:.2f} | {r['reward']:+.3f} | {r['win_rate']:.3f} | "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['wins']} / {r['ties']} / {r['losses']} |" for r in rows]
    return "\n".join(lines)


def lexicon_statistics(completions: Sequence[str]) -> dict:
    """How the continuations earn their reward: positive lexicon words per continuation and their share of all
    words, the fraction that repeat one such word REPEATS+ times, '!' per continuation, the fraction that speak to
    a "you" (a chat reply rather than a review), and the most frequent positive lexicon words as 'word×count'."""
    counts, per_text, shares, repeating = collections.Counter(), [], [], []
    for text in completions:
        positive = [word for word, valence in vader.lexicon_words(text) if valence > 0]
        counts.update(positive)
        per_text.append(len(positive))
        shares.append(len(positive) / max(len(text.split()), 1))
        repeating.append(max(collections.Counter(positive).values(), default=0) >= REPEATS)
    return {"positive_words": float(np.mean(per_text)), "positive_share": float(np.mean(shares)),
            "repeats_a_word": float(np.mean(repeating)),
            "exclamations": float(np.mean([text.count("!") for text in completions])),
            "addresses_you": float(np.mean([bool(SECOND_PERSON.search(text)) for text in completions])),
            "top_words": ", ".join(f"{w}×{n}" for w, n in counts.most_common(TOP_WORDS))}


def opening_of(prompt_text: str) -> str:
    """The review opening inside a decoded chat prompt (the whole prompt where the instruction is not found)."""
    marker = prompts.INSTRUCTION.split(" ", 1)[1]  # "this movie review: " (a lossy tokenizer may drop the capital)
    if marker not in prompt_text:
        return prompt_text.strip()
    return prompt_text.partition(marker)[2].partition(vader.ASSISTANT_HEADER)[0].strip()


def write_samples(runs: Sequence[tuple[object, str]], path: str, max_new_tokens: int) -> list[dict]:
    """samples.md: π_ref's and each method's last-evaluation samples: the statistics (experiments/sentiment's and
    the lexicon's) and the first NUM_SHOWN prompts' continuations side by side; returns the statistics rows."""
    policies = [(REFERENCE, 0, read_jsonl(stage_sample_files(runs[0][1], "dpo")[0][1]))]
    for method, workdir in runs:
        step, sample_path = stage_sample_files(workdir, "dpo")[-1]
        policies.append((method.name, step, read_jsonl(sample_path)))
    rows = [{"policy": name, "step": step, **frontier.sample_statistics(samples, max_new_tokens),
             **lexicon_statistics([s["completion"] for s in samples])} for name, step, samples in policies]
    numeric = ("reward", "kl", "length", "at_limit", "distinct2", "positive_words", "positive_share",
               "repeats_a_word", "exclamations", "addresses_you")
    lines = ["# Samples before and after", "",
             f"Temperature-1 samples (at most {max_new_tokens} tokens) of the held-out prompts, the same rng for every "
             "policy. `length`: tokens, EOS included; `at_limit`: fraction cut by the token limit; `distinct2`: "
             "distinct word bigrams / all; `positive_words`: VADER-lexicon words of positive valence per continuation; "
             "`positive_share`: their share of its words; `repeats_a_word`: fraction of continuations using one "
             f"positive word {REPEATS} times or more; `exclamations`: '!' per continuation; `addresses_you`: fraction "
             "containing you / your (a reply to the user rather than a review).", "",
             "| policy | step | " + " | ".join(numeric) + " | most frequent positive words |",
             "|---|---|" + "---|" * len(numeric) + "---|"]
    lines += [f"| {r['policy']} | {r['step']} | " + " | ".join(f"{r[c]:.3f}" for c in numeric)
              + f" | {r['top_words']} |" for r in rows]
    for i, sample in enumerate(policies[0][2][:NUM_SHOWN]):
        lines += ["", f"## Prompt {i + 1}: “{opening_of(sample['prompt'])}”", ""]
        for name, step, samples in policies:
            text = " ".join(samples[i]["completion"].split())
            lines.append(f"- **{name}** (step {step}, reward {samples[i]['reward']:+.2f}): {text}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows


def write_report(workdir: str, runs: Sequence[tuple[object, str]], reward_spec: str, max_new_tokens: int) -> dict:
    """frontier.{csv,md,png}, win_rates.md and samples.md in `workdir`; returns their numbers for experiment.json."""
    rows = frontier.frontier_table(runs)
    frontier.write_table(rows, os.path.join(workdir, "frontier.csv"), os.path.join(workdir, "frontier.md"))
    frontier.plot_frontier(rows, os.path.join(workdir, "frontier.png"),
                           title="SmolLM2-135M-Instruct continuing movie reviews: VADER reward vs KL to π_ref",
                           ylabel="VADER compound of samples (mean)", reference_label=REFERENCE)
    dominance = frontier.dominance(rows)
    summary = frontier.dominance_summary(dominance)
    wins = win_rates(runs, reward_spec)
    with open(os.path.join(workdir, "win_rates.md"), "w") as f:
        f.write(win_rate_markdown(wins) + "\n")
    statistics = write_samples(runs, os.path.join(workdir, "samples.md"), max_new_tokens)
    print(summary)
    print(win_rate_markdown(wins))
    return {"frontier": rows, "dominance": dominance, "dominance_summary": summary, "win_rates": wins,
            "sample_statistics": statistics}
