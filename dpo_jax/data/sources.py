"""Data sources by name: each gives the records (see records.py) of a split, "train" or "eval".

- "synthetic_sentiment": the embedded demo task, generated (no download);
- "file": the user's JSONL / JSON / Parquet file (data.path), held-out records from data.eval_path or a seeded
  split of the same file (data.eval_fraction);
- "tldr", "hh", "shp", "imdb": the paper's datasets (their recipes: paper_datasets.py), TFDS builders over their
  original files (tfds_sources.py), prepared once into data.tfds_data_dir;
- "hf:ORG/NAME": a Hugging Face Hub dataset (hub.py), read like a file;
- in a mixture (mixture.py), also "file:PATH": that file, its held-out records a seeded share of it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from dpo_jax.data import hub, synthetic
from dpo_jax.data.files import read_preference_file, split_records
from dpo_jax.data.paper_datasets import TFDS_SOURCES

SPLITS = ("train", "eval")
SOURCES = ("synthetic_sentiment", "file", *TFDS_SOURCES)
# Sources whose completions have a known ground-truth reward (scored on generated samples).
_GROUND_TRUTH_REWARDS: dict[str, Callable[[str], float]] = {"synthetic_sentiment": synthetic.ground_truth_reward}


class _First(Sequence):
    """The first `n` items of a random-access sequence, without copying it."""

    def __init__(self, items: Sequence, n: int):
        self.items, self.n = items, min(n, len(items))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.items[index % self.n]


def _synthetic(split: str, num_records: int, seed: int, **_) -> list[dict[str, Any]]:
    pairs = synthetic.make_preference_pairs(num_records, seed=seed + SPLITS.index(split))
    return [{**pair, "origin": f"synthetic_sentiment/{split} {i}", "problem": ""} for i, pair in enumerate(pairs)]


def _file(split: str, seed: int, path: str, eval_path: str, eval_fraction: float, columns=None,
          **_) -> list[dict[str, Any]]:
    if eval_path:
        return read_preference_file(path if split == "train" else eval_path, columns)
    train, held_out = split_records(read_preference_file(path, columns), eval_fraction, seed)
    return train if split == "train" else held_out


FILE_PREFIX = "file:"


def check_source_spec(spec: str, hf_config: str = "", hf_split: str = "train", hf_eval_split: str = "",
                      hf_revision: str = "") -> None:
    """ValueError unless `spec` is a source name, 'hf:ORG/NAME[?...]' or 'file:PATH' (an existing file)."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a source spec string, got {spec!r}")
    if hub.is_hub_source(spec):
        hub.parse_spec(spec, hf_config, hf_split, hf_eval_split, hf_revision)
    elif spec.startswith(FILE_PREFIX):
        if not os.path.isfile(spec[len(FILE_PREFIX):]):
            raise ValueError(f"{spec!r}: no such file")
    elif spec not in SOURCES:
        raise ValueError(f"unknown data source {spec!r}; expected one of {', '.join(SOURCES)}, 'hf:ORG/NAME' or "
                         "'file:PATH'")


def load_split(
    source: str,
    split: str,
    *,
    num_records: int = 0,
    seed: int = 0,
    path: str = "",
    eval_path: str = "",
    eval_fraction: float = 0.05,
    tfds_data_dir: str = "",
    download: bool = True,
    raw_dir: str = "",
    columns: dict[str, str] | None = None,
    hf_config: str = "",
    hf_split: str = "train",
    hf_eval_split: str = "",
    hf_revision: str = "",
    hf_cache_dir: str = "",
) -> Sequence[dict[str, Any]]:
    """The records of `source`'s `split`. `num_records` is how many to generate (synthetic) or, elsewhere, the most
    to take, from the start (0: all). `source` may also be 'hf:ORG/NAME[?...]' (hf_*: its defaults) or
    'file:PATH'; `columns` ({our field: their column}) applies to files and Hub datasets."""
    columns = {field: column for field, column in (columns or {}).items() if column}
    if hub.is_hub_source(source):
        spec = hub.parse_spec(source, hf_config, hf_split, hf_eval_split, hf_revision)
        records = hub.load_hub_records(spec, split, seed, eval_fraction, hf_cache_dir, columns)
        return _First(records, num_records) if num_records else records
    if source.startswith(FILE_PREFIX):
        source, path, eval_path = "file", source[len(FILE_PREFIX):], ""
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid names: {', '.join(SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if source == "synthetic_sentiment":
        return _synthetic(split, num_records, seed)
    if source == "file":
        records = _file(split, seed, path, eval_path, eval_fraction, columns)
    else:
        from dpo_jax.data.tfds_sources import load_tfds_records  # TFDS takes seconds to import: only its users wait

        records = load_tfds_records(source, split, tfds_data_dir, download=download, raw_dir=raw_dir)
    return _First(records, num_records) if num_records else records


def ground_truth_reward_fn(name: str) -> Callable[[str], float] | None:
    """The known reward of completions of source `name`, or None for human-labelled data."""
    return _GROUND_TRUTH_REWARDS.get(name)
