"""Preference pairs from samples, labelled as the paper's IMDb pairs are: by a known reward, through Bradley–Terry.

Every pair (i, j) of a prefix's n samples becomes one record (n = 4 gives 6), and sample i is the chosen one with
probability P(i ≻ j) = σ(s_i − s_j), s the classifier's logit, log p − log(1 − p) of its p(positive) on prompt +
completion (for the built-in scorer, `corpus.logit`). So the labels are noisy where the reward barely differs,
as human labels would be under the Bradley–Terry model the paper assumes.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

P_CLIP = 1e-12  # a classifier's p of exactly 0 or 1 has an infinite logit


def logits_of(probabilities: Sequence[float]) -> np.ndarray:
    """log p − log(1 − p) of each probability, clipped to [P_CLIP, 1 − P_CLIP]."""
    p = np.clip(np.asarray(probabilities, np.float64), P_CLIP, 1 - P_CLIP)
    return np.log(p) - np.log1p(-p)


def bradley_terry_pairs(prompt: str, completions: Sequence[str], logits: Sequence[float],
                        rng: np.random.Generator) -> list[dict[str, str]]:
    """{prompt, chosen, rejected} for every pair i < j of `completions`; i is chosen with probability σ(s_i − s_j)."""
    records = []
    for i, j in itertools.combinations(range(len(completions)), 2):
        i_wins = rng.random() < 1.0 / (1.0 + np.exp(logits[j] - logits[i]))
        chosen, rejected = (i, j) if i_wins else (j, i)
        records.append({"prompt": prompt, "chosen": completions[chosen], "rejected": completions[rejected]})
    return records


def preference_records(prompts: Sequence[str], completions: Sequence[Sequence[str]], logits: Sequence[Sequence[float]],
                       seed: int) -> list[dict[str, str]]:
    """The Bradley–Terry pairs of every prompt's completions, in prompt order; seeded, so deterministic.

    Pairs whose two texts are equal are kept: the trainer's data scan skips and counts them (data_report.json).
    """
    rng = np.random.default_rng([seed, 0xB7])
    return [record for prompt, texts, scores in zip(prompts, completions, logits)
            for record in bradley_terry_pairs(prompt, texts, scores, rng)]


def one_per_prompt(records: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The first record of each prompt whose completions differ and are not blank (a prompt with none is dropped):
    held-out pairs, one per prefix, so that every prefix is sampled at evaluations and none is skipped."""
    kept: dict[str, dict[str, str]] = {}
    for record in records:
        usable = record["chosen"] != record["rejected"] and record["chosen"].strip() and record["rejected"].strip()
        if usable and record["prompt"] not in kept:
            kept[record["prompt"]] = record
    return list(kept.values())
