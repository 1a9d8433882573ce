"""The preference-file source: a user's JSONL, JSON or Parquet file read into records (see records.py).

Each row / object / line becomes one record, in file order; a bad one is kept, marked with its `problem`.
The kind is decided by the keys present (a null value counts as absent):

- `chosen` or `rejected` present: paired. Without `prompt`, the prompt is the longest prefix chosen and
  rejected share (`extract_prompt`, Hugging Face TRL's rule);
- else `completion` or `label` present: unpaired (KTO); `label` must be a JSON boolean;
- else: "missing_field". Other keys are ignored (so a row with both chosen and completion is paired).

Every text is a string or chat messages ([{"role", "content"}], other message keys dropped). If any text of a
record is messages, the whole record becomes messages: a string prompt turns into one user message, a string
completion into one assistant message, and a completion that repeats the prompt messages at its start loses
them. A string prompt beside two conversations that share a message prefix is taken as a copy of it, and the
shared prefix is the prompt (TRL's `maybe_extract_prompt`). Empty or identical texts pass: tokenisation judges them.

A .json file holds a list of objects or {"data": [...]} (the `field="data"` layout of Hugging Face `datasets`);
an element that is not an object is marked "unparsable", like such a JSONL line. A .json file holding JSON lines
(what `datasets.Dataset.to_json` writes) is read as JSONL. Only whole-file problems raise: missing file, unknown
suffix, JSON that is none of these, an unreadable Parquet file.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dpo_jax.data.records import BadRecord, problem

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")
_SPLIT_STREAM = 0x5EED5971  # the eval split's own random stream (pipeline.py uses [seed, epoch])
_BOM = b"\xef\xbb\xbf"


# --- reading: (origin, raw row or None, problem) per record ----------------------------------------------------


def _jsonl_rows(data: bytes, name: str) -> Iterator[tuple[str, Any, str]]:
    """One row per non-blank line; a line is decoded on its own so one bad line does not spoil the file."""
    for number, line in enumerate(data.removeprefix(_BOM).split(b"\n"), start=1):
        if not line.strip(b" \t\r"):
            continue
        origin = f"{name}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield origin, None, problem("invalid_utf8", f"byte {error.start} of the line: {error.reason}")
            continue
        try:
            yield origin, json.loads(text), ""
        except (ValueError, RecursionError) as error:
            yield origin, None, problem("unparsable", f"not JSON ({_json_error(error)})")


def _json_rows(data: bytes, name: str, path: str) -> Iterator[tuple[str, Any, str]]:
    """One row per element of the top-level list (or of {"data": [...]}); JSON lines fall back to JSONL."""
    # Undecodable bytes become lone surrogates, which the per-record UTF-8 check marks: one bad text, one bad record.
    text = data.removeprefix(_BOM).decode("utf-8", errors="surrogateescape")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        if _first_line_is_object(data):
            yield from _jsonl_rows(data, name)
            return
        raise ValueError(f"{path}: not valid JSON ({_json_error(error)}); expected a JSON list of objects, "
                         '{"data": [...]}, or one JSON object per line') from error
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        if isinstance(document, dict) and _first_line_is_object(data):  # a JSONL file of one line
            yield from _jsonl_rows(data, name)
            return
        raise ValueError(f'{path}: the JSON document is {_describe(document)}; expected a list of objects or '
                         '{"data": [...]}')
    for index, row in enumerate(document):
        yield f"{name}:row {index}", row, ""


def _first_line_is_object(data: bytes) -> bool:
    """Whether the first non-blank line of `data` is a JSON object by itself (the file is JSON lines)."""
    for line in data.removeprefix(_BOM).split(b"\n"):
        if line.strip(b" \t\r"):
            try:
                return isinstance(json.loads(line.decode("utf-8")), dict)
            except (ValueError, RecursionError):
                return False
    return False


def _parquet_rows(path: str, name: str) -> Iterator[tuple[str, Any, str]]:
    """One row per Parquet row; a row whose strings are not UTF-8 is marked, not fatal."""
    import pyarrow.parquet as pq  # only Parquet users pay for the import

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from error
    try:
        rows = table.to_pylist()
    except UnicodeDecodeError:  # find the offending rows one by one
        rows = None
    for index in range(table.num_rows):
        origin = f"{name}:row {index}"
        if rows is not None:
            yield origin, rows[index], ""
            continue
        try:
            yield origin, table.slice(index, 1).to_pylist()[0], ""
        except UnicodeDecodeError as error:
            yield origin, None, problem("invalid_utf8", f"a string column: {error.reason}")


def _json_error(error: BaseException) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}" if error.lineno == 1 else f"{error.msg} at line {error.lineno}"
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


# --- normalising one row ----------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    """A short, printable description of a JSON value for a problem's detail."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    shown = ascii(value)
    return f"{kinds.get(type(value), type(value).__name__)} ({shown[:40] + '...' if len(shown) > 43 else shown})"


