"""Preference data for the step: a scan that tokenises every record once (skipping or stopping on bad ones, and
reporting them), then Grain pipelines of batches.

Training order: Grain's seeded global shuffle, reshuffled every epoch, repeated without end; process p of P takes
examples p, p + P, ... of that order, so the global batch at a step is the same for any number of processes. Batch
`step` of this process is random access (`TrainBatches.batch_at(step)`), and the iterator's state, saved with each
checkpoint, resumes exactly there. Rows are padded to the smallest of a few length buckets that fits the global
batch (so every process agrees), and jit compiles a handful of shapes rather than padding everything to max_length.

Layouts (`Layout`, the same tokenised examples either way): `pack = "none"` gives a row per completion
(`chosen_*`, `rejected_*`; unpaired: `completion_*`, `kl_*`); `pack = "shared_prompt"` gives a paired batch one
row per pair, `[prompt | chosen | rejected]` (`pair_*`): rejected's positions continue from the prompt's end and
branch ids keep chosen and rejected from seeing each other, so the prompt is run once. With `completion_only`
(always for shared rows) each row also lists its scored tokens in a block of N entries, N the smallest power of
two that fits the global batch: `*_targets` (the token), `*_sources` (the position whose hidden state predicts it)
and `*_slots` (0 chosen / the row's completion, 1 rejected, −1 the block's padding), for `gathered_logprobs`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from absl import logging

from dpo_jax.data.records import BadRecord, is_paired
from dpo_jax.data.tokenize import check_truncation_args, encode_record

UNPAIRED_KEYS: tuple[str, ...] = ("completion_tokens", "completion_loss_mask", "label", "kl_tokens", "kl_loss_mask")
MAX_ORIGINS_PER_REASON = 10  # how many examples of each skip reason data_report.json names
PACKS: tuple[str, ...] = ("none", "shared_prompt")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a batch lays out its examples: `pack` (see the module docstring) and whether rows list their scored
    tokens for completion-only log-probs (shared-prompt rows always do)."""

    pack: str = "none"
    completion_only: bool = False

    def __post_init__(self):
        if self.pack not in PACKS:
            raise ValueError(f"pack must be one of {PACKS}, got {self.pack!r}")
        if self.pack == "shared_prompt":
            object.__setattr__(self, "completion_only", True)

    def shares_prompt(self, examples: Sequence[dict]) -> bool:
        """Whether these examples get shared-prompt rows (paired ones only: unpaired rows have one completion)."""
        return self.pack == "shared_prompt" and "chosen" in examples[0]


@dataclasses.dataclass
class Examples:
    """The tokenised good examples of one split (encode_record outputs, in source order) and the scan's report."""

    encoded: list[dict]
    paired: bool
    report: dict[str, Any]

    def __len__(self) -> int:
        return len(self.encoded)


def scan(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
    strict: bool = False,
    name: str = "data",
    num_threads: int = 8,
) -> Examples:
    """Tokenise every record (Grain reads and encodes in `num_threads` threads, in order).

    A bad record stops the scan with ValueError naming its origin and reason when `strict`; otherwise it is skipped
    and counted by reason. The report ({"records", "examples", "truncated", "skipped": {reason: n},
    "skipped_examples": {reason: [origins]}}) is logged: as a warning when anything was skipped or truncated.
    """
    check_truncation_args(max_length, max_prompt_length, truncation_mode)  # Settings errors are never skipped.
    encode = functools.partial(
        _encode_or_bad, tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
    )
    read = grain.MapDataset.source(records).map(encode).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
    )
    encoded, kinds, truncated = [], collections.Counter(), 0
    skipped: collections.Counter = collections.Counter()
    origins: dict[str, list[str]] = collections.defaultdict(list)
    for index, (example, bad, paired) in enumerate(read):
        if bad is not None:
            origin = bad.origin or f"record {index}"
            if strict:
                raise ValueError(f"{name}: {origin}: {bad.reason}: {bad.detail} (data.strict = True)")
            skipped[bad.reason] += 1
            if len(origins[bad.reason]) < MAX_ORIGINS_PER_REASON:
                origins[bad.reason].append(f"{origin}: {bad.detail}")
            continue
        kinds[paired] += 1
        truncated += example["truncated"]
        encoded.append(example)
    if len(kinds) > 1:
        raise ValueError(f"{name}: mixes paired ({kinds[True]}) and unpaired ({kinds[False]}) records; use one kind")
    report = {
        "records": len(records), "examples": len(encoded), "truncated": truncated,
        "skipped": dict(sorted(skipped.items())), "skipped_examples": dict(sorted(origins.items())),
    }
    summary = (f"{name}: {len(records)} records, {len(encoded)} kept, {sum(skipped.values())} skipped "
               f"{dict(sorted(skipped.items()))}, {truncated} truncated ({100 * truncated / max(len(encoded), 1):.0f}%)")
    (logging.warning if skipped or truncated else logging.info)("%s", summary)
    if not encoded:
        raise ValueError(f"{name}: no usable records among {len(records)} (skipped: {dict(skipped)})")
    return Examples(encoded, paired=bool(next(iter(kinds))), report=report)


