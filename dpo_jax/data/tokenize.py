"""Tokenisation rules for preference records (the only place they live), as the DPO reference implementation has them.

A paired record becomes prompt, chosen and rejected ids; an unpaired one prompt and completion ids:

- Each text is encoded on its own without special tokens, so no token merges across the prompt/completion
  boundary: training sees the tokens the model reads and writes at generation time.
- The prompt starts with the tokenizer's special prefix (Llama's BOS) exactly once: added unless a chat
  template already put it there; completions get none.
- Chat messages go through the tokenizer's chat template: the prompt with the generation prompt, a completion as
  the text the template adds after the prompt.
- Every completion ends with one EOS: appended to a text; for a chat completion the template's own closing EOS is
  kept (whitespace after it dropped) or one is appended.
- If prompt + longer completion exceed `max_length`, the prompt is cut to `max_prompt_length` ("keep_end" keeps
  its end, as for dialogue, "keep_start" its start; the special prefix stays), and if still too long both
  completions are cut to `max_length − max_prompt_length`, exactly as the reference code does (even when the
  prompt is shorter). The EOS can be cut off then: the completion is scored as an unfinished prefix.

The trainer scores completion token t from the logits at t − 1, so a prompt keeps at least one token. A record
that cannot train raises records.BadRecord with its reason: empty prompt or completion, identical completions,
a completion left with no text token, or whatever its source marked.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dpo_jax.data.records import PAIRED_FIELDS, UNPAIRED_FIELDS, BadRecord, is_paired, raise_if_bad
from dpo_jax.data.tokenizer import NoChatTemplate

TRUNCATION_MODES: tuple[str, ...] = ("keep_end", "keep_start")


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


def _field(record: Mapping[str, Any], name: str) -> str | list:
    """A text field: a string or chat messages; BadRecord if it is missing or of another type."""
    if name not in record or record[name] is None:
        raise BadRecord("missing_field", f"no {name!r} (has {sorted(k for k in record if k not in ('origin', 'problem'))})")
    value = record[name]
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return list(value)
    raise BadRecord("not_a_string", f"{name!r} is a {type(value).__name__}, not text or chat messages")


def _with_prefix(ids: list[int], prefix: Sequence[int]) -> list[int]:
    return ids if not prefix or ids[: len(prefix)] == list(prefix) else [*prefix, *ids]


def _render(messages: list, tokenizer, add_generation_prompt: bool = False) -> str:
    """Chat messages as text through the tokenizer's template; a template that fails on them is a BadRecord."""
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
    except NoChatTemplate:
        raise
    except Exception as error:  # jinja's TemplateError, transformers' ValueError: this record's messages
        raise BadRecord("bad_messages", f"the chat template fails on them: {error}") from None


def encode_prompt(prompt: str | list, tokenizer) -> tuple[list[int], str]:
    """(prompt ids with the special prefix once, the prompt's text as tokenised); BadRecord if empty."""
    if not isinstance(prompt, str) and not any(message["content"].strip() for message in prompt):
        raise BadRecord("empty_prompt", "the prompt has no message content")
    text = prompt if isinstance(prompt, str) else _render(prompt, tokenizer, add_generation_prompt=True)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not text.strip() or not ids:
        raise BadRecord("empty_prompt", "the prompt is empty" if not text.strip() else "the prompt encodes to no tokens")
    return _with_prefix(ids, tokenizer.special_prefix), text


def _end_with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        if not tokenizer.decode(ids[last + 1:]).strip():
            return ids[: last + 1]
    return [*ids, eos]


def encode_completion(completion: str | list, prompt: str | list, prompt_text: str, tokenizer, name: str) -> list[int]:
    """Completion ids ending with EOS (see the module docstring); BadRecord if it has no content."""
    if isinstance(completion, str):
        ids = list(tokenizer.encode(completion, add_special_tokens=False))
        if not completion.strip() or not ids:
            raise BadRecord("empty_completion", f"{name!r} is empty" if not completion.strip() else f"{name!r} encodes to no tokens")
        return [*ids, tokenizer.eos_token_id]
    if isinstance(prompt, str):
        raise BadRecord("bad_messages", f"{name!r} is chat messages but the prompt is plain text")
    if not any(message["content"].strip() for message in completion):
        raise BadRecord("empty_completion", f"{name!r} has no message content")
    conversation = _render([*prompt, *completion], tokenizer)
    if not conversation.startswith(prompt_text):
        raise BadRecord("bad_messages", "the chat template renders the prompt differently inside the conversation")
    return _end_with_eos(list(tokenizer.encode(conversation[len(prompt_text):], add_special_tokens=False)), tokenizer)


