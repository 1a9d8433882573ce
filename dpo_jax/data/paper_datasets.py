"""The paper's datasets (TL;DR comparisons, Anthropic HH, SHP, IMDb): where their raw files are, and how each raw
record becomes a record (see records.py), read straight from the raw files. tfds_sources.py wraps these readers in
TFDS builders that download the files and write array_record.

A raw record that cannot be used is kept, with its `problem` and empty texts; only the filters of the reference
recipes leave records out. The recipes, by dataset name (and its TFDS builder's name):

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
  uses 2–8 token prefixes: words stand in for tokens here, as the recipe has no tokenizer.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import tarfile
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from absl import logging
from etils import epath

from dpo_jax.data.records import BadRecord, problem

TFDS_SOURCES: tuple[str, ...] = ("tldr", "hh", "shp", "imdb")  # their names as data.source

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


# --- reading the raw files ----------------------------------------------------------------------------------------


def json_lines_records(paths: Mapping[str, Any], to_record: Callable, *, gzipped: bool = False,
                       keep: Callable[[Any], bool] = lambda row: True) -> Iterator[tuple[str, dict[str, Any]]]:
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


def tar_files(archive) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file of a .tar.gz, streamed in archive order. (TFDS's `iter_archive`
    opens the archive with TensorFlow's gfile, which this package does without.)"""
    with epath.Path(archive).open("rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
        for member in tar:
            if member.isfile():
                yield os.path.normpath(member.name), tar.extractfile(member).read()


def imdb_records(archive, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, record) of each review of `split` ("train" or "test") in the IMDb archive, in archive order."""
    for path, data in tar_files(archive):
        match = _IMDB_REVIEW.match(path)
        if match and match["split"] == split:
            yield path, imdb_record(data.strip(), path, positive=match["sentiment"] == "pos")