def _check_utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: undecodable bytes, or a \udXXX escape in the JSON
        raise BadRecord("invalid_utf8", f"{where} is not valid UTF-8 at character {error.start}") from None
    return text


def _messages(value: list, field: str) -> list[dict[str, str]]:
    """Chat messages as {"role", "content"} string dicts, or bad_messages naming the first bad one."""
    out = []
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRecord("bad_messages", f"{field}[{index}] is {_describe(message)}, not "
                                            "{role: string, content: string}")
        out.append({"role": _check_utf8(message["role"], f"{field}[{index}].role"),
                    "content": _check_utf8(message["content"], f"{field}[{index}].content")})
    return out


def _text(row: dict, field: str) -> str | list[dict[str, str]]:
    """The string or chat messages in `row[field]`, or BadRecord (missing_field, not_a_string, bad_messages, ...)."""
    value = row.get(field)
    if value is None:
        raise BadRecord("missing_field", f"{field!r} is {'null' if field in row else 'missing'}")
    if isinstance(value, str):
        return _check_utf8(value, repr(field))
    if isinstance(value, list):
        return _messages(value, field)
    raise BadRecord("not_a_string", f"{field!r} is {_describe(value)}, not a string or chat messages")


def _shared_prefix_length(chosen: Sequence, rejected: Sequence) -> int:
    """TRL's `extract_prompt` split point: the first index where chosen and rejected differ, one back when the
    character before it is a space (the completion keeps its leading space); if neither differs within the
    shorter one, TRL's loop leaves the last index of the shorter (so its last item stays a completion)."""
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            # TRL reads chosen[-1] when index == 0 (a wrap-around); nothing is shared then, so no step back.
            return index - 1 if index > 0 and chosen[index - 1] == " " else index
    return max(min(len(chosen), len(rejected)) - 1, 0)


