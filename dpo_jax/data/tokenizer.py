"""Tokenizers: a built-in whitespace word tokenizer that duck-types the Hugging Face bits we use.

Callers rely only on `pad_token_id`, `eos_token_id`, `vocab_size`, `encode(text, add_special_tokens=False)`
and `decode(ids)`, so a `transformers` tokenizer can stand in (see `get_tokenizer`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from dpo_jax.data import synthetic

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<unk>")


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary; ids 0/1/2 are pad/eos/unk."""

    pad_token_id: int = 0
    eos_token_id: int = 1
    unk_token_id: int = 2

    def __init__(self, words: Iterable[str]) -> None:
        words = list(dict.fromkeys(words))
        for w in words:
            if not w or w != w.strip() or len(w.split()) != 1 or w in SPECIAL_TOKENS:
                raise ValueError(f"WordTokenizer: invalid vocabulary word {w!r} (must be one non-special word)")
        self.id_to_word: list[str] = list(SPECIAL_TOKENS) + words
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.id_to_word)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.id_to_word)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of the whitespace-separated words of `text` (unknown words -> unk); adds no special tokens."""
        del add_special_tokens  # Accepted for Hugging Face compatibility; nothing is ever added.
        return [self.word_to_id.get(w, self.unk_token_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Words of `ids` joined by spaces, skipping pad and eos."""
        skip = (self.pad_token_id, self.eos_token_id)
        return " ".join(self.id_to_word[int(i)] for i in ids if int(i) not in skip)


_BUILTIN = {"synthetic_words": lambda: WordTokenizer(synthetic.WORDS)}


def tokenizer_names() -> list[str]:
    """Names `get_tokenizer` accepts (built-in ones; `hf:<path>` will be added later)."""
    return sorted(_BUILTIN)


def get_tokenizer(name: str) -> WordTokenizer:
    """Tokenizer by name: "synthetic_words" is the built-in vocabulary of the synthetic task."""
    if name in _BUILTIN:
        return _BUILTIN[name]()
    if name.startswith("hf:"):
        # Place for Hugging Face tokenizers: `transformers.AutoTokenizer.from_pretrained(name[3:])`
        # (set pad_token_id from eos if missing). Arrives in a later issue.
        raise NotImplementedError(f"tokenizer {name!r}: Hugging Face tokenizers (hf:<path>) are not supported yet")
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(tokenizer_names())}")
