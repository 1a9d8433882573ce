"""Weighted mixtures of sources: `data.source = "mixture"`, `data.mixture = ((spec, weight), ...)`.

Each source is read and scanned on its own (its counts and skips stay its own in data_report.json, under
"sources"), the examples concatenated in the mixture's order. Training batches draw from the sources by weight with
Grain's `MapDataset.mix` over each source's own seeded, endlessly repeated shuffle (pipeline.TrainBatches), so the
order is a pure function of the seed and the step, and a checkpoint's iterator state resumes it exactly. Held-out
examples are every source's, in order.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from dpo_jax.data.pipeline import Examples


def check_mixture(mixture: Any) -> None:
    """ValueError unless `mixture` is () or ((spec string, positive finite weight), ...) with distinct specs."""
    if not isinstance(mixture, (tuple, list)) or not all(
            isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
            and math.isfinite(item[1]) and item[1] > 0 for item in mixture):
        raise ValueError("expected ((source spec, weight > 0), ...), e.g. (('hf:trl-lib/ultrafeedback_binarized', "
                         f"0.7), ('file:extra.jsonl', 0.3)); got {mixture!r}")
    specs = [spec for spec, _ in mixture]
    if len(set(specs)) != len(specs):
        raise ValueError(f"a source spec appears twice: {specs!r}")


def concatenate(parts: Sequence[tuple[str, float, Examples]]) -> Examples:
    """One Examples of (spec, weight, scanned examples) parts: their examples in order, the mixture recorded
    (spec, weight, count) for the training order, a report that sums the parts and keeps each under "sources"."""
    kinds = {examples.paired for _, _, examples in parts}
    if len(kinds) > 1:
        raise ValueError("the mixture mixes paired and unpaired sources: "
                         + ", ".join(f"{spec} ({'paired' if e.paired else 'unpaired'})" for spec, _, e in parts))
    report: dict[str, Any] = {"records": 0, "examples": 0, "truncated": 0, "skipped": {}, "skipped_examples": {}}
    for spec, weight, examples in parts:
        for key in ("records", "examples", "truncated"):
            report[key] += examples.report[key]
        for reason, count in examples.report["skipped"].items():
            report["skipped"][reason] = report["skipped"].get(reason, 0) + count
        for reason, origins in examples.report["skipped_examples"].items():
            report["skipped_examples"].setdefault(reason, []).extend(f"{spec}: {o}" for o in origins)
    report["sources"] = {spec: {"weight": weight, **e.report} for spec, weight, e in parts}
    return Examples([x for _, _, e in parts for x in e.encoded], paired=kinds.pop(), report=report,
                    mixture=tuple((spec, float(weight), len(e)) for spec, weight, e in parts))
