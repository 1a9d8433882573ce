"""The experiment's JSON-lines files (pairs, samples): one JSON object a line, written atomically."""

from __future__ import annotations

import json
import os
from typing import Sequence


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    """Write records one JSON object a line, atomically (a killed run leaves no half file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)
