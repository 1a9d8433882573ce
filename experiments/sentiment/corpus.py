"""A built-in stand-in for IMDb and its sentiment classifier: seeded short reviews and a known p(positive).

Reviews come from a small grammar: two or three sentences of clauses such as "the plot was not very good",
"i did not enjoy the acting", "it is a really boring movie", joined by "and" / "but", plus neutral clauses
("i watched it at home"). Each review has a latent mood (positive, negative or mixed) that tilts the sign of its
sentiment words, so a language model fitted to the corpus writes reviews of either sentiment.

The ground truth (`score`) plays the paper's sentiment classifier: p(positive) = σ(logit), logit =
SCALE · (lexicon score). The lexicon score sums the value of every sentiment word (adjectives ±1..3, verbs
±1..2), times the intensifiers right before it ("very" ×2, "extremely" ×3, ...), and a word after "not" in the
same clause (clauses end at ".", "and", "but") counts NEGATION × its value: "not bad" is mildly positive,
"not great" mildly negative. Word order thus matters, which keeps the task from being a bag of words.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

POSITIVE_ADJECTIVES = {"good": 1, "nice": 1, "fun": 1, "funny": 1, "great": 2, "beautiful": 2, "wonderful": 2,
                       "brilliant": 3}
NEGATIVE_ADJECTIVES = {"bad": -1, "weak": -1, "dull": -1, "silly": -1, "boring": -2, "awful": -2, "terrible": -2,
                       "horrible": -3}
NEUTRAL_ADJECTIVES = ("long", "short", "old", "new", "simple", "different")
VERBS = (("loved", "love", 2), ("liked", "like", 1), ("enjoyed", "enjoy", 1), ("hated", "hate", -2),
         ("disliked", "dislike", -1))  # (past, base after "did not", value)
INTENSIFIERS = {"quite": 1.5, "very": 2.0, "really": 2.0, "so": 2.0, "extremely": 3.0}
NEGATION, NEGATION_FACTOR = "not", -0.5
CLAUSE_ENDS = frozenset({".", "and", "but"})
SCALE = 0.5  # logit per lexicon point: a review with one "great" and one "loved" scores σ(2) = 0.88

NOUNS = ("movie", "film", "plot", "acting", "cast", "ending", "story", "music", "script", "dialogue")
FILM_NOUNS = ("movie", "film", "story")
TIMES = ("yesterday", "twice", "at home", "with friends", "last week")
TOPICS = ("family", "war", "dog", "small town", "young woman", "tall man")
MOODS = ((0.4, 0.85), (0.4, 0.15), (0.2, 0.5))  # (probability, P(a sentiment clause is positive)): +, −, mixed
MIN_WORDS, MAX_WORDS = 10, 16  # a review's length in words (tokens): room for any 2–8-word prefix; short rows
MIN_PREFIX, MAX_PREFIX = 2, 8  # the paper's prompts: 2–8-token prefixes of reviews

WORD_VALUES = {**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **{past: v for past, _, v in VERBS},
               **{base: v for _, base, v in VERBS}}
STRUCTURE = "the was is it a i did watched about overall and but . with my".split()
WORDS: list[str] = list(dict.fromkeys(
    STRUCTURE + list(NOUNS) + list(POSITIVE_ADJECTIVES) + list(NEGATIVE_ADJECTIVES) + list(NEUTRAL_ADJECTIVES)
    + [w for past, base, _ in VERBS for w in (past, base)] + list(INTENSIFIERS) + [NEGATION]
    + [w for phrase in TIMES + TOPICS for w in phrase.split()]))
STREAMS = {"sft": 0, "train": 1, "eval": 2}  # the review sets: SFT corpus, DPO training prefixes, held-out prefixes


def lexicon_score(words: Sequence[str]) -> float:
    """Σ over sentiment words of value × intensifiers right before it × (NEGATION_FACTOR after "not" in its clause)."""
    total, negated, multiplier = 0.0, False, 1.0
    for word in words:
        if word in CLAUSE_ENDS:
            negated, multiplier = False, 1.0
        elif word == NEGATION:
            negated = True
        elif word in INTENSIFIERS:
            multiplier *= INTENSIFIERS[word]
        else:
            if word in WORD_VALUES:
                total += WORD_VALUES[word] * multiplier * (NEGATION_FACTOR if negated else 1.0)
            multiplier = 1.0
    return total


def words_of(text: str) -> list[str]:
    """The corpus words of a text: lower-case words and punctuation, whatever the spacing."""
    return re.findall(r"[a-z]+|[.,!?]", text.lower())


def logit(text: str) -> float:
    """The classifier's logit of a text, SCALE × lexicon score: the Bradley–Terry scale of the preference labels."""
    return SCALE * lexicon_score(words_of(text))