def _encode_or_bad(record, **settings) -> tuple[dict | None, BadRecord | None, bool]:
    try:
        return encode_record(record, **settings), None, is_paired(record)
    except BadRecord as bad:
        return None, bad, is_paired(record) if isinstance(record, Mapping) else True


def split_pairs(examples: Examples) -> Examples:
    """Paired examples as unpaired ones, as KTO can use them: each pair's chosen desirable, its rejected not."""
    if not examples.paired:
        return examples
    unpaired = [
        {"prompt": e["prompt"], "completion": e[name], "label": label, "truncated": e["truncated"]}
        for e in examples.encoded for name, label in (("chosen", True), ("rejected", False))
    ]
    return Examples(unpaired, paired=False, report={**examples.report, "split_pairs": True})


def length_buckets(max_length: int, buckets: Sequence[int] = (), pack: str = "none") -> tuple[int, ...]:
    """The padded lengths batches use: `buckets` (ascending, capped) plus the longest row possible, max_length (a
    shared-prompt row holds two completions: 2 · max_length); by default max_length / 4, / 2 and max_length, and
    for shared-prompt rows every multiple of max_length / 4 up to 2 · max_length (rounded up to multiples of 8)."""
    quarter = -(-max_length // (4 * 8)) * 8
    longest = 2 * max_length if pack == "shared_prompt" else max_length
    if not buckets:
        buckets = range(quarter, longest, quarter) if pack == "shared_prompt" else [quarter, -(-max_length // 16) * 8]
    return tuple(sorted({b for b in buckets if 0 < b < longest} | {longest}))


def _bucket(length: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= length)


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
    return {"sources": np.zeros((rows, block), np.int32), "targets": np.zeros((rows, block), np.int32),
            "slots": np.full((rows, block), -1, np.int32)}


def _fill(block: dict[str, np.ndarray], row: int, start: int, first_source: int, at: int, ids: np.ndarray, slot: int):
    """List completion `ids`, which sit at row positions at.., in the block from entry `start`: token k is predicted
    from position at + k − 1, the first one from `first_source`."""
    n = len(ids)
    if not n:
        return
    block["targets"][row, start : start + n] = ids
    block["sources"][row, start : start + n] = np.arange(at - 1, at + n - 1)
    block["sources"][row, start] = first_source
    block["slots"][row, start : start + n] = slot


def _scored_block(tokens: np.ndarray, mask: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """The completion-only block of one-completion rows: each row's masked tokens (slot 0)."""
    out = _empty_block(len(tokens), block)
    for row, (row_tokens, row_mask) in enumerate(zip(tokens, mask)):
        at = np.flatnonzero(row_mask)
        if len(at):
            _fill(out, row, 0, at[0] - 1, at[0], row_tokens[at], 0)
    return out


def _shared_prompt_rows(examples: Sequence[dict], length: int, block: int, pad_id: int) -> dict[str, np.ndarray]:
    """`[prompt | chosen | rejected]` rows: tokens, positions (rejected's continue from the prompt's end), branch
    ids (0 prompt, 1 chosen, 2 rejected, 3 padding) and the block of both completions' tokens."""
    B = len(examples)
    batch = {"pair_tokens": np.full((B, length), pad_id, np.int32), "pair_positions": np.zeros((B, length), np.int32),
             "pair_branch_ids": np.full((B, length), 3, np.int32)}
    scored = _empty_block(B, block)
    for row, e in enumerate(examples):
        prompt, chosen, rejected = e["prompt"], e["chosen"], e["rejected"]
        P, C, R = len(prompt), len(chosen), len(rejected)
        batch["pair_tokens"][row, : P + C + R] = np.concatenate([prompt, chosen, rejected])
        batch["pair_positions"][row, : P + C + R] = np.concatenate([np.arange(P + C), np.arange(P, P + R)])
        batch["pair_branch_ids"][row, : P + C + R] = np.repeat([0, 1, 2], [P, C, R])
        _fill(scored, row, 0, P - 1, P, chosen, 0)
        _fill(scored, row, C, P - 1, P + C, rejected, 1)
    batch.update({f"pair_{name}": array for name, array in scored.items()})
    return batch


def collate(
    examples: Sequence[dict], buckets: Sequence[int], pad_id: int, length: int | None = None,
    layout: Layout = Layout(), block: int | None = None,
) -> dict[str, np.ndarray]:
    """A batch of encoded examples in `layout`: rows right-padded to L, the smallest bucket that fits (or `length`),
    and completion-only blocks of `block` entries (default: what these examples need).

    Paired: chosen_* and rejected_* rows, or pair_* rows (shared prompt). Unpaired: completion_*, label (1.0
    desirable), and kl_* rows pairing prompt i with completion i + 1 (mod B), the mismatched pairs KTO's
    reference point is estimated on (their completions cut to L if longer). Examples carrying cached reference
    log-probs add them as reference_chosen / reference_rejected [B].
    """
    length = length or _bucket(_row_length(examples, layout), buckets)
    block = block or _block_size(_scored_count(examples, layout))
    if layout.shares_prompt(examples):
        batch = _shared_prompt_rows(examples, length, block, pad_id)
    else:
        prompts = [e["prompt"] for e in examples]
        if "chosen" in examples[0]:
            pieces = {key: [e[key] for e in examples] for key in ("chosen", "rejected")}
        else:
            completions = [e["completion"] for e in examples]
            pieces = {"completion": completions, "kl": completions[1:] + completions[:1]}
        batch = {}
        for key, parts in pieces.items():
            tokens, mask = batch[f"{key}_tokens"], batch[f"{key}_loss_mask"] = _rows(prompts, parts, length, pad_id)
            if layout.completion_only:
                batch.update({f"{key}_{name}": array for name, array in _scored_block(tokens, mask, block).items()})
        if "completion" in pieces:
            batch["label"] = np.asarray([e["label"] for e in examples], np.float32)
    for name in ("reference_chosen", "reference_rejected"):  # cached π_ref log-probs (reference_cache.attach)
        if name in examples[0]:
            batch[name] = np.asarray([e[name] for e in examples], np.float32)
    return batch


def _collate_share(
    global_examples: Sequence[dict], buckets, pad_id: int, share: slice, layout: Layout
) -> dict[str, np.ndarray]:
    """This process's `share` of a global batch, padded to the bucket and block of the whole global batch: every
    process picks the same shapes without talking to the others."""
    return collate(global_examples[share], buckets, pad_id, length=_bucket(_row_length(global_examples, layout), buckets),
                   layout=layout, block=_block_size(_scored_count(global_examples, layout)))


class TrainBatches:
    """This process's training batches, endless: random access by step, and a Grain iterator whose state resumes."""

    def __init__(
        self, examples: Examples, *, batch_size: int, seed: int, buckets: Sequence[int], pad_id: int,
        process_index: int = 0, process_count: int = 1, layout: Layout = Layout(),
    ):
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
        if not 1 <= batch_size <= len(examples):
            raise ValueError(f"batch_size must be in [1, {len(examples)}] (the number of examples), got {batch_size}")
        self.seed, self.batch_size = seed, batch_size
        dataset = grain.MapDataset.source(examples.encoded).shuffle(seed=seed).repeat(None)
        self.dataset = dataset.batch(batch_size, batch_fn=functools.partial(
            _collate_share, buckets=tuple(buckets), pad_id=pad_id, share=slice(process_index, None, process_count),
            layout=layout))

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """The batch of global step `step` (this process's share)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.dataset[step]

    def iterator(self, state: Mapping | None = None, prefetch: int = 2) -> grain.DatasetIterator:
        """Batches from step 0, or from where `state` (an earlier iterator's get_state()) left off, prefetched."""
        iterator = iter(self.dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
        if state is not None:
            iterator.set_state(dict(state))
        return iterator


def eval_batches(
    examples: Examples, batch_size: int, buckets: Sequence[int], pad_id: int, layout: Layout = Layout()
) -> Iterator[dict]:
    """Every example once, in order, in full batches; the last is padded by repeating rows with `weight` 0."""
    n = len(examples)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}")
    for start in range(0, n, batch_size):
        positions = np.arange(start, start + batch_size)
        batch = collate([examples.encoded[i % n] for i in positions], buckets, pad_id, layout=layout)
        batch["weight"] = (positions < n).astype(np.float32)
        yield batch

