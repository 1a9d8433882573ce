"""The paper's datasets as TFDS builders over their original files, read back as records (see records.py).

Each builder downloads the raw files from where their authors publish them, turns every raw record into a
record in one pass, and writes array_record files (random access, no TensorFlow). A raw record that cannot be
used is kept, with its `problem` and empty texts; only the filters of the reference recipes leave records out.

- "tldr" (`dpo_tldr_comparisons`): the human comparisons of Stiennon et al. 2020 ("Learning to summarize from
  human feedback"), the JSON-lines files comparisons/<batch>.json. Only the Reddit TL;DR batches are fetched
  (batch3–batch20, batch22, edit_b2_eval_test; Hugging Face's `openai/summarize_from_feedback` lists these plus
  three CNN/DM batches, batch0_cnndm, cnndm0 and cnndm2, which hold news articles, no post or subreddit, all
  in the validation split: they are left out). Prompt: the summarize-from-feedback query format,
  "SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:" (OpenAI's and TRL's TL;DR
  pipelines; the post untruncated: tokenisation truncates), completions the summaries with one leading space
  (the raw texts carry it; it is added only where missing); chosen = summaries[choice]. Raw split "train" goes
  to "train", "valid1" and "valid2" to "validation"; a line whose split cannot be read is reported in "train".
  Duplicate comparisons (one pair judged by several workers) are all kept, as in the raw data.
- "hh" (`dpo_anthropic_hh`): Anthropic HH-RLHF (Bai et al. 2022), {harmless-base, helpful-base,
  helpful-online, helpful-rejection-sampled}/{train,test}.jsonl.gz, as the DPO reference implementation's
  `get_hh` splits them: the prompt is chosen up to and including its last "\\n\\nAssistant:", the completions
  the rest of chosen and of rejected. A rejected that does not start with that prompt is "prompt_mismatch".
- "shp" (`dpo_shp`): Stanford Human Preferences, <domain>/{train,test}.json for its 18 subreddits, as the
  reference's `get_shp`: prompt "\\n\\nHuman: " + history + "\\n\\nAssistant:", completions " " + human_ref_A/B,
  A preferred when labels == 1, and only pairs whose score ratio max(A/B, B/A) is at least 2 (the others are
  left out; the count is logged). The reference applies no per-post pair limit and no text truncation, so
  neither is applied here. TFDS splits "train" and "test" are the raw ones; the raw validation files, which
  the reference never reads, are not fetched.
- "imdb" (`dpo_imdb_prefixes`): the IMDb reviews archive TFDS's `imdb_reviews` reads (aclImdb_v1.tar.gz,
  aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt; unsup/ and the other files are not used). Each review is
  an unpaired record for the controlled-sentiment task: "<br />" tags become spaces and whitespace runs one
  space; the prompt is the review's first k words, k in [2, 8] drawn from a hash of the file's path in the
  archive (so it is the same on every machine), the completion " " + the rest, label True for pos/. The paper
  uses 2–8 token prefixes: words stand in for tokens here, as the builder has no tokenizer.

`load_tfds_records(name, split, data_dir)` prepares a dataset once (download allowed) and returns a split as
random-access records; "eval" is the held-out split ("validation" for tldr, "test" for the others). TFDS
writes each split in a fixed order shuffled by record key, so the first n records are a sample across files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import tarfile
import urllib.parse
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from dpo_jax.data.records import BadRecord, problem

TFDS_SOURCES: tuple[str, ...] = ("tldr", "hh", "shp", "imdb")

TLDR_URL = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons"
TLDR_BATCHES: tuple[str, ...] = (*(f"batch{i}" for i in range(3, 21)), "batch22", "edit_b2_eval_test")
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
TLDR_SPLITS: dict[str, str] = {"train": "train", "valid1": "validation", "valid2": "validation"}

HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main"
HH_SUBSETS: tuple[str, ...] = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_ASSISTANT = "\n\nAssistant:"

SHP_URL = "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main"
SHP_DOMAINS: tuple[str, ...] = (
    "askacademia", "askanthropology", "askbaking", "askcarguys", "askculinary", "askdocs", "askengineers",
    "askhistorians", "askhr", "askphilosophy", "askphysics", "askscience", "asksciencefiction",
    "asksocialscience", "askvet", "changemyview", "explainlikeimfive", "legaladvice",
)
SHP_MIN_SCORE_RATIO = 2.0

IMDB_URL = "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_PREFIX_WORDS = (2, 8)  # inclusive range of prompt lengths, in words
_IMDB_REVIEW = re.compile(r"^aclImdb/(?P<split>train|test)/(?P<sentiment>pos|neg)/[^/]+\.txt$")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)

PAIRED_TEXTS: tuple[str, ...] = ("prompt", "chosen", "rejected")
UNPAIRED_TEXTS: tuple[str, ...] = ("prompt", "completion")


class DownloadFailed(OSError):
    """A raw file could not be downloaded; the message names its URL."""


# --- reading raw JSON --------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """A short, printable description of a JSON value for a problem's detail."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    shown = ascii(value)
    return f"{kinds.get(type(value), type(value).__name__)} ({shown[:40] + '...' if len(shown) > 43 else shown})"