def score(texts: Sequence[str]) -> list[float]:
    """p(positive) = σ(logit) of each text, in [0, 1]: the ground-truth reward (`python:` reward spec, on
    prompt + completion, as the paper's classifier reads the whole review)."""
    return [1.0 / (1.0 + math.exp(-logit(text))) for text in texts]


def _pick(rng: np.random.Generator, options: Sequence):
    return options[rng.integers(len(options))]


def _sentiment_clause(rng: np.random.Generator, positive: bool) -> list[str]:
    """A clause meaning `positive` (or not): a sentiment word, sometimes intensified, sometimes "not" + its opposite."""
    negate = rng.random() < 0.2
    word_positive = positive != negate
    intensifier = [_pick(rng, list(INTENSIFIERS))] if rng.random() < 0.3 else []
    adjectives = list(POSITIVE_ADJECTIVES if word_positive else NEGATIVE_ADJECTIVES)
    kind = rng.integers(3)
    if kind == 0:
        return ["the", _pick(rng, NOUNS), "was", *(["not"] if negate else []), *intensifier, _pick(rng, adjectives)]
    if kind == 1:
        past, base, _ = _pick(rng, [v for v in VERBS if (v[2] > 0) == word_positive])
        verb = ["did", "not", base] if negate else [past]
        return ["i", *verb, "the", _pick(rng, NOUNS)]
    return ["it", "is", *(["not"] if negate else []), "a", *intensifier, _pick(rng, adjectives), _pick(rng, FILM_NOUNS)]


def _neutral_clause(rng: np.random.Generator) -> list[str]:
    kind = rng.integers(3)
    if kind == 0:
        return ["i", "watched", "it", *_pick(rng, TIMES).split()]
    if kind == 1:
        return ["it", "is", "about", "a", *_pick(rng, TOPICS).split()]
    return ["the", _pick(rng, NOUNS), "was", _pick(rng, NEUTRAL_ADJECTIVES)]


def _clause(rng: np.random.Generator, p_positive: float) -> tuple[list[str], bool | None]:
    if rng.random() < 0.25:
        return _neutral_clause(rng), None
    positive = bool(rng.random() < p_positive)
    return _sentiment_clause(rng, positive), positive


def _sentence(rng: np.random.Generator, p_positive: float) -> list[str]:
    words, sign = _clause(rng, p_positive)
    if rng.random() < 0.4:
        more, other = _clause(rng, p_positive)
        words += ["but" if None not in (sign, other) and sign != other else "and", *more]
    return words + ["."]


def make_review(rng: np.random.Generator) -> str:
    """One review of MIN_WORDS–MAX_WORDS words: a mood, then two or three sentences (redrawn until it fits)."""
    weights = np.array([m[0] for m in MOODS])
    p_positive = MOODS[rng.choice(len(MOODS), p=weights / weights.sum())][1]
    while True:
        sentences = [_sentence(rng, p_positive) for _ in range(2 + int(rng.random() < 0.5))]
        if rng.random() < 0.3:
            sentences[-1] = ["overall", *sentences[-1]]
        words = [w for s in sentences for w in s]
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " ".join(words)


