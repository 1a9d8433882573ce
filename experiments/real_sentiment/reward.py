"""The experiment's ground-truth reward: VADER's compound sentiment score of the model's continuation, in [−1, 1].

VADER (Hutto & Gilbert, 2014; the `vadersentiment` package, the `experiments` extra) sums the valence of lexicon
words with rules for negation, intensifiers, capitals and punctuation, and squashes the sum into [−1, 1]. It plays
the paper's sentiment classifier: a fixed, known reward the policy is optimised against, not a learned one.

Used as `eval.reward = python:experiments.real_sentiment.reward:vader_compound`, which the trainer calls on
`prompt + completion` texts. The prompt is the chat-templated request (its system turn says "helpful", a
lexicon word), so the score is taken on the text after the last ChatML assistant header: the continuation alone.
A text without the header (a tokenizer with another template, e.g. the --quick stand-in's) is scored whole.
"""

from __future__ import annotations

import functools
from typing import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

SPEC = "python:experiments.real_sentiment.reward:vader_compound"
ASSISTANT_HEADER = "\nassistant\n"  # ChatML's "<|im_start|>assistant\n" once the decoder drops special tokens


@functools.cache
def analyzer() -> SentimentIntensityAnalyzer:
    """One VADER analyzer (loading its lexicon takes ~0.1 s)."""
    return SentimentIntensityAnalyzer()


def continuation(text: str) -> str:
    """The part of a decoded prompt + completion after the last assistant header (the whole text without one)."""
    return text.rpartition(ASSISTANT_HEADER)[2]


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER's compound score of each text's continuation (see `continuation`); 0.0 for one with no lexicon word."""
    return [analyzer().polarity_scores(continuation(text))["compound"] for text in texts]


def lexicon_words(text: str) -> list[tuple[str, float]]:
    """(word, valence) of each word of `text` in VADER's lexicon, in order (lower-cased, punctuation stripped): what
    a continuation earns its reward with, for the report's repetition counts."""
    lexicon = analyzer().lexicon
    words = (word.strip(".,!?;:\"'()*-").lower() for word in text.split())
    return [(word, lexicon[word]) for word in words if word in lexicon]
