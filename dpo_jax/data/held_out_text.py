"""Held-out text for the forgetting check (eval.perplexity_path): a UTF-8 text file, or the `text` column of a Hub
dataset's split ('hf:ORG/NAME?split=test', its rows joined by blank lines), tokenised as one stream and cut into
non-overlapping windows of the run's length, each starting with the tokenizer's special prefix (BOS where it has
one), so a perplexity over them is a function of the text, tokenizer and length alone."""

from __future__ import annotations

import numpy as np

from dpo_jax.data import hub
from dpo_jax.data.files import file_rows

TEXT_COLUMN = "text"


def read_text(path: str, cache_dir: str = "") -> str:
    """The held-out text of `path`: a file's contents, or a Hub dataset split's `text` column joined by blank lines
    (hub.py finds and caches its files). ValueError naming the source when it cannot be read."""
    if not hub.is_hub_source(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read the held-out text ({error}); expected a UTF-8 text file") from error
    spec = hub.parse_spec(path, split="test")
    texts = []
    for local, relative in hub.split_files(spec, spec.split, cache_dir):
        for origin, row, bad in file_rows(local, f"{spec.repo_id}/{relative}"):
            if bad or not isinstance(row, dict) or not isinstance(row.get(TEXT_COLUMN), str):
                raise ValueError(f"{path}: {origin}: expected a row with a {TEXT_COLUMN!r} string ({bad or row!r:.80})")
            texts.append(row[TEXT_COLUMN])
    return "\n\n".join(texts)


def text_windows(path: str, tokenizer, length: int, max_windows: int = 0,
                 cache_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, length] int32, mask [N, length] float32) of `path`'s text: mask is 1 at every real token that is
    scored (a window's positions 1.., i.e. each token predicted from the ones before it in its window), 0 at the
    first position and the padding of the last window. `max_windows` > 0 keeps the first that many.
    `path` may name a Hub dataset (see `read_text`; `cache_dir`: its Hub cache). ValueError naming the source when it
    is unreadable or holds no text."""
    text = read_text(path, cache_dir)
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
