"""Preference data: sources, records, tokenisation (the only place its rules live) and Grain batching.

sources.py names the sources (synthetic, files, the paper's TFDS datasets, Hugging Face Hub datasets) and gives a
split's records (paper_datasets.py: how each of the paper's raw records becomes one; tfds_sources.py: their TFDS
builders; hub.py: a Hub dataset's files, read as a file is; mixture.py: several sources drawn by weight);
records.py is their shape and the reasons a record is bad; tokenize.py turns a record into token ids by the
reference implementation's rules; batch.py is the batch the step takes (a typed pytree per layout) and `collate`,
which builds it; pipeline.py scans a split once (skipping or stopping on bad records, with a report) and feeds the
step through Grain.
"""

from __future__ import annotations

from dpo_jax.data.batch import (
    PACKS, PAIRED_BATCHES, Batch, Layout, PackedBatch, PairedBatch, Rows, SharedPromptBatch, UnpairedBatch,
    collate, pack_pairs, with_reference_logps,
)
from dpo_jax.data.held_out_text import text_windows
from dpo_jax.data.hub import is_hub_source
from dpo_jax.data.mixture import check_mixture, concatenate
from dpo_jax.data.pipeline import Examples, TrainBatches, eval_batches, length_buckets, scan, split_pairs
from dpo_jax.data.records import PAIRED_FIELDS, REASONS, UNPAIRED_FIELDS, BadRecord
from dpo_jax.data.sources import SOURCES, TFDS_SOURCES, check_source_spec, ground_truth_reward_fn, load_split
from dpo_jax.data.synthetic import WORDS, ground_truth_reward, make_preference_pairs, make_prompts
from dpo_jax.data.tokenize import TRUNCATION_MODES, check_truncation_args, encode_prompts, encode_record, truncate
from dpo_jax.data.tokenizer import HFTokenizer, WordTokenizer, check_tokenizer_name, get_tokenizer, tokenizer_names


def source_names() -> list[str]:
    """Names `load_split` accepts."""
    return list(SOURCES)


__all__ = [
    "PACKS", "PAIRED_BATCHES", "PAIRED_FIELDS", "REASONS", "SOURCES", "TFDS_SOURCES",
    "TRUNCATION_MODES", "UNPAIRED_FIELDS", "WORDS", "BadRecord", "Batch", "Examples", "HFTokenizer", "Layout",
    "PackedBatch", "PairedBatch", "Rows", "SharedPromptBatch", "TrainBatches", "UnpairedBatch", "WordTokenizer",
    "check_mixture", "check_source_spec", "check_tokenizer_name", "check_truncation_args", "collate", "concatenate",
    "pack_pairs",
    "is_hub_source", "text_windows", "encode_prompts", "encode_record", "eval_batches",
    "get_tokenizer", "ground_truth_reward", "ground_truth_reward_fn", "length_buckets", "load_split",
    "make_preference_pairs", "make_prompts", "scan", "source_names", "split_pairs", "tokenizer_names", "truncate",
    "with_reference_logps",
]
