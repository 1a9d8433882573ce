"""Embedded demo task, no download: "sentiment reviews" with a known ground-truth reward.

A prompt opens a short review ("review of the film :"); a completion is 5 words drawn from
positive, negative and neutral filler words. The ground-truth reward of a completion is
(#positive words − #negative words), so a tiny model can learn it in seconds and the
reward-vs-KL frontier can be measured exactly (the IMDb experiment of the paper, in miniature).
"""

from __future__ import annotations

import numpy as np

TEMPLATES: tuple[str, ...] = (
    "review of the {} :",
    "my thoughts on this {} :",
    "what i think of the {} :",
    "a short review of this {} :",
    "here is my opinion of the {} :",
)
SUBJECTS: tuple[str, ...] = ("film", "restaurant", "book", "hotel", "album", "game", "show", "cafe")
POSITIVE_WORDS: tuple[str, ...] = ("great", "loved", "excellent", "amazing", "wonderful")
NEGATIVE_WORDS: tuple[str, ...] = ("awful", "boring", "hated", "terrible", "dull")
# Few neutral words, each more frequent than any one sentiment word: a Preferred-FT model then
# decodes bland greedy completions ("it was the ..."), which leaves DPO visible room to improve.
NEUTRAL_WORDS: tuple[str, ...] = ("the", "and", "was", "really")
MIN_COMPLETION_WORDS, MAX_COMPLETION_WORDS = 5, 5


def _unique(words) -> list[str]:
    return list(dict.fromkeys(words))


# Every word the task can produce, in a fixed order (the tokenizer's ids follow it).
WORDS: list[str] = _unique(
    [w for t in TEMPLATES for w in t.format("").split()]
    + list(SUBJECTS)
    + list(POSITIVE_WORDS)
    + list(NEGATIVE_WORDS)
    + list(NEUTRAL_WORDS)
)

_POSITIVE, _NEGATIVE = frozenset(POSITIVE_WORDS), frozenset(NEGATIVE_WORDS)


def ground_truth_reward(completion: str) -> float:
    """Known reward of a completion: number of positive words minus number of negative words."""
    words = completion.split()
    return float(sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words))


def _sample_prompt(rng: np.random.Generator) -> str:
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(SUBJECTS[rng.integers(len(SUBJECTS))])


def _sample_completion(rng: np.random.Generator) -> str:
    """Base "SFT-like" policy: a random mood, then each word is neutral (1/2), on-mood (2/5) or off-mood (1/10)."""
    mood, other = (POSITIVE_WORDS, NEGATIVE_WORDS) if rng.random() < 0.5 else (NEGATIVE_WORDS, POSITIVE_WORDS)
    length = int(rng.integers(MIN_COMPLETION_WORDS, MAX_COMPLETION_WORDS + 1))
    words = []
    for _ in range(length):
        u = rng.random()
        pool = NEUTRAL_WORDS if u < 0.5 else mood if u < 0.9 else other
        words.append(pool[rng.integers(len(pool))])
    return " ".join(words)


def make_preference_pairs(num_pairs: int, seed: int) -> list[dict[str, str]]:
    """`num_pairs` {prompt, chosen, rejected} dicts; chosen has the higher ground-truth reward (never tied).

    Two completions per prompt come from the base distribution; tied pairs are redrawn, so the
    labels are noise-free and deterministic given `seed`.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    rng = np.random.default_rng([seed, 0])
    pairs = []
    for _ in range(num_pairs):
        prompt = _sample_prompt(rng)
        while True:
            a, b = _sample_completion(rng), _sample_completion(rng)
            ra, rb = ground_truth_reward(a), ground_truth_reward(b)
            if ra != rb:
                break
        chosen, rejected = (a, b) if ra > rb else (b, a)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def make_prompts(num: int, seed: int) -> list[str]:
    """`num` review-opening prompts for evaluation generation (a stream separate from the pairs')."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    rng = np.random.default_rng([seed, 1])
    return [_sample_prompt(rng) for _ in range(num)]
