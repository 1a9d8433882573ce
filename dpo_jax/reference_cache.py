"""Cached reference log-probs: π_ref's per-example log-probs of chosen and rejected, computed once, reused by every
DPO run over the same data (a β or loss sweep), which then keeps no π_ref in device memory and skips its forward.

A cache is a directory: `key.json` and `train.npz` / `eval.npz` (float32 `chosen`, `rejected`, one entry per
scanned example in source order). The key has four parts, each a digest with a readable description: the dataset
(its records), the tokenizer (its saved files), the length settings, and π_ref (a checksum of its parameters, its
storage and compute dtypes). A cache whose key differs in any part is refused, naming the part.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import data
from dpo_jax.errors import UserError

KEY_FILE = "key.json"
SPLITS = ("train", "eval")
KEY_PARTS = ("data", "tokenizer", "lengths", "reference")


class StaleReferenceCache(UserError, ValueError):
    """ref.cache was computed for other data, tokenizer, lengths or π_ref than this run's."""


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()[:16]


def records_fingerprint(splits: Mapping[str, list]) -> str:
    """A digest of each split's records, in order (their `origin`, where a record was read, left out)."""
    return _digest(
        json.dumps([split, {k: v for k, v in record.items() if k != "origin"}], sort_keys=True, default=repr).encode()
        for split in sorted(splits) for record in splits[split]
    )


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the files the tokenizer saves (vocabulary, merges, special tokens, chat template)."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        names = sorted(os.listdir(directory))
        return _digest(name.encode() + open(os.path.join(directory, name), "rb").read() for name in names)


@jax.jit
def _checksums(params: Any) -> Any:
    """Two wrap-around uint32 sums of each leaf's bit patterns, weighted by odd functions of the element index:
    integer sums are exact in any order, so the result is the same on any mesh; any one changed value changes it."""

    def leaf(x):
        bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
        index = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        mixed = bits ^ (bits >> 13)
        return jnp.stack([jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32),
                          jnp.sum(mixed * (index * jnp.uint32(2654435761) | 1), dtype=jnp.uint32)])

    return jax.tree.map(leaf, params)


def params_fingerprint(params: Any) -> str:
    """A digest of a params pytree: every leaf's path, shape, dtype and value checksums (computed where it lives)."""
    sums = jax.device_get(_checksums(params))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return _digest(
        f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}:{s.tolist()}".encode()
        for (path, x), s in zip(leaves, jax.tree.leaves(sums))
    )


def cache_key(*, data: str, tokenizer: str, lengths: Mapping[str, Any], reference: str,
              reference_dtype: str, compute_dtype: str) -> dict[str, str]:
    """The key's parts as readable strings (each compared as a whole)."""
    return {
        "data": f"records {data}",
        "tokenizer": f"files {tokenizer}",
        "lengths": ", ".join(f"{k}={v}" for k, v in sorted(lengths.items())),
        "reference": f"params {reference}, stored {reference_dtype}, computed in {compute_dtype}",
    }


def check_key(directory: str, key: Mapping[str, str]) -> None:
    """StaleReferenceCache naming each part of `directory`'s key that differs from `key`."""
    with open(os.path.join(directory, KEY_FILE)) as f:
        cached = json.load(f)
    differing = [part for part in KEY_PARTS if cached.get(part) != key[part]]
    if differing:
        details = "; ".join(f"{part}: the cache has {cached.get(part)!r}, this run {key[part]!r}" for part in differing)
        raise StaleReferenceCache(
            f"ref.cache = {directory!r} was computed for a different {' and '.join(differing)} ({details}). "
            "Recompute it (mode = 'precompute_ref', or remove the directory) or point ref.cache elsewhere."
        )


def exists(directory: str) -> bool:
    """Whether `directory` holds a complete cache (the key is written last)."""
    return os.path.isfile(os.path.join(directory, KEY_FILE))


def compute(
    logps_fn: Callable[[data.Batch], tuple[list, list]], batches: Iterable[data.Batch], count: int
) -> dict[str, np.ndarray]:
    """π_ref's {"chosen", "rejected"} log-probs [count] over `batches` (every example once in order, the last batch
    padded with weight-0 rows) from `logps_fn(batch) -> ([chosen, rejected], lengths)` on the host; ValueError
    if any is not finite."""
    chosen, rejected = [], []
    for batch in batches:
        (c, r), _ = logps_fn(batch)
        keep = np.asarray(batch.weight) > 0
        chosen.append(np.asarray(c)[keep])
        rejected.append(np.asarray(r)[keep])
    out = {"chosen": np.concatenate(chosen).astype(np.float32), "rejected": np.concatenate(rejected).astype(np.float32)}
    finite = np.isfinite(out["chosen"]) & np.isfinite(out["rejected"])
    if len(finite) != count or not finite.all():
        raise ValueError(f"reference log-probs: expected {count} examples with finite values, got {len(finite)} "
                         f"({int((~finite).sum())} not finite, first at example {int(np.argmin(finite))})")
    return out


def write(directory: str, key: Mapping[str, str], values: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write a cache atomically: the arrays and the key into a temporary sibling, then renamed into place."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".ref_cache_", dir=parent)
    for split, arrays in values.items():
        np.savez(os.path.join(staging, f"{split}.npz"), **arrays)
    with open(os.path.join(staging, KEY_FILE), "w") as f:
        json.dump(dict(key), f, indent=2)
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.rename(staging, directory)


def attach(directory: str, split: str, examples: data.Examples) -> data.Examples:
    """`examples` (paired) carrying the cache's π_ref log-probs, which their batches then hold
    (`data.with_reference_logps`); StaleReferenceCache if the cache's split has another number of examples."""
    with np.load(os.path.join(directory, f"{split}.npz")) as arrays:
        chosen, rejected = arrays["chosen"], arrays["rejected"]
    if len(chosen) != len(examples):
        raise StaleReferenceCache(f"ref.cache = {directory!r}: its {split} split has {len(chosen)} examples, this "
                                  f"run's has {len(examples)}")
    return dataclasses.replace(examples, encoded=data.with_reference_logps(examples.encoded, chosen, rejected))
