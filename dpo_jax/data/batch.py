"""The batch the step trains on, as a typed pytree, and `collate`, the one place that builds it from encoded examples.

Three batch types, one per layout (`Layout`; the same tokenised examples either way):
- `PairedBatch` (`pack = "none"`): a row per completion, `chosen` and `rejected` `Rows` (row i of each: pair i).
- `SharedPromptBatch` (`pack = "shared_prompt"`): a row per pair, `[prompt | chosen | rejected]`: rejected's
  positions continue from the prompt's end and branch ids keep chosen and rejected from seeing each other, so the
  prompt is run once.
- `PackedBatch` (`pack = "packed"`): several shared-prompt pairs per row of fixed length (first-fit decreasing,
  deterministic), each pair its own segment (it attends only within itself) with positions from 0; the rows' block
  lists pair p's chosen tokens under slot p and its rejected ones under slot P + p, so the P pairs of the batch
  come out in order whatever row they sit in. Rows are padded to a multiple of `Layout.row_multiple` (the
  data-parallel devices of a process) with empty rows.
- `UnpairedBatch` (unpaired data, KTO; any pack): `completion` rows, their `label`, and `kl` rows pairing
  prompt i with completion i + 1 (mod B), the mismatched pairs KTO's reference point is estimated on.
With `completion_only` (always for shared rows) each row also lists its scored tokens in a block of N entries, N
the smallest power of two that fits the global batch: the token (`targets_BxN`), the position whose hidden state
predicts it (`sources_BxN`) and the completion it belongs to (`slots_BxN`: 0 chosen / the row's completion,
1 rejected, −1 the block's padding), for `logprobs.gathered_logprobs`.

Every array leaf has the batch axis first (fields that a layout does not use are None, no leaf), so sharding a
batch, splitting it into micro-batches or moving it to the device maps over the pytree. Paired batches carry π_ref's
cached log-probs (`reference_chosen` / `reference_rejected` [B]) when the examples do (`with_reference_logps`);
evaluation batches carry `weight` [B] (1 a real example, 0 a padding row).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import jax
import numpy as np
from flax import struct

PACKS: tuple[str, ...] = ("none", "shared_prompt", "packed")
REFERENCE_KEYS: tuple[str, str] = ("reference_chosen", "reference_rejected")  # in encoded examples and batches
Array = Union[np.ndarray, jax.Array]


@struct.dataclass(kw_only=True)
class Rows:
    """Right-padded token rows [B, T] and how to score them: `loss_mask_BxT` (1 at completion tokens, scored at every
    position), or the completion-only block (`targets_BxN`, `sources_BxN`, `slots_BxN`); shared-prompt rows add
    `positions_BxT` and `branch_ids_BxT` (0 prompt, 1 chosen, 2 rejected, 3 padding); packed rows also
    `segment_ids_BxT` (a pair's index within its row, −1 padding). Unused fields are None."""

    tokens_BxT: Array
    loss_mask_BxT: Array | None = None
    positions_BxT: Array | None = None
    branch_ids_BxT: Array | None = None
    segment_ids_BxT: Array | None = None
    targets_BxN: Array | None = None
    sources_BxN: Array | None = None
    slots_BxN: Array | None = None

    @property
    def completion_only(self) -> bool:
        """Whether the rows list their scored tokens (the LM head runs at those positions only)."""
        return self.targets_BxN is not None


@struct.dataclass(kw_only=True)
class PairedBatch:
    """Pairs, a row per completion: `chosen` and `rejected` rows (prompt + completion), π_ref's cached log-probs
    [B] when the run uses a reference cache, and `weight` [B] in evaluation batches."""

    chosen: Rows
    rejected: Rows
    reference_chosen: Array | None = None
    reference_rejected: Array | None = None
    weight: Array | None = None


@struct.dataclass(kw_only=True)
class SharedPromptBatch:
    """Pairs, a row per pair `[prompt | chosen | rejected]` (`rows`: slot 0 of its block chosen, 1 rejected), π_ref's
    cached log-probs [B] when the run uses a reference cache, and `weight` [B] in evaluation batches."""

    rows: Rows
    reference_chosen: Array | None = None
    reference_rejected: Array | None = None
    weight: Array | None = None


@struct.dataclass(kw_only=True)
class PackedBatch:
    """Pairs packed several to a row (`rows`: slot p of the block pair p's chosen, slot P + p its rejected),
    `pair_ids` [P] (0..P−1: the batch's pair axis, which the pair arrays share), π_ref's cached log-probs [P] when
    the run uses a reference cache, and `weight` [P] in evaluation batches."""

    rows: Rows
    pair_ids: Array
    reference_chosen: Array | None = None
    reference_rejected: Array | None = None
    weight: Array | None = None


@struct.dataclass(kw_only=True)
class UnpairedBatch:
    """Unpaired examples (KTO): `completion` rows, `label` [B] (1.0 desirable), the mismatched `kl` rows, and
    `weight` [B] in evaluation batches."""

    completion: Rows
    kl: Rows
    label: Array
    weight: Array | None = None


Batch = Union[PairedBatch, SharedPromptBatch, PackedBatch, UnpairedBatch]
PAIRED_BATCHES = (PairedBatch, SharedPromptBatch, PackedBatch)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a batch lays out its examples: `pack` (see the module docstring) and whether rows list their scored
    tokens for completion-only log-probs (shared-prompt rows always do)."""

    pack: str = "none"
    completion_only: bool = False
    row_multiple: int = 1  # packed rows: their count is a multiple of this (the process's data-parallel devices)

    def __post_init__(self):
        if self.pack not in PACKS:
            raise ValueError(f"pack must be one of {PACKS}, got {self.pack!r}")
        if self.pack in ("shared_prompt", "packed"):
            object.__setattr__(self, "completion_only", True)
        if self.row_multiple < 1:
            raise ValueError(f"row_multiple must be >= 1, got {self.row_multiple}")

    def shares_prompt(self, examples: Sequence[dict]) -> bool:
        """Whether these examples get shared-prompt rows, one pair or several to a row (paired ones only: unpaired
        rows have one completion)."""
        return self.pack in ("shared_prompt", "packed") and "chosen" in examples[0]

    def packs(self, examples: Sequence[dict]) -> bool:
        """Whether these examples are packed several pairs to a row."""
        return self.pack == "packed" and "chosen" in examples[0]


def with_reference_logps(encoded: Sequence[dict], chosen: Sequence[float], rejected: Sequence[float]) -> list[dict]:
    """Encoded paired examples carrying π_ref's log-probs of their chosen and rejected completions, which `collate`
    puts in the batch (`reference_chosen` / `reference_rejected`); ValueError unless there is one of each per
    example."""
    if not len(encoded) == len(chosen) == len(rejected):
        raise ValueError(f"reference log-probs: {len(chosen)} chosen and {len(rejected)} rejected values for "
                         f"{len(encoded)} examples")
    if encoded and "chosen" not in encoded[0]:
        raise ValueError("reference log-probs: cached π_ref log-probs are for paired examples (chosen, rejected)")
    return [{**e, REFERENCE_KEYS[0]: float(c), REFERENCE_KEYS[1]: float(r)}
            for e, c, r in zip(encoded, chosen, rejected)]


def bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `length`; ValueError if none does."""
    fits = [b for b in buckets if b >= length]
    if not fits:
        raise ValueError(f"a row of {length} tokens is longer than the longest length bucket {max(buckets)}")
    return min(fits)


def _block_size(count: int) -> int:
    """Entries in a completion-only block: the smallest power of two ≥ count (at least 8), so few shapes compile."""
    return max(8, 1 << (count - 1).bit_length())


def _completion_keys(examples: Sequence[dict]) -> tuple[str, ...]:
    return ("chosen", "rejected") if "chosen" in examples[0] else ("completion",)


def _row_length(examples: Sequence[dict], layout: Layout) -> int:
    """The longest row the examples make: prompt + completion (+ the other completion in a shared row)."""
    keys = _completion_keys(examples)
    if layout.shares_prompt(examples):
        return max(len(e["prompt"]) + sum(len(e[key]) for key in keys) for e in examples)
    return max(len(e["prompt"]) + len(e[key]) for e in examples for key in keys)


def _scored_count(examples: Sequence[dict], layout: Layout) -> int:
    """The most completion tokens a row scores: one completion, or both in a shared row."""
    keys = _completion_keys(examples)
    if layout.shares_prompt(examples):
        return max(sum(len(e[key]) for key in keys) for e in examples)
    return max(len(e[key]) for e in examples for key in keys)


def pack_pairs(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of pairs of `lengths` tokens ([prompt | chosen | rejected]) in rows of
    `capacity` tokens, longest pairs placed first, ties in index order, each row's pairs in index order."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"a pair of {lengths[i]} tokens is longer than the packed row length {capacity}")
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return [sorted(r) for r in rows]


def _pair_length(e: dict) -> int:
    return len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"])


def _packed_layout(examples: Sequence[dict], length: int, layout: Layout) -> tuple[list[list[int]], int]:
    """(each row's pair indices, the rows' count: the bins padded to a multiple of layout.row_multiple)."""
    rows = pack_pairs([_pair_length(e) for e in examples], length)
    return rows, -(-len(rows) // layout.row_multiple) * layout.row_multiple


def padded_shape(examples: Sequence[dict], buckets: Sequence[int], layout: Layout) -> tuple[int, int]:
    """(row length L, completion-only block size N) that `collate` pads these examples to: the smallest bucket that
    holds the longest row, and the smallest block that holds the most scored tokens. Packed rows are the longest
    bucket long, and their block holds the most scored tokens of a packed row."""
    if layout.packs(examples):
        length = max(buckets)
        rows, _ = _packed_layout(examples, length, layout)
        scored = max(sum(len(examples[i]["chosen"]) + len(examples[i]["rejected"]) for i in row) for row in rows)
        return length, _block_size(scored)
    return bucket(_row_length(examples, layout), buckets), _block_size(_scored_count(examples, layout))


def packed_row_count(examples: Sequence[dict], buckets: Sequence[int], layout: Layout) -> int:
    """How many rows `collate` packs these paired examples into (a multiple of layout.row_multiple)."""
    return _packed_layout(examples, max(buckets), layout)[1]


def _rows(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], length: int, pad_id: int):
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.float32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        completion = completion[: length - len(prompt)]  # only a mismatched kl row can be longer than the batch
        tokens[i, : len(prompt)] = prompt
        tokens[i, len(prompt) : len(prompt) + len(completion)] = completion
        mask[i, len(prompt) : len(prompt) + len(completion)] = 1.0
    return tokens, mask


def _empty_block(rows: int, block: int) -> dict[str, np.ndarray]:
    return {"sources_BxN": np.zeros((rows, block), np.int32), "targets_BxN": np.zeros((rows, block), np.int32),
            "slots_BxN": np.full((rows, block), -1, np.int32)}


def _fill(block: dict[str, np.ndarray], row: int, start: int, first_source: int, at: int, ids: np.ndarray, slot: int):
    """List completion `ids`, which sit at row positions at.., in the block from entry `start`: token k is predicted
    from position at + k − 1, the first one from `first_source`."""
    n = len(ids)
    if not n:
        return
    block["targets_BxN"][row, start : start + n] = ids
    block["sources_BxN"][row, start : start + n] = np.arange(at - 1, at + n - 1)
    block["sources_BxN"][row, start] = first_source
    block["slots_BxN"][row, start : start + n] = slot


def _scored_block(tokens: np.ndarray, mask: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """The completion-only block of one-completion rows: each row's masked tokens (slot 0)."""
    out = _empty_block(len(tokens), block)
    for row, (row_tokens, row_mask) in enumerate(zip(tokens, mask)):
        at = np.flatnonzero(row_mask)
        if len(at):
            _fill(out, row, 0, at[0] - 1, at[0], row_tokens[at], 0)
    return out


def _completion_rows(
    prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], length: int, pad_id: int, layout: Layout,
    block: int,
) -> Rows:
    """A row per (prompt, completion): tokens and loss mask, plus the completion-only block with `layout` asking."""
    tokens, mask = _rows(prompts, completions, length, pad_id)
    scored = _scored_block(tokens, mask, block) if layout.completion_only else {}
    return Rows(tokens_BxT=tokens, loss_mask_BxT=mask, **scored)


def _shared_prompt_rows(examples: Sequence[dict], length: int, block: int, pad_id: int) -> Rows:
    """`[prompt | chosen | rejected]` rows: tokens, positions (rejected's continue from the prompt's end), branch
    ids (0 prompt, 1 chosen, 2 rejected, 3 padding) and the block of both completions' tokens."""
    B = len(examples)
    tokens = np.full((B, length), pad_id, np.int32)
    positions, branch_ids = np.zeros((B, length), np.int32), np.full((B, length), 3, np.int32)
    scored = _empty_block(B, block)
    for row, e in enumerate(examples):
        prompt, chosen, rejected = e["prompt"], e["chosen"], e["rejected"]
        P, C, R = len(prompt), len(chosen), len(rejected)
        tokens[row, : P + C + R] = np.concatenate([prompt, chosen, rejected])
        positions[row, : P + C + R] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
        branch_ids[row, : P + C + R] = np.repeat([0, 1, 2], [P, C, R])
        _fill(scored, row, 0, P - 1, P, chosen, 0)
        _fill(scored, row, C, P - 1, P + C, rejected, 1)
    return Rows(tokens_BxT=tokens, positions_BxT=positions, branch_ids_BxT=branch_ids, **scored)


def _packed_rows(examples: Sequence[dict], length: int, block: int, pad_id: int, layout: Layout,
                 num_rows: int | None) -> Rows:
    """Rows of `length` tokens each holding several `[prompt | chosen | rejected]` pairs (`pack_pairs`), each pair
    a segment with its own positions and branch ids; block slot p: pair p's chosen tokens, P + p its rejected ones.
    `num_rows` (≥ the rows needed) pads with empty rows, so every process of a run has the same count."""
    P = len(examples)
    packing, needed = _packed_layout(examples, length, layout)
    num_rows = num_rows or needed
    if num_rows < needed:
        raise ValueError(f"packed rows: these pairs need {needed} rows, asked for {num_rows}")
    tokens = np.full((num_rows, length), pad_id, np.int32)
    positions = np.zeros((num_rows, length), np.int32)
    branch_ids, segment_ids = np.full((num_rows, length), 3, np.int32), np.full((num_rows, length), -1, np.int32)
    scored = _empty_block(num_rows, block)
    for row, pairs in enumerate(packing):
        at = entry = 0
        for segment, p in enumerate(pairs):
            e = examples[p]
            prompt, chosen, rejected = e["prompt"], e["chosen"], e["rejected"]
            L_P, C, R = len(prompt), len(chosen), len(rejected)
            end = at + L_P + C + R
            tokens[row, at:end] = np.concatenate([prompt, chosen, rejected])
            positions[row, at:end] = np.concatenate([np.arange(L_P + C), np.arange(L_P, L_P + R)])
            branch_ids[row, at:end] = np.repeat([0, 1, 2], [L_P, C, R])
            segment_ids[row, at:end] = segment
            _fill(scored, row, entry, at + L_P - 1, at + L_P, chosen, p)
            _fill(scored, row, entry + C, at + L_P - 1, at + L_P + C, rejected, P + p)
            at, entry = end, entry + C + R
    return Rows(tokens_BxT=tokens, positions_BxT=positions, branch_ids_BxT=branch_ids, segment_ids_BxT=segment_ids,
                **scored)


def collate(
    examples: Sequence[dict], buckets: Sequence[int], pad_id: int, length: int | None = None,
    layout: Layout = Layout(), block: int | None = None, num_rows: int | None = None,
) -> Batch:
    """The batch of encoded examples in `layout` (module docstring): rows right-padded to L, the smallest bucket that
    fits (or `length`), and completion-only blocks of `block` entries (default: what these examples need). Packed
    rows are the longest bucket long (or `length`), `num_rows` of them (default: as many as the pairs need). Unpaired
    kl rows' completions are cut to L if longer."""
    if not examples:
        raise ValueError("collate: no examples")
    default_length, default_block = padded_shape(examples, buckets, layout)
    length, block = length or default_length, block or default_block
    if "chosen" not in examples[0]:
        prompts = [e["prompt"] for e in examples]
        completions = [e["completion"] for e in examples]
        return UnpairedBatch(
            completion=_completion_rows(prompts, completions, length, pad_id, layout, block),
            kl=_completion_rows(prompts, completions[1:] + completions[:1], length, pad_id, layout, block),
            label=np.asarray([e["label"] for e in examples], np.float32),
        )
    reference = {name: np.asarray([e[name] for e in examples], np.float32)  # cached π_ref log-probs
                 for name in REFERENCE_KEYS if name in examples[0]}
    if layout.packs(examples):
        return PackedBatch(rows=_packed_rows(examples, length, block, pad_id, layout, num_rows),
                           pair_ids=np.arange(len(examples), dtype=np.int32), **reference)
    if layout.shares_prompt(examples):
        return SharedPromptBatch(rows=_shared_prompt_rows(examples, length, block, pad_id), **reference)
    prompts = [e["prompt"] for e in examples]
    chosen, rejected = ([e[key] for e in examples] for key in ("chosen", "rejected"))
    return PairedBatch(chosen=_completion_rows(prompts, chosen, length, pad_id, layout, block),
                       rejected=_completion_rows(prompts, rejected, length, pad_id, layout, block), **reference)
