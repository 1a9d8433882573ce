"""The workload file every arm of `benchmarks/compare.py` reads, so each framework trains on the same pairs.

One `.npz` (numpy only, no pickle): `spec` (a JSON string: the workload's name, the model's shape, batch size,
optimizer and loss settings), `lengths` [pairs, 3] (prompt, chosen, rejected token counts) and `tokens`, every
pair's prompt, chosen and rejected token ids one after another. Batch k is pairs k·B .. k·B + B − 1. Imported by
compare.py and by the peer runners beside it (which run in another venv, so this file needs only numpy).
"""

from __future__ import annotations

import json

import numpy as np

SPEC_KEYS = ("workload", "model", "batch_size", "learning_rate", "weight_decay", "max_grad_norm", "beta", "dtype",
             "max_length")


def save(path: str, spec: dict, pairs: list[dict]) -> None:
    """Write `spec` and `pairs` (dicts of int token-id arrays `prompt`, `chosen`, `rejected`) to `path` (.npz)."""
    missing = [key for key in SPEC_KEYS if key not in spec]
    if missing:
        raise ValueError(f"workload spec lacks {missing}; expected keys {SPEC_KEYS}")
    lengths = np.array([[len(p["prompt"]), len(p["chosen"]), len(p["rejected"])] for p in pairs], np.int64)
    tokens = np.concatenate([np.asarray(p[key], np.int32) for p in pairs for key in ("prompt", "chosen", "rejected")])
    np.savez(path, spec=np.array(json.dumps(spec)), lengths=lengths, tokens=tokens)


def load(path: str) -> tuple[dict, list[dict]]:
    """(spec, pairs) as `save` wrote them; a file that is not one names what it lacks."""
    with np.load(path, allow_pickle=False) as f:
        missing = [key for key in ("spec", "lengths", "tokens") if key not in f.files]
        if missing:
            raise ValueError(f"{path}: not a compare.py workload file (no {missing}; it has {f.files})")
        spec, lengths, tokens = json.loads(str(f["spec"])), f["lengths"], f["tokens"]
    if lengths.ndim != 2 or lengths.shape[1] != 3 or int(lengths.sum()) != tokens.size:
        raise ValueError(f"{path}: lengths {lengths.shape} do not add up to the {tokens.size} tokens")
    pairs, start = [], 0
    for row in lengths:
        pair = {}
        for key, n in zip(("prompt", "chosen", "rejected"), row):
            pair[key] = tokens[start:start + n]
            start += n
        pairs.append(pair)
    return spec, pairs


def batches(spec: dict, pairs: list[dict]) -> list[list[dict]]:
    """The workload's batches in order: consecutive groups of spec['batch_size'] pairs (a partial last one dropped)."""
    size = spec["batch_size"]
    return [pairs[s:s + size] for s in range(0, len(pairs) - size + 1, size)]


def real_tokens(batch: list[dict]) -> int:
    """The batch's non-padding tokens: each pair's prompt (once), chosen and rejected."""
    return sum(len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in batch)