def make_reviews(num: int, seed: int, split: str) -> list[str]:
    """`num` reviews of one of the STREAMS ("sft", "train", "eval"): disjoint seeded streams, deterministic."""
    rng = np.random.default_rng([seed, STREAMS[split]])
    return [make_review(rng) for _ in range(num)]


def split_prefix(review: str, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, completion): the review's first 2–8 words, and the rest with a leading space."""
    words = review.split()
    length = int(rng.integers(MIN_PREFIX, MAX_PREFIX + 1))
    return " ".join(words[:length]), " " + " ".join(words[length:])


def prefixes(num: int, seed: int, split: str) -> list[str]:
    """`num` prompts of a split: a 2–8-word prefix of each of its reviews (the paper's IMDb prompts)."""
    rng = np.random.default_rng([seed, STREAMS[split], 1])
    return [split_prefix(review, rng)[0] for review in make_reviews(num, seed, split)]


def sft_records(num: int, seed: int) -> list[dict]:
    """Unpaired records {prompt, completion, label} of the SFT corpus: prefix, the rest, p(positive) > 0.5."""
    rng = np.random.default_rng([seed, STREAMS["sft"], 1])
    records = []
    for review in make_reviews(num, seed, "sft"):
        prompt, completion = split_prefix(review, rng)
        records.append({"prompt": prompt, "completion": completion, "label": score([review])[0] > 0.5})
    return records


def save_tokenizer(directory: str) -> None:
    """A word-level Hugging Face tokenizer over WORDS (dpo_jax's WordTokenizer ids), loadable as hf:<directory>.

    Its decoder puts a space before every word, so a decoded completion starts with one: the `python:` reward
    scores `prompt + completion` texts, which would otherwise glue the prompt's last word to the completion's first.
    """
    from tokenizers import Regex, decoders

    from dpo_jax.data.tokenizer import WordTokenizer

    tokenizer = WordTokenizer(WORDS).to_hf()
    tokenizer.backend_tokenizer.decoder = decoders.Replace(Regex("^"), " ")
    tokenizer.save_pretrained(directory)


def _alternatives(words) -> str:
    return "(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + ")"


def _review_pattern() -> re.Pattern:
    """The grammar of `make_review` as a regular expression over space-separated words."""
    adjective = _alternatives([*POSITIVE_ADJECTIVES, *NEGATIVE_ADJECTIVES])
    intensified = f"(?:{_alternatives(INTENSIFIERS)} )?{adjective}"
    noun = _alternatives(NOUNS)
    clause = "|".join([
        f"the {noun} was (?:not )?{intensified}", f"the {noun} was {_alternatives(NEUTRAL_ADJECTIVES)}",
        f"i {_alternatives([v[0] for v in VERBS])} the {noun}", f"i did not {_alternatives([v[1] for v in VERBS])} the {noun}",
        f"it is (?:not )?a {intensified} {_alternatives(FILM_NOUNS)}",
        f"i watched it {_alternatives(TIMES)}", f"it is about a {_alternatives(TOPICS)}",
    ])
    sentence = f"(?:overall )?(?:{clause})(?: (?:and|but) (?:{clause}))? \\."
    return re.compile(f"{sentence}(?: {sentence})*")


REVIEW_PATTERN = _review_pattern()


def is_well_formed(text: str, cut: bool = False) -> bool:
    """Whether the grammar could have written `text` (whole sentences of its clauses, any number of them): a
    degenerate sample (repeated words, a clause cut short) is not. `cut`: the text was stopped by a token limit,
    so only its sentences up to the last "." are judged."""
    words = words_of(text)
    if cut:
        if "." not in words:
            return False
        words = words[:len(words) - words[::-1].index(".")]
    return REVIEW_PATTERN.fullmatch(" ".join(words)) is not None