def _path(keys: Sequence[str | int]) -> str:
    """("summaries", 1, "text") as "summaries[1].text", for a problem's detail."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in keys).lstrip(".")


def _get(row: Any, *keys: str | int) -> Any:
    """row[keys[0]][keys[1]]... of a parsed JSON row; BadRecord("missing_field") naming the path if absent or null."""
    value = row
    for key in keys:
        if isinstance(key, int):
            value = value[key] if isinstance(value, list) and key < len(value) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            raise BadRecord("missing_field", f"{_path(keys)} is missing")
    return value


def _text(row: Any, *keys: str | int) -> str:
    """The string at `keys`, or BadRecord (missing_field, not_a_string, invalid_utf8)."""
    value = _get(row, *keys)
    if not isinstance(value, str):
        raise BadRecord("not_a_string", f"{_path(keys)} is {_describe(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate from a \udXXX escape
        raise BadRecord("invalid_utf8", f"{_path(keys)} is not valid UTF-8 at character {error.start}") from None
    return value


def _json_lines(file: BinaryIO, name: str) -> Iterator[tuple[str, Any, str]]:
    """(origin "<name>:<line>", parsed object or None, problem) for each non-blank line, read as it streams."""
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        origin = f"{name}:{number}"
        try:
            row = json.loads(line.rstrip(b"\r\n").decode("utf-8"))
        except UnicodeDecodeError as error:
            yield origin, None, problem("invalid_utf8", f"byte {error.start} of the line: {error.reason}")
        except (ValueError, RecursionError) as error:
            yield origin, None, problem("unparsable", f"not JSON ({error or 'nested too deeply'})")
        else:
            if isinstance(row, dict):
                yield origin, row, ""
            else:
                yield origin, None, problem("unparsable", f"{_describe(row)} is not a JSON object")


def _bad_record(texts: Sequence[str], origin: str, bad: str, **others: Any) -> dict[str, Any]:
    return {**{field: "" for field in texts}, **others, "origin": origin, "problem": bad}


def _paired(origin: str, make: Callable[[], tuple[str, str, str]]) -> dict[str, Any]:
    """The record of `make()`'s (prompt, chosen, rejected), or a bad record with the BadRecord it raised."""
    try:
        prompt, chosen, rejected = make()
    except BadRecord as error:
        return _bad_record(PAIRED_TEXTS, origin, problem(error.reason, error.detail))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "origin": origin, "problem": ""}


# --- the recipes: one raw record in, one record out ----------------------------------------------------------------


def tldr_prompt(info: Mapping[str, Any]) -> str:
    """The summarize-from-feedback query of a Reddit post ({"subreddit", "title", "post"})."""
    return TLDR_PROMPT.format(subreddit=info["subreddit"], title=info["title"], post=info["post"])


def _with_leading_space(text: str) -> str:
    return text if text.startswith(" ") else " " + text


def tldr_split(row: Any) -> str:
    """The TFDS split of a raw comparison: "validation" for raw valid1/valid2, else "train" (where a comparison
    whose split is unreadable is reported)."""
    return TLDR_SPLITS.get(row.get("split") if isinstance(row, dict) else None, "train")


def _tldr_texts(row: dict) -> tuple[str, str, str]:
    split = _get(row, "split")
    if split not in TLDR_SPLITS:
        raise BadRecord("unparsable", f"split is {_describe(split)}, not one of {', '.join(TLDR_SPLITS)}")
    info = {field: _text(row, "info", field) for field in ("subreddit", "title", "post")}
    summaries = [_text(row, "summaries", i, "text") for i in (0, 1)]
    choice = _get(row, "choice")
    if type(choice) is not int or choice not in (0, 1):  # type(): a JSON true or 1.0 is no index
        raise BadRecord("bad_label", f"choice is {_describe(choice)}, not 0 or 1")
    return tldr_prompt(info), _with_leading_space(summaries[choice]), _with_leading_space(summaries[1 - choice])


def tldr_record(row: dict, origin: str) -> dict[str, Any]:
    """The paired record of one parsed line of comparisons/<batch>.json (chosen = summaries[choice])."""
    return _paired(origin, lambda: _tldr_texts(row))


def extract_anthropic_prompt(dialogue: str) -> str:
    """The dialogue up to and including its last "\\n\\nAssistant:" (the DPO reference's rule); BadRecord if none."""
    end = dialogue.rfind(HH_ASSISTANT)
    if end == -1:
        raise BadRecord("no_shared_prompt", f"chosen has no {HH_ASSISTANT!r} turn to split a prompt at")
    return dialogue[: end + len(HH_ASSISTANT)]


