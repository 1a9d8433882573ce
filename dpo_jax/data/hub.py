"""Hugging Face Hub datasets by name: `data.source = "hf:ORG/NAME"`, read as the preference-file source reads a file.

The repository's data files (Parquet, JSON lines, JSON; the JSON ones may be gzipped) come through `huggingface_hub`
(`snapshot_download`): from the local cache (`data.hf_cache_dir`, else HF_HUB_CACHE / HF_HOME's), downloaded when
absent unless HF_HUB_OFFLINE=1, in which case only the cache is read. Which files hold a config's split follows the
Hub's own rules: the `configs:` of the dataset card (README.md's YAML: `data_files` per split, or a `data_dir`),
else the files under the config's directory (data.hf_config) whose path names the split (`data/train-*.parquet`,
`helpful-base/train.jsonl.gz`, or the `{config}/{split}/*.parquet` of the Hub's Parquet conversion, revision
`refs/convert/parquet`, which every dataset has). Each row then goes through the file source's normalisation
(files.normalise_row: prompt/chosen/rejected, full texts, chat messages, unpaired with labels), after `data.columns`
renames the dataset's columns to ours.

A spec may carry its own settings after '?': `hf:ORG/NAME?config=C&split=S&revision=R` (a mixture's sources differ).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import urllib.parse
from typing import Any, Mapping

from dpo_jax.data.files import file_rows, normalise_row, rename_columns, split_records

PREFIX = "hf:"
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
SPEC_KEYS = ("config", "split", "eval_split", "revision")
_SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
                  "validation": ("validation", "valid", "val", "dev")}


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """Which dataset, config, split (and held-out split: '' for a seeded share of `split`) and revision to read."""

    repo_id: str
    config: str = ""
    split: str = "train"
    eval_split: str = ""
    revision: str = ""


def is_hub_source(source: Any) -> bool:
    """Whether `source` names a Hub dataset ('hf:ORG/NAME...')."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse_spec(source: str, config: str = "", split: str = "train", eval_split: str = "",
               revision: str = "") -> HubSpec:
    """The HubSpec of 'hf:ORG/NAME[?config=..&split=..&eval_split=..&revision=..]', the query's values over the
    keyword defaults (data.hf_*); ValueError naming what is wrong."""
    if not is_hub_source(source):
        raise ValueError(f"{source!r} is not a Hub dataset: expected 'hf:ORG/NAME'")
    name, _, query = source[len(PREFIX):].partition("?")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*", name):
        raise ValueError(f"{source!r}: expected 'hf:ORG/NAME' (a Hub dataset repo id), got {name!r}")
    settings = dict(config=config, split=split, eval_split=eval_split, revision=revision)
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        if key not in SPEC_KEYS or len(values) != 1:
            raise ValueError(f"{source!r}: unknown or repeated setting {key!r}; allowed once each: "
                             f"{', '.join(SPEC_KEYS)}")
        settings[key] = values[0]
    if not settings["split"]:
        raise ValueError(f"{source!r}: the split is empty")
    return HubSpec(name, **settings)


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _snapshot(spec: HubSpec, cache_dir: str, patterns: list[str] | None) -> str:
    """The local folder of the dataset's revision holding (at least) the files matching `patterns`."""
    import huggingface_hub  # only Hub users pay for the import

    try:
        return huggingface_hub.snapshot_download(
            spec.repo_id, repo_type="dataset", revision=spec.revision or None, cache_dir=cache_dir or None,
            allow_patterns=patterns, local_files_only=_offline())
    except Exception as error:  # LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HTTP errors
        where = f"hf:{spec.repo_id}{'@' + spec.revision if spec.revision else ''}"
        hint = (" (HF_HUB_OFFLINE=1: only the local cache is read; run once online, or set data.hf_cache_dir to "
                "the cache that holds it)") if _offline() else ""
        raise ValueError(f"{where}: could not get the dataset{hint}: {type(error).__name__}: {error}") from error


def _card_configs(folder: str) -> list[dict]:
    """The `configs:` list of the dataset card's YAML header ([] without a card or header)."""
    import yaml

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    header = yaml.safe_load(match.group(1)) if match else None
    configs = header.get("configs") if isinstance(header, dict) else None
    return configs if isinstance(configs, list) else []


