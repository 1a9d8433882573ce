"""The paper's datasets (paper_datasets.py) as TFDS builders over their original files, read back as records.

Each builder downloads the raw files from where their authors publish them (or reads a local copy, data.raw_dir),
turns every raw record into a record in one pass with the recipes of paper_datasets.py, and writes array_record
files (random access, no TensorFlow). The builders are named `dpo_tldr_comparisons`, `dpo_anthropic_hh`, `dpo_shp`
and `dpo_imdb_prefixes`, so none shadows a TFDS dataset.

`load_tfds_records(name, split, data_dir)` prepares a dataset once (download allowed) and returns a split as
random-access records; "eval" is the held-out split ("validation" for tldr, "test" for the others). TFDS
writes each split in a fixed order shuffled by record key, so the first n records are a sample across files.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from dpo_jax.data.paper_datasets import (
    HH_SUBSETS, HH_URL, IMDB_URL, PAIRED_TEXTS, SHP_DOMAINS, SHP_URL, TFDS_SOURCES, TLDR_BATCHES, TLDR_URL,
    UNPAIRED_TEXTS, hh_record, imdb_records, json_lines_records, shp_record, tldr_record, tldr_split,
)


class DownloadFailed(OSError):
    """A raw file could not be downloaded; the message names its URL."""


# --- downloading -------------------------------------------------------------------------------------------------


def _check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """DownloadFailed naming `url` at once when its host cannot be reached (TFDS would retry for minutes)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as error:
        raise DownloadFailed(f"cannot download {url}: {parts.hostname}:{port} is unreachable ({error}); "
                             "prepare the dataset on a machine with network access and copy its data_dir") from None


def _local_raw_files(builder_name: str, raw_dir: str, urls: Mapping[str, str] | str) -> Any:
    """What `_download` returns, from a local copy of the raw files in their original layout (data.raw_dir):
    those present are used, absent ones are listed in a warning; none present is an error naming the directory."""
    names = [urls.rsplit("/", 1)[-1]] if isinstance(urls, str) else list(urls)
    present = {name: os.path.join(raw_dir, name) for name in names if os.path.isfile(os.path.join(raw_dir, name))}
    if not present:
        raise FileNotFoundError(f"{builder_name}: data.raw_dir {raw_dir} holds none of its raw files "
                                f"(expected e.g. {names[0]})")
    if len(present) < len(names):
        absent = [name for name in names if name not in present]
        logging.warning("%s: %d of %d raw files are not in %s and are left out (%s%s)", builder_name, len(absent),
                        len(names), raw_dir, ", ".join(absent[:3]), ", ..." if len(absent) > 3 else "")
    return present[names[0]] if isinstance(urls, str) else present


def _download(builder: "_RecordsBuilder", dl_manager, urls: Mapping[str, str] | str) -> Any:
    """`dl_manager.download(urls)` (or the files of builder.raw_dir); any failure is one DownloadFailed line naming
    the URL."""
    if builder.raw_dir:
        return _local_raw_files(builder.name, builder.raw_dir, urls)
    try:
        return dl_manager.download(urls)
    except DownloadFailed:
        raise
    except Exception as error:  # requests, TFDS and OS errors alike: the user needs the URL, not the stack
        where = urls if isinstance(urls, str) else f"one of {len(urls)} URLs such as {next(iter(urls.values()))}"
        raise DownloadFailed(f"{builder.name}: downloading {where} failed: {type(error).__name__}: {error}") from None


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What the four builders share: array_record by default, text features, a download that fails fast."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    HOMEPAGE = ""
    DESCRIPTION = ""
    TEXTS: tuple[str, ...] = PAIRED_TEXTS
    HAS_LABEL = False
    # No checksums.tsv beside this module. (TFDS 4.9.x, looking for it, lazily imports importlib_resources,
    # a package it does not declare: tensorflow/datasets#11212.)
    code_path = None

    def __init__(self, *, file_format: str = "array_record", raw_dir: str = "", **kwargs: Any):
        super().__init__(file_format=file_format, **kwargs)
        self.raw_dir = raw_dir  # a local copy of the raw files to prepare from instead of downloading

    def _info(self) -> tfds.core.DatasetInfo:
        features = {field: tfds.features.Text() for field in (*self.TEXTS, "origin", "problem")}
        if self.HAS_LABEL:
            features["label"] = tfds.features.Scalar(dtype=np.bool_)
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
                                     features=tfds.features.FeaturesDict(features))

    def _make_download_manager(self, download_dir, download_config):
        manager = super()._make_download_manager(download_dir, download_config)
        fetch = getattr(manager, "_download", None)  # TFDS calls it only for a URL not in its download cache
        if fetch is None:
            return manager
        reachable: set[str] = set()

        def fetch_if_reachable(resource):
            host = urllib.parse.urlsplit(resource.url).netloc
            if host not in reachable:
                _check_reachable(resource.url)
                reachable.add(host)
            return fetch(resource)

        manager._download = fetch_if_reachable
        return manager