def _prefix_length(prompt_ids: list[int], tokenizer) -> int:
    """How many leading prompt ids are the tokenizer's special prefix (kept by truncation)."""
    prefix = list(tokenizer.special_prefix)
    return len(prefix) if prefix and prompt_ids[: len(prefix)] == prefix else 0


def truncate_prompt(ids: list[int], max_prompt_length: int, truncation_mode: str, prefix_length: int = 0) -> list[int]:
    """At most `max_prompt_length` ids: the end ("keep_end") or the start ("keep_start"); the first
    `prefix_length` ids (the special prefix) are kept either way."""
    if len(ids) <= max_prompt_length:
        return ids
    if truncation_mode == "keep_start":
        return ids[:max_prompt_length]
    body = max_prompt_length - prefix_length
    return ids[:prefix_length] + (ids[-body:] if body > 0 else [])


def truncate(
    prompt: list[int], completions: list[list[int]], *, max_length: int, max_prompt_length: int,
    truncation_mode: str, prefix_length: int = 0,
) -> tuple[list[int], list[list[int]], bool]:
    """(prompt, completions, truncated) by the reference rules (see the module docstring)."""
    longer = max(len(c) for c in completions)
    truncated = False
    if len(prompt) + longer > max_length and len(prompt) > max_prompt_length:
        prompt, truncated = truncate_prompt(prompt, max_prompt_length, truncation_mode, prefix_length), True
    if len(prompt) + longer > max_length:
        keep = max_length - max_prompt_length  # >= 1 since max_prompt_length < max_length.
        completions, truncated = [c[:keep] for c in completions], True
    return prompt, completions, truncated


def encode_record(
    record: Mapping[str, Any], tokenizer, *, max_length: int, max_prompt_length: int, truncation_mode: str = "keep_end"
) -> dict[str, Any]:
    """Token ids of a record, truncated: {"prompt", "chosen", "rejected"} (paired) or {"prompt", "completion",
    "label"} (unpaired) as int32 arrays, plus "truncated". BadRecord (with the record's origin) if it cannot train."""
    check_truncation_args(max_length, max_prompt_length, truncation_mode)  # Settings errors are never skipped.
    try:
        raise_if_bad(record)
        if not is_paired(record) and "completion" not in record:
            raise BadRecord("missing_field", "neither 'chosen' and 'rejected' (paired) nor 'completion' (unpaired)")
        fields = PAIRED_FIELDS[1:] if is_paired(record) else UNPAIRED_FIELDS[1:2]
        prompt = _field(record, "prompt")
        prompt_ids, prompt_text = encode_prompt(prompt, tokenizer)
        completions = [encode_completion(_field(record, f), prompt, prompt_text, tokenizer, f) for f in fields]
        if len(completions) == 2 and completions[0] == completions[1]:
            raise BadRecord("identical_completions", "chosen and rejected encode to the same tokens")
        if not is_paired(record) and not isinstance(record.get("label"), bool):
            raise BadRecord("bad_label", f"label is {record.get('label')!r}, not true/false")
        prompt_ids, completions, truncated = truncate(
            prompt_ids, completions, max_length=max_length, max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode, prefix_length=_prefix_length(prompt_ids, tokenizer),
        )
        for name, ids in zip(fields, completions):
            if all(t in tokenizer.special_ids for t in ids):
                raise BadRecord("truncated_to_empty", f"{name!r} keeps only special tokens after truncation")
    except BadRecord as bad:
        bad.origin = bad.origin or str(record.get("origin", ""))
        raise BadRecord(bad.reason, bad.detail, bad.origin) from None
    out: dict[str, Any] = {"prompt": np.asarray(prompt_ids, np.int32), "truncated": truncated}
    out.update({name: np.asarray(ids, np.int32) for name, ids in zip(fields, completions)})
    if not is_paired(record):
        out["label"] = record["label"]
    return out


def encode_prompts(
    prompts: Sequence[str | list], tokenizer, *, max_prompt_length: int, truncation_mode: str = "keep_end"
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts for generation: (tokens_NxP int32 right-padded with pad id, lengths_N int32), P = max_prompt_length,
    encoded and truncated as training prompts are. An empty prompt raises ValueError with its index."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    tokens_NxP = np.full((len(prompts), max_prompt_length), tokenizer.pad_token_id, dtype=np.int32)
    lengths_N = np.zeros((len(prompts),), dtype=np.int32)
    for i, prompt in enumerate(prompts):
        try:
            ids, _ = encode_prompt(prompt, tokenizer)
        except BadRecord as bad:
            raise ValueError(f"prompts[{i}]: {bad.reason}: {bad.detail}") from None
        ids = truncate_prompt(ids, max_prompt_length, truncation_mode, _prefix_length(ids, tokenizer))
        tokens_NxP[i, : len(ids)] = ids
        lengths_N[i] = len(ids)
    return tokens_NxP, lengths_N