def extract_prompt(chosen: Sequence, rejected: Sequence) -> tuple[Sequence, Sequence, Sequence]:
    """(prompt, chosen, rejected) split off two full texts (or two conversations) that share their start, as
    Hugging Face TRL's `extract_prompt` does; BadRecord("no_shared_prompt") when the prompt would be empty."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise BadRecord("no_shared_prompt", "one of chosen and rejected is a string, the other chat messages")
    index = _shared_prefix_length(chosen, rejected)
    if index == 0:
        raise BadRecord("no_shared_prompt", "chosen and rejected differ from their first "
                                            f"{'character' if isinstance(chosen, str) else 'message'}")
    return chosen[:index], chosen[index:], rejected[index:]


def _as_prompt_messages(prompt: str | list) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _continuation(prompt: list, completion: str | list) -> tuple[list, bool]:
    """A completion as the messages that follow `prompt`, and whether it repeated the prompt at its start."""
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}], False
    repeats = bool(prompt) and completion[: len(prompt)] == prompt
    return (completion[len(prompt):] if repeats else completion), repeats


def _paired(row: dict) -> dict[str, Any]:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if row.get("prompt") is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = _text(row, "prompt")
    if all(isinstance(text, str) for text in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list):
        if _shared_prefix_length(chosen, rejected) > 0:  # TRL: the string prompt is a copy of the shared turns
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    both_messages = isinstance(chosen, list) and isinstance(rejected, list)
    prompt = _as_prompt_messages(prompt)
    (chosen, chosen_repeats), (rejected, rejected_repeats) = (_continuation(prompt, chosen),
                                                              _continuation(prompt, rejected))
    if both_messages and chosen_repeats != rejected_repeats:
        first = "chosen" if chosen_repeats else "rejected"
        raise BadRecord("prompt_mismatch", f"{first} starts with the prompt messages, the other does not")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _unpaired(row: dict) -> dict[str, Any]:
    prompt, completion = _text(row, "prompt"), _text(row, "completion")
    label = row.get("label")
    if label is None:
        raise BadRecord("missing_field", f"'label' is {'null' if 'label' in row else 'missing'}")
    if not isinstance(label, bool):
        raise BadRecord("bad_label", f"'label' is {_describe(label)}, not true or false")
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        prompt = _as_prompt_messages(prompt)
        completion, _ = _continuation(prompt, completion)
    return {"prompt": prompt, "completion": completion, "label": label}


def normalise_row(row: Any, origin: str) -> dict[str, Any]:
    """One raw row (a parsed JSON value or a Parquet row) as a record; a bad row as {"origin", "problem"}."""
    try:
        if not isinstance(row, dict):
            raise BadRecord("unparsable", f"{_describe(row)} is not a JSON object")
        if row.get("chosen") is not None or row.get("rejected") is not None:
            record = _paired(row)
        elif row.get("completion") is not None or row.get("label") is not None:
            record = _unpaired(row)
        else:
            keys = sorted(map(ascii, row))
            raise BadRecord("missing_field", "needs chosen and rejected (paired) or prompt, completion and label "
                                             f"(unpaired); has {', '.join(keys[:8]) or 'no keys'}"
                                             f"{', ...' if len(keys) > 8 else ''}")
    except BadRecord as error:
        return {"origin": origin, "problem": problem(error.reason, error.detail)}
    return {**record, "origin": origin, "problem": ""}


# --- the public API -----------------------------------------------------------------------------------------------


def file_rows(path: str, name: str) -> Iterator[tuple[str, Any, str]]:
    """(origin, raw row or None, problem) of each record of a local JSONL / JSON / Parquet file (.gz: gzipped JSON
    lines or JSON), origins prefixed by `name`; ValueError for an unknown suffix or an unreadable whole file."""
    suffix = os.path.splitext(path.removesuffix(".gz"))[1].lower()
    if suffix not in FILE_SUFFIXES or (path.endswith(".gz") and suffix == ".parquet"):
        raise ValueError(f"{path}: unknown preference file type {suffix or '(no suffix)'!r}; "
                         f"expected one of {', '.join(FILE_SUFFIXES)} (JSON ones may be .gz)")
    if suffix == ".parquet":
        return _parquet_rows(path, name)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    return _jsonl_rows(data, name) if suffix == ".jsonl" else _json_rows(data, name, path)


def rename_columns(row: Any, columns: Mapping[str, str]) -> Any:
    """`row` with each field of `columns` ({our field: the source's column, a dotted path for a nested one})
    taken from that column; a row that is not an object, or an empty mapping, passes unchanged."""
    if not columns or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    for field, column in columns.items():
        value: Any = row
        for part in column.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            renamed[field] = value
    return renamed


def read_preference_file(path: str, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Every record of a JSONL / JSON / Parquet preference file, normalised, in file order; a bad record keeps only
    its `origin` ("<basename>:<line>" for JSONL, 1-based; "<basename>:row <i>", 0-based, otherwise) and `problem`.
    `columns` renames the file's columns to ours first (see `rename_columns`).

    Raises FileNotFoundError or ValueError, naming the file, only for problems of the whole file."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise ValueError(f"{path}: unknown preference file type {suffix or '(no suffix)'!r}; "
                         f"expected one of {', '.join(FILE_SUFFIXES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such preference file (expected a {suffix} file)")
    name = os.path.basename(path)
    if suffix == ".parquet":
        rows = _parquet_rows(path, name)
    else:
        with open(path, "rb") as f:
            data = f.read()
        rows = _jsonl_rows(data, name) if suffix == ".jsonl" else _json_rows(data, name, path)
    return [{"origin": origin, "problem": bad} if bad else normalise_row(rename_columns(row, columns or {}), origin)
            for origin, row, bad in rows]


def split_records(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) of one file's records when no separate eval file is given: round(eval_fraction · N) records
    (at least 1 and at most N − 1 when N >= 2) drawn by `seed`'s own stream, both parts kept in file order."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(records)
    if n < 2:
        return list(records), []
    num_eval = min(max(round(eval_fraction * n), 1), n - 1)
    in_eval = np.zeros(n, dtype=bool)
    in_eval[np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)[:num_eval]] = True
    return ([r for r, e in zip(records, in_eval) if not e], [r for r, e in zip(records, in_eval) if e])