class DpoTldrComparisons(_RecordsBuilder):
    """The summarize-from-feedback human comparisons of Reddit TL;DR summaries, as preference pairs."""

    name = "dpo_tldr_comparisons"
    HOMEPAGE = "https://github.com/openai/summarize-from-feedback"
    DESCRIPTION = "Reddit TL;DR summary comparisons (Stiennon et al. 2020) as prompt/chosen/rejected."

    def _split_generators(self, dl_manager):
        paths = _download(self, dl_manager, {f"comparisons/{batch}.json": f"{TLDR_URL}/{batch}.json"
                                                  for batch in TLDR_BATCHES})
        return {split: self._generate_examples(paths, split) for split in ("train", "validation")}

    def _generate_examples(self, paths, split):
        return json_lines_records(paths, tldr_record, keep=lambda row: tldr_split(row) == split)


class DpoAnthropicHh(_RecordsBuilder):
    """Anthropic's helpful and harmless dialogues, split into prompt and completions as the DPO reference does."""

    name = "dpo_anthropic_hh"
    HOMEPAGE = "https://huggingface.co/datasets/Anthropic/hh-rlhf"
    DESCRIPTION = "Anthropic HH-RLHF (Bai et al. 2022) as prompt/chosen/rejected, split at the last Assistant turn."

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(_download(self, dl_manager, {
            f"{subset}/{split}.jsonl.gz": f"{HH_URL}/{subset}/{split}.jsonl.gz" for subset in HH_SUBSETS}))
            for split in ("train", "test")}

    def _generate_examples(self, paths):
        return json_lines_records(paths, hh_record, gzipped=True)


class DpoShp(_RecordsBuilder):
    """Stanford Human Preferences pairs with a score ratio of at least 2, as the DPO reference reads them."""

    name = "dpo_shp"
    HOMEPAGE = "https://huggingface.co/datasets/stanfordnlp/SHP"
    DESCRIPTION = "Stanford Human Preferences (SHP) as prompt/chosen/rejected, pairs with score ratio >= 2."

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(_download(self, dl_manager, {
            f"{domain}/{split}.json": f"{SHP_URL}/{domain}/{split}.json" for domain in SHP_DOMAINS}))
            for split in ("train", "test")}

    def _generate_examples(self, paths):
        return json_lines_records(paths, shp_record)


class DpoImdbPrefixes(_RecordsBuilder):
    """IMDb reviews as (2–8 word prefix, rest of the review, positive?) for the controlled-sentiment task."""

    name = "dpo_imdb_prefixes"
    HOMEPAGE = "http://ai.stanford.edu/~amaas/data/sentiment/"
    DESCRIPTION = "IMDb reviews (Maas et al. 2011) as prompt (first 2-8 words)/completion/label (positive)."
    TEXTS = UNPAIRED_TEXTS
    HAS_LABEL = True

    def _split_generators(self, dl_manager):
        archive = _download(self, dl_manager, IMDB_URL)
        return {split: self._generate_examples(archive, split) for split in ("train", "test")}

    def _generate_examples(self, archive, split: str):
        return imdb_records(archive, split)


# --- the public API ----------------------------------------------------------------------------------------------

_BUILDERS: dict[str, type[_RecordsBuilder]] = {
    "tldr": DpoTldrComparisons, "hh": DpoAnthropicHh, "shp": DpoShp, "imdb": DpoImdbPrefixes,
}
_EVAL_SPLITS: dict[str, str] = {"tldr": "validation", "hh": "test", "shp": "test", "imdb": "test"}


class TfdsRecords(Sequence):
    """A prepared split as records: random access into TFDS's array_record data source, texts decoded to str."""

    def __init__(self, source, description: str):
        self.source, self.description = source, description

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.__getitems__(range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {self.description} ({len(self)} records)")
        return _decoded(self.source[index % len(self)])

    def __getitems__(self, indices: Iterable[int]) -> list[dict[str, Any]]:
        return [_decoded(example) for example in self.source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"TfdsRecords({self.description}, {len(self)} records)"


def _decoded(example: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.decode("utf-8") if isinstance(value, bytes) else bool(value) for key, value in example.items()}


def tfds_builder(name: str, data_dir: str, raw_dir: str = "") -> _RecordsBuilder:
    """The TFDS builder of source `name` ("tldr", "hh", "shp", "imdb") over `data_dir` ('' : TFDS's default),
    preparing from the raw files in `raw_dir` if given, else from their original location."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown TFDS source {name!r}; valid names: {', '.join(TFDS_SOURCES)}")
    return _BUILDERS[name](data_dir=data_dir or None, raw_dir=raw_dir)


def load_tfds_records(
    name: str, split: str, data_dir: str, *, download: bool = True, raw_dir: str = ""
) -> Sequence[dict]:
    """Prepare (from `raw_dir`, or downloading if needed and allowed) and open `name`'s `split` ("train" or "eval")
    as a random-access sequence of record dicts with str values (label: bool), via builder.as_data_source(split)."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; valid: train, eval")
    builder = tfds_builder(name, data_dir, raw_dir)
    if not builder.is_prepared():
        if not download and not raw_dir:
            raise FileNotFoundError(
                f"the {name!r} dataset ({builder.name} {builder.version}) is not prepared under "
                f"{builder.data_dir_root}: prepare it once with downloads allowed (config data.download=True, or "
                f"dpo_jax.data.tfds_sources.load_tfds_records({name!r}, 'train', {str(builder.data_dir_root)!r})) "
                "on a machine with network access")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    tfds_split = _EVAL_SPLITS[name] if split == "eval" else "train"
    return TfdsRecords(builder.as_data_source(split=tfds_split), f"{builder.name} {tfds_split}")
