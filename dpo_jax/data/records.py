"""Preference records: the one shape every data source hands to tokenisation, and why a record can be bad.

A source yields records (dicts) of one of two kinds:

- paired: {"prompt", "chosen", "rejected"}: a prompt and two completions, the first preferred (DPO and variants);
- unpaired: {"prompt", "completion", "label"}: one completion marked desirable (True) or not (KTO; SFT uses
  every completion).

Each text is a string, or chat messages (a list of {"role", "content"} dicts) that tokenisation renders with the
tokenizer's chat template. Every record also carries "origin", where it came from ("comparisons/batch3.json:17",
"prefs.jsonl:5", "row 12"), and "problem": "" for a good record, else "<reason>: <detail>" with a reason from
`REASONS`: a source never drops a bad record, it marks it, and tokenisation skips (counting by reason) or stops
(`data.strict`), naming the origin.
"""

from __future__ import annotations

from typing import Any, Mapping

PAIRED_FIELDS: tuple[str, ...] = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS: tuple[str, ...] = ("prompt", "completion", "label")

# Why a record is skipped (counted under this name in data_report.json) or, with data.strict, stops the run.
REASONS: dict[str, str] = {
    "unparsable": "the line or row could not be parsed (not JSON, not an object)",
    "invalid_utf8": "a text is not valid UTF-8",
    "missing_field": "a field the record's kind needs is missing",
    "not_a_string": "a text field holds something other than a string or chat messages",
    "bad_messages": "chat messages that are not a list of {role, content} strings",
    "bad_label": "a label is not what it must be (an unpaired record's true/false, a comparison's choice, a score)",
    "no_shared_prompt": "chosen and rejected (given without a prompt) share no prompt prefix",
    "prompt_mismatch": "chosen and rejected do not start with the same prompt",
    "empty_prompt": "the prompt is empty or encodes to no tokens",
    "empty_completion": "a completion is empty or encodes to no tokens",
    "identical_completions": "chosen and rejected are the same",
    "truncated_to_empty": "truncation to max_length leaves a completion no token of its own",
}


class BadRecord(ValueError):
    """A record that cannot be trained on: `reason` is a key of REASONS, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str, origin: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {reason!r}; valid: {', '.join(REASONS)}")
        self.reason, self.detail, self.origin = reason, detail, origin
        super().__init__(f"{origin + ': ' if origin else ''}{reason}: {detail}")


def problem(reason: str, detail: str) -> str:
    """The "problem" value of a record that is bad for `reason` (a key of REASONS)."""
    if reason not in REASONS:
        raise ValueError(f"unknown bad-record reason {reason!r}; valid: {', '.join(REASONS)}")
    return f"{reason}: {detail}"


def raise_if_bad(record: Mapping[str, Any]) -> None:
    """BadRecord for a record its source marked with a problem."""
    if record.get("problem"):
        reason, _, detail = record["problem"].partition(": ")
        raise BadRecord(reason if reason in REASONS else "unparsable", detail, record.get("origin", ""))


def is_paired(record: Mapping[str, Any]) -> bool:
    """Whether a record is of the paired kind (it has chosen/rejected rather than completion/label)."""
    return "chosen" in record or "rejected" in record
