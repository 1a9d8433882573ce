"""Preference pairs of the policy's own samples (iterative DPO): its generated tokens kept as they are, so training
sees exactly what was sampled, under the rules every other pair follows (EOS ends each completion, truncation)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dpo_jax.data.records import BadRecord
from dpo_jax.data.tokenize import truncate


def encode_generated_pair(
    prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], *, eos_id: int, max_length: int,
    max_prompt_length: int, truncation_mode: str = "keep_end",
) -> dict:
    """An encoded pair ({"prompt", "chosen", "rejected": int32 arrays, "truncated"}, as `encode_record` gives) of
    generated token ids: a completion that stopped without EOS (max_new_tokens, a stop string) gets one appended; an
    empty completion is EOS alone (stopping at once is a choice the policy made). BadRecord "identical_completions"
    when both are the same tokens."""
    completions = [list(map(int, c)) for c in (chosen, rejected)]
    completions = [c if c and c[-1] == eos_id else [*c, eos_id] for c in completions]
    if completions[0] == completions[1]:
        raise BadRecord("identical_completions", "chosen and rejected are the same tokens")
    prompt_ids, completions, truncated = truncate(
        list(map(int, prompt)), completions, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode)
    return {"prompt": np.asarray(prompt_ids, np.int32), "chosen": np.asarray(completions[0], np.int32),
            "rejected": np.asarray(completions[1], np.int32), "truncated": truncated}
