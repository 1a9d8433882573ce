"""Held-out text for the forgetting check (eval.perplexity_path): a UTF-8 text file tokenised as one stream and cut
into non-overlapping windows of the run's length, each starting with the tokenizer's special prefix (BOS where it
has one), so a perplexity over them is a function of the text, tokenizer and length alone."""

from __future__ import annotations

import numpy as np


def text_windows(path: str, tokenizer, length: int, max_windows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, length] int32, mask [N, length] float32) of `path`'s text: mask is 1 at every real token that is
    scored (a window's positions 1.., i.e. each token predicted from the ones before it in its window), 0 at the
    first position and the padding of the last window. `max_windows` > 0 keeps the first that many.
    ValueError naming the file when it is unreadable or holds no text."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the held-out text ({error}); expected a UTF-8 text file") from error
    prefix = list(getattr(tokenizer, "special_prefix", ()))
    ids = tokenizer.encode(text)
    per_window = length - len(prefix)
    if per_window < 1:
        raise ValueError(f"length {length} leaves no room for text after the special prefix {prefix}")
    if not ids:
        raise ValueError(f"{path}: no text to score (it encodes to no tokens)")
    starts = list(range(0, len(ids), per_window))
    if max_windows:
        starts = starts[:max_windows]
    tokens = np.full((len(starts), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(starts), length), np.float32)
    for row, start in enumerate(starts):
        window = prefix + ids[start:start + per_window]
        tokens[row, :len(window)] = window
        mask[row, 1:len(window)] = 1.0
    return tokens, mask
