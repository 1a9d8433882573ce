"""The experiment's prompts: seeded openings of movie reviews, asked of an instruct model through its chat template.

An opening is one template of OPENINGS filled with an invented title, genre, subject and occasion, e.g. "I watched
Midnight Orchard, a drama about a young teacher in a mountain village, at a late screening, and".
They stop mid-sentence, before the reviewer's verdict, and carry no sentiment word of their own (checked in the
tests against VADER's lexicon), so the completion decides the review's sentiment, as the paper's 2–8-token IMDb
prefixes leave it to the policy. The pool holds 124,416 distinct openings; the training and held-out prompts
are disjoint slices of one seeded shuffle of it. No dataset is downloaded.
"""

from __future__ import annotations

import itertools

import numpy as np

INSTRUCTION = "Continue this movie review: "
TITLES = ("The Quiet Harbour", "Midnight Orchard", "Paper Lanterns", "The Last Ferry", "Winter Circuit",
          "Salt and Iron", "The Glass Orchard", "Northbound", "A House on Cedar Street", "The Long Rehearsal",
          "Small Hours", "The Cartographer", "Red Canyon", "Second Harvest", "The Lighthouse Keeper's Son",
          "Static", "Borrowed Time", "The Night Market")
GENRES = ("drama", "period piece", "western", "science-fiction film", "musical", "mystery", "road movie",
          "family film", "courtroom drama", "stop-motion film", "documentary", "sports film")
SUBJECTS = ("two sisters who inherit a bakery", "a retired boxer who returns to the ring",
            "a young teacher in a mountain village", "a detective chasing a forger across Europe",
            "a crew stranded on a research station", "a family driving across the country",
            "a jazz pianist in 1950s Chicago", "a small-town mayor during an election",
            "a chess prodigy and her coach", "a lighthouse keeper and his estranged son",
            "two rival chefs in Paris", "a soldier writing letters home")
OCCASIONS = ("last night", "on a long flight", "with my kids", "at a late screening", "twice this week",
             "on a Sunday afternoon", "with my parents", "at the local cinema")
OPENINGS = (
    "I watched {title}, a {genre} about {subject}, {occasion}, and",
    "{title} is a {genre} about {subject}. I saw it {occasion}, and I have to say that",
    "When I sat down {occasion} to watch {title}, a {genre} about {subject}, I",
    "The new {genre} {title} follows {subject}. Having seen it {occasion}, I think",
    "{title}, the {genre} about {subject}, is the film I watched {occasion}. The first thing to say is that",
    "I went into {title} knowing only that it was a {genre} about {subject}. After watching it {occasion},",
)


def opening_pool() -> list[str]:
    """Every distinct opening in a fixed order: 6 templates × 18 titles × 12 genres × 12 subjects × 8 occasions."""
    return [template.format(title=title, genre=genre, subject=subject, occasion=occasion)
            for template, title, genre, subject, occasion in itertools.product(
                OPENINGS, TITLES, GENRES, SUBJECTS, OCCASIONS)]


def openings(num_train: int, num_eval: int, seed: int) -> dict[str, list[str]]:
    """{'train': num_train openings, 'eval': num_eval others}: disjoint slices of one seeded shuffle of the pool."""
    pool = opening_pool()
    if num_train + num_eval > len(pool):
        raise ValueError(f"{num_train} + {num_eval} openings asked for; the pool holds {len(pool)}")
    order = np.random.default_rng([seed, 0x5E47]).permutation(len(pool))
    chosen = [pool[i] for i in order[:num_train + num_eval]]
    return {"train": chosen[:num_train], "eval": chosen[num_train:]}


def chat_prompt(opening: str) -> list[dict[str, str]]:
    """The opening as a one-message chat prompt (the file source renders it with the tokenizer's chat template)."""
    return [{"role": "user", "content": INSTRUCTION + opening}]