def _hh_texts(row: dict) -> tuple[str, str, str]:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    prompt = extract_anthropic_prompt(chosen)
    if not rejected.startswith(prompt):
        shared = next((i for i, (a, b) in enumerate(zip(prompt, rejected)) if a != b), min(len(prompt), len(rejected)))
        raise BadRecord("prompt_mismatch", f"rejected differs from chosen's prompt at character {shared} "
                                           f"(the prompt has {len(prompt)})")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def hh_record(row: dict, origin: str) -> dict[str, Any]:
    """The paired record of one HH line {"chosen": dialogue, "rejected": dialogue}."""
    return _paired(origin, lambda: _hh_texts(row))


def _positive_score(row: dict, field: str) -> float:
    score = _get(row, field)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not score > 0:
        raise BadRecord("bad_label", f"{field} is {_describe(score)}, not a positive number")
    return float(score)


def _shp_texts(row: dict) -> tuple[str, str, str, float]:
    history, ref_a, ref_b = _text(row, "history"), _text(row, "human_ref_A"), _text(row, "human_ref_B")
    score_a, score_b = _positive_score(row, "score_A"), _positive_score(row, "score_B")
    labels = _get(row, "labels")
    if type(labels) is not int or labels not in (0, 1):
        raise BadRecord("bad_label", f"labels is {_describe(labels)}, not 0 or 1")
    a, b = " " + ref_a, " " + ref_b
    chosen, rejected = (a, b) if labels == 1 else (b, a)  # "labels: 1 if A is preferred to B" (SHP's card)
    return "\n\nHuman: " + history + "\n\nAssistant:", chosen, rejected, max(score_a / score_b, score_b / score_a)


def shp_record(row: dict, origin: str) -> dict[str, Any] | None:
    """The paired record of one SHP line, or None for a pair the reference leaves out (score ratio below 2)."""
    try:
        prompt, chosen, rejected, ratio = _shp_texts(row)
    except BadRecord as error:
        return _bad_record(PAIRED_TEXTS, origin, problem(error.reason, error.detail))
    if ratio < SHP_MIN_SCORE_RATIO:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "origin": origin, "problem": ""}


def imdb_prefix_length(origin: str) -> int:
    """How many words of the review at `origin` (its path in the archive) form the prompt: in [2, 8], the same
    on every machine (a hash, not Python's salted `hash`)."""
    low, high = IMDB_PREFIX_WORDS
    seed = int.from_bytes(hashlib.sha256(origin.encode("utf-8")).digest()[:8], "little")
    return low + seed % (high - low + 1)


def clean_imdb_review(text: str) -> str:
    """The review with its "<br />" line breaks as spaces and every whitespace run as one space."""
    return " ".join(_HTML_BREAK.sub(" ", text).split())


def imdb_record(data: bytes, origin: str, positive: bool) -> dict[str, Any]:
    """The unpaired record of one review file: its first words as the prompt, the rest as the completion."""
    try:
        words = clean_imdb_review(data.decode("utf-8")).split()
    except UnicodeDecodeError as error:
        return _bad_record(UNPAIRED_TEXTS, origin, problem("invalid_utf8", f"byte {error.start}: {error.reason}"),
                           label=positive)
    k = imdb_prefix_length(origin)
    if len(words) <= k:
        return _bad_record(UNPAIRED_TEXTS, origin, problem(
            "empty_completion", f"the review's {len(words)} word(s) leave none after a {k}-word prompt"),
            label=positive)
    return {"prompt": " ".join(words[:k]), "completion": " " + " ".join(words[k:]), "label": positive,
            "origin": origin, "problem": ""}


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
    """`dl_manager.download(urls)` (or the files of builder.raw_dir), any failure one DownloadFailed line naming the URL."""
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


def _json_lines_records(paths: Mapping[str, Any], to_record: Callable, *, gzipped: bool = False,
                        keep: Callable[[Any], bool] = lambda row: True):
    """(origin, record) of each line of the files `paths` ({name: local path}) whose parsed row (None if it did
    not parse) `keep` accepts; a None from `to_record` (the recipe's filter) is left out and counted in the log."""
    left_out = 0
    for name, path in paths.items():
        with epath.Path(path).open("rb") as raw, (gzip.open(raw) if gzipped else contextlib.nullcontext(raw)) as file:
            for origin, row, bad in _json_lines(file, name):
                if not keep(row):
                    continue
                record = _bad_record(PAIRED_TEXTS, origin, bad) if bad else to_record(row, origin)
                if record is None:
                    left_out += 1
                else:
                    yield origin, record
    if left_out:
        logging.info("%d raw records left out by the recipe's filter", left_out)


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
        return _json_lines_records(paths, tldr_record, keep=lambda row: tldr_split(row) == split)


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
        return _json_lines_records(paths, hh_record, gzipped=True)


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
        return _json_lines_records(paths, shp_record)


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
        for path, data in _tar_files(archive):
            match = _IMDB_REVIEW.match(path)
            if match and match["split"] == split:
                yield path, imdb_record(data.strip(), path, positive=match["sentiment"] == "pos")


def _tar_files(archive) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file of a .tar.gz, streamed in archive order. (TFDS's `iter_archive`
    opens the archive with TensorFlow's gfile, which this package does without.)"""
    with epath.Path(archive).open("rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.isfile():
                yield os.path.normpath(member.name), tar.extractfile(member).read()


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