def _card_patterns(configs: list[dict], spec: HubSpec, split: str) -> tuple[list[str] | None, str]:
    """(the glob patterns of `split`'s files by the card, or None if the card does not say; the data_dir)."""
    if not configs:
        return None, spec.config
    chosen = next((c for c in configs if c.get("config_name") == spec.config), None) if spec.config else next(
        (c for c in configs if c.get("default")), next((c for c in configs if c.get("config_name") == "default"),
                                                       configs[0]))
    if chosen is None:
        names = ", ".join(str(c.get("config_name")) for c in configs)
        raise ValueError(f"hf:{spec.repo_id}: no config {spec.config!r}; its card lists: {names}")
    data_files = chosen.get("data_files")
    if data_files is None:
        return None, chosen.get("data_dir", "")
    if isinstance(data_files, (str, list)) and not (isinstance(data_files, list) and data_files
                                                    and isinstance(data_files[0], dict)):
        files = [data_files] if isinstance(data_files, str) else data_files
        return (files if split == "train" else []), ""
    entries = data_files if isinstance(data_files, list) else [{"split": k, "path": v} for k, v in data_files.items()]
    for entry in entries:
        if entry.get("split") == split:
            path = entry.get("path")
            return ([path] if isinstance(path, str) else list(path)), ""
    splits = ", ".join(str(e.get("split")) for e in entries)
    raise ValueError(f"hf:{spec.repo_id} config {chosen.get('config_name')!r}: no split {split!r}; it has: {splits}")


def _names_split(path: str, split: str) -> bool:
    names = "|".join(map(re.escape, _SPLIT_ALIASES.get(split, (split,))))
    return re.search(rf"(^|[/_.\- 0-9])({names})([/_.\- 0-9]|$)", path) is not None


def split_files(spec: HubSpec, split: str, cache_dir: str = "") -> list[tuple[str, str]]:
    """(local path, path in the repository) of each data file of `split`, sorted: fetched (or found in the cache)."""
    card = _snapshot(spec, cache_dir, ["README.md"])
    patterns, data_dir = _card_patterns(_card_configs(card), spec, split)
    prefix = f"{data_dir.strip('/')}/" if data_dir else ""
    wanted = patterns if patterns is not None else [f"{prefix}*{suffix}" for suffix in DATA_SUFFIXES]
    folder = _snapshot(spec, cache_dir, wanted)
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            local = os.path.join(root, name)
            relative = os.path.relpath(local, folder).replace(os.sep, "/")
            if relative.endswith(DATA_SUFFIXES) and any(fnmatch.fnmatch(relative, p) for p in wanted):
                found.append((local, relative))
    found.sort(key=lambda item: item[1])
    if patterns is None:  # no card: the files whose path names the split (all of them, for train, if none does)
        named = [f for f in found if _names_split(f[1][len(prefix):], split)]
        if not named and split == "train" and not any(
                _names_split(f[1][len(prefix):], other) for f in found for other in ("test", "validation")):
            named = found
        found = named
    if not found:
        raise ValueError(f"hf:{spec.repo_id}{' config ' + repr(spec.config) if spec.config else ''}: no data files "
                         f"of split {split!r} ({', '.join(wanted)}; files as {', '.join(DATA_SUFFIXES)})")
    return found


def read_split(spec: HubSpec, split: str, cache_dir: str = "", columns: Mapping[str, str] | None = None) -> list[dict]:
    """Every record of `split` of the dataset, normalised as a preference file's (origins
    'ORG/NAME/<file>:row <i>' or ':<line>'); bad rows are kept, marked with their problem."""
    records = []
    for local, relative in split_files(spec, split, cache_dir):
        for origin, row, bad in file_rows(local, f"{spec.repo_id}/{relative}"):
            records.append({"origin": origin, "problem": bad} if bad
                           else normalise_row(rename_columns(row, columns or {}), origin))
    return records


def load_hub_records(spec: HubSpec, split: str, seed: int, eval_fraction: float, cache_dir: str = "",
                     columns: Mapping[str, str] | None = None) -> list[dict]:
    """The records of our `split` ('train' or 'eval'): spec.split, and spec.eval_split or a seeded
    `eval_fraction` of spec.split (as the file source splits a file)."""
    if spec.eval_split:
        return read_split(spec, spec.split if split == "train" else spec.eval_split, cache_dir, columns)
    train, held_out = split_records(read_split(spec, spec.split, cache_dir, columns), eval_fraction, seed)
    return train if split == "train" else held_out
