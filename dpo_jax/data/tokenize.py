"""Tokenisation rules for preference pairs and prompts (the only place they live), as in the DPO reference code.

A sequence is prompt tokens + completion tokens + EOS, right-padded with `pad_token_id` to `max_length`.
`loss_mask[t] = 1` exactly where `tokens[t]` is a completion token (EOS included); the trainer scores
tokens[t] with the logits at position t − 1, so every prompt must keep at least one token.

Truncation (reference code): if prompt + longer completion (with EOS) exceeds `max_length`, the prompt
is cut to `max_prompt_length` ("keep_end" keeps its end, as for dialogue; "keep_start" its start); if
still too long, both completions are cut to `max_length − max_prompt_length` tokens, exactly as the
reference code does (even when the prompt is shorter than `max_prompt_length`). The EOS can be cut off
then: the completion is scored as an unfinished prefix. At least one completion token always remains.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start")
PAIR_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")


def check_truncation_args(max_length: int, max_prompt_length: int, truncation_mode: str) -> None:
    """ValueError unless 1 <= max_prompt_length < max_length and truncation_mode is known."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be less than max_length ({max_length}) "
            "so every completion keeps at least one token"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


def _encode_field(example: Mapping[str, Any], field: str, tokenizer) -> list[int]:
    """Token ids of one text field, with an error naming the field when it is missing, not text, or empty."""
    if not isinstance(example, Mapping):
        raise ValueError(f"example must be a mapping with keys {PAIR_FIELDS}, got {type(example).__name__}")
    if field not in example:
        raise ValueError(f"example is missing the {field!r} field (has {sorted(example)})")
    text = example[field]
    if not isinstance(text, str):
        raise ValueError(f"example field {field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"example field {field!r} is empty")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError(f"example field {field!r} encodes to no tokens: {text!r}")
    return ids


def _truncate_prompt(ids: list[int], max_prompt_length: int, truncation_mode: str) -> list[int]:
    return ids[-max_prompt_length:] if truncation_mode == "keep_end" else ids[:max_prompt_length]


def _sequence(prompt: list[int], completion: list[int], max_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((max_length,), pad_id, dtype=np.int32)
    mask = np.zeros((max_length,), dtype=np.float32)
    tokens[: len(prompt)] = prompt
    tokens[len(prompt) : len(prompt) + len(completion)] = completion
    mask[len(prompt) : len(prompt) + len(completion)] = 1.0
    return tokens, mask


def tokenize_pair(
    example: Mapping[str, Any],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> dict[str, Any]:
    """Token ids and completion loss masks ([max_length]) for chosen and rejected, plus a `truncated` flag.

    Raises ValueError naming the field for a missing, non-string or empty prompt/chosen/rejected.
    """
    check_truncation_args(max_length, max_prompt_length, truncation_mode)
    prompt, chosen, rejected = (_encode_field(example, f, tokenizer) for f in PAIR_FIELDS)
    eos = tokenizer.eos_token_id
    chosen, rejected = chosen + [eos], rejected + [eos]
    longer = max(len(chosen), len(rejected))
    truncated = False
    if len(prompt) + longer > max_length:
        truncated = len(prompt) > max_prompt_length
        prompt = _truncate_prompt(prompt, max_prompt_length, truncation_mode)
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length  # >= 1 since max_prompt_length < max_length.
        truncated = True
        chosen, rejected = chosen[:keep], rejected[:keep]
    chosen_tokens, chosen_mask = _sequence(prompt, chosen, max_length, tokenizer.pad_token_id)
    rejected_tokens, rejected_mask = _sequence(prompt, rejected, max_length, tokenizer.pad_token_id)
    return {
        "chosen_tokens": chosen_tokens,
        "chosen_loss_mask": chosen_mask,
        "rejected_tokens": rejected_tokens,
        "rejected_loss_mask": rejected_mask,
        "truncated": truncated,
    }


def tokenize_prompts(
    prompts: Sequence[str],
    tokenizer,
    *,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts for generation: (tokens_NxP int32 right-padded with pad id, lengths_N int32), P = max_prompt_length.

    Long prompts are truncated as in `tokenize_pair`; an empty prompt raises ValueError with its index.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    tokens_NxP = np.full((len(prompts), max_prompt_length), tokenizer.pad_token_id, dtype=np.int32)
    lengths_N = np.zeros((len(prompts),), dtype=np.int32)
    for i, text in enumerate(prompts):
        try:
            ids = _encode_field({"prompt": text}, "prompt", tokenizer)
        except ValueError as e:
            raise ValueError(f"prompts[{i}]: {e}") from e
        ids = _truncate_prompt(ids, max_prompt_length, truncation_mode)
        tokens_NxP[i, : len(ids)] = ids
        lengths_N[i] = len(ids)
    return tokens_NxP, lengths_N
