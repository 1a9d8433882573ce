"""Preference data for the step: a scan that tokenises every record once (skipping or stopping on bad ones, and
reporting them), then Grain pipelines of batches.

Training order: Grain's seeded global shuffle, reshuffled every epoch, repeated without end; process p of P takes
examples p, p + P, ... of that order, so the global batch at a step is the same for any number of processes. Batch
`step` of this process is random access (`TrainBatches.batch_at(step)`), and the iterator's state, saved with each
checkpoint, resumes exactly there. Rows are padded to the smallest of a few length buckets that fits the global
batch (so every process agrees), and jit compiles a handful of shapes rather than padding everything to max_length.

The batches are typed pytrees (data/batch.py: `PairedBatch`, `SharedPromptBatch`, `UnpairedBatch`), laid out as the
run's `Layout` says.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np
from absl import logging

from dpo_jax.data.batch import Batch, Layout, collate, packed_row_count, padded_shape
from dpo_jax.data.records import BadRecord, is_paired
from dpo_jax.data.tokenize import check_truncation_args, encode_record

MAX_ORIGINS_PER_REASON = 10  # how many examples of each skip reason data_report.json names


@dataclasses.dataclass
class Examples:
    """The tokenised good examples of one split (encode_record outputs, in source order) and the scan's report."""

    encoded: list[dict]
    paired: bool
    report: dict[str, Any]
    mixture: tuple = ()  # ((spec, weight, count), ...): consecutive parts of `encoded` drawn by weight (mixture.py)

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
    return Examples(unpaired, paired=False, report={**examples.report, "split_pairs": True},
                    mixture=tuple((spec, weight, 2 * count) for spec, weight, count in examples.mixture))


def length_buckets(max_length: int, buckets: Sequence[int] = (), pack: str = "none") -> tuple[int, ...]:
    """The padded lengths batches use: `buckets` (ascending, capped) plus the longest row possible, max_length (a
    shared-prompt row holds two completions: 2 · max_length); by default max_length / 4, / 2 and max_length, and
    for shared-prompt rows every multiple of max_length / 4 up to 2 · max_length (rounded up to multiples of 8).
    Packed rows are the longest, 2 · max_length; the others serve unpaired rows, as for shared-prompt rows."""
    quarter = -(-max_length // (4 * 8)) * 8
    shared = pack in ("shared_prompt", "packed")
    longest = 2 * max_length if shared else max_length
    if not buckets:
        buckets = range(quarter, longest, quarter) if shared else [quarter, -(-max_length // 16) * 8]
    return tuple(sorted({b for b in buckets if 0 < b < longest} | {longest}))


def _collate_share(global_examples: Sequence[dict], buckets, pad_id: int, share: slice, layout: Layout) -> Batch:
    """This process's `share` of a global batch, padded to the bucket and block of the whole global batch: every
    process picks the same shapes without talking to the others. Packed, each process packs its own pairs, and the
    rows' count and block are the largest any process's share needs."""
    if not layout.packs(global_examples):
        length, block = padded_shape(global_examples, buckets, layout)
        return collate(global_examples[share], buckets, pad_id, length=length, layout=layout, block=block)
    shares = [global_examples[i::share.step or 1] for i in range(share.step or 1)]
    block = max(padded_shape(s, buckets, layout)[1] for s in shares)
    num_rows = max(packed_row_count(s, buckets, layout) for s in shares)
    return collate(global_examples[share], buckets, pad_id, layout=layout, block=block, num_rows=num_rows)


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
        if examples.mixture:  # each source its own shuffle, drawn by weight (mixture.py)
            dataset = _mixed(examples, seed)
        else:
            dataset = grain.MapDataset.source(examples.encoded).shuffle(seed=seed).repeat(None)
        self.dataset = dataset.batch(batch_size, batch_fn=functools.partial(
            _collate_share, buckets=tuple(buckets), pad_id=pad_id, share=slice(process_index, None, process_count),
            layout=layout))

    def batch_at(self, step: int) -> Batch:
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


def _mixed(examples: Examples, seed: int) -> grain.MapDataset:
    """The endless training order of a mixture: each source shuffled by its own stream of `seed` and repeated,
    interleaved by weight (Grain's mix)."""
    datasets, start = [], 0
    for index, (_, _, count) in enumerate(examples.mixture):
        part = examples.encoded[start:start + count]
        start += count
        datasets.append(grain.MapDataset.source(part).shuffle(seed=seed * 1009 + index).repeat(None))
    return grain.MapDataset.mix(datasets, [weight for _, weight, _ in examples.mixture])


def eval_batches(
    examples: Examples, batch_size: int, buckets: Sequence[int], pad_id: int, layout: Layout = Layout()
) -> Iterator[Batch]:
    """Every example once, in order, in full batches carrying `weight` [B]: the last is padded by repeating rows
    with weight 0."""
    n = len(examples)
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}")
    for start in range(0, n, batch_size):
        positions = np.arange(start, start + batch_size)
        batch = collate([examples.encoded[i % n] for i in positions], buckets, pad_id, layout=layout)
        yield batch.replace(weight=(positions < n).astype(np.float32))

