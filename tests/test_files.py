"""The preference-file source: every record form and every problem, in JSONL, JSON and Parquet; TRL's prompt
extraction; the seeded eval split; and fuzzing that no file content makes the reader raise."""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_jax.data.files import FILE_SUFFIXES, extract_prompt, read_preference_file, split_records
from dpo_jax.data.records import REASONS, BadRecord, is_paired, raise_if_bad

FORMATS = ("jsonl", "json", "parquet")


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


def write_rows(directory, name: str, fmt: str, rows: list) -> str:
    """`rows` written as a file of format `fmt`: one JSON line each, one JSON array, or one Parquet table."""
    path = os.path.join(directory, f"{name}.{fmt}")
    if fmt == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    elif fmt == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    else:
        keys = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist keeps only the first row's keys
        pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), path)
    return path


def write_bytes(directory, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def first_origin(name: str, fmt: str) -> str:
    return f"{name}.{fmt}:1" if fmt == "jsonl" else f"{name}.{fmt}:row 0"


def reason(record) -> str:
    return record["problem"].partition(": ")[0]


# --- every form, in every format ----------------------------------------------------------------------------------

GOOD = {
    "explicit_pair": (
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"},
        {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"},
    ),
    "extra_keys_ignored": (
        {"prompt": "p", "chosen": "a", "rejected": "b", "score": 3, "id": "x"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ),
    "implicit_prompt_keeps_leading_space": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ),
    "null_prompt_is_absent": (
        {"prompt": None, "chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: go away"},
        {"prompt": "Human: hi Assistant:", "chosen": " hello", "rejected": " go away"},
    ),
    "implicit_prompt_of_conversations": (
        {"chosen": [user("sky?"), assistant("blue")], "rejected": [user("sky?"), assistant("green")]},
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "multi_turn_conversations": (
        {"chosen": [system("S"), user("a"), assistant("b"), user("c"), assistant("d")],
         "rejected": [system("S"), user("a"), assistant("b"), user("c"), assistant("e")]},
        {"prompt": [system("S"), user("a"), assistant("b"), user("c")], "chosen": [assistant("d")],
         "rejected": [assistant("e")]},
    ),
    "message_prompt_string_completions": (
        {"prompt": [system("S"), user("sky?")], "chosen": "blue", "rejected": "green"},
        {"prompt": [system("S"), user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "message_prompt_one_string_completion": (
        {"prompt": [user("sky?")], "chosen": "blue", "rejected": [assistant("green")]},
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "message_prompt_message_completions": (
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "completions_repeating_the_prompt_lose_it": (
        {"prompt": [user("sky?")], "chosen": [user("sky?"), assistant("blue")],
         "rejected": [user("sky?"), assistant("green")]},
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "string_prompt_copy_of_shared_turns": (  # TRL's maybe_extract_prompt: the shared turns are the prompt
        {"prompt": "sky?", "chosen": [system("S"), user("sky?"), assistant("blue")],
         "rejected": [system("S"), user("sky?"), assistant("green")]},
        {"prompt": [system("S"), user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "string_prompt_assistant_completions": (
        {"prompt": "sky?", "chosen": [assistant("blue")], "rejected": [assistant("green")]},
        {"prompt": [user("sky?")], "chosen": [assistant("blue")], "rejected": [assistant("green")]},
    ),
    "message_keys_beyond_role_content_dropped": (
        {"prompt": [{"role": "user", "content": "hi", "name": "ann"}], "chosen": "a", "rejected": "b"},
        {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]},
    ),
    "empty_and_identical_texts_pass": (
        {"prompt": "", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "same", "rejected": "same"},
    ),
    "unpaired_true": (
        {"prompt": "Q", "completion": " yes", "label": True},
        {"prompt": "Q", "completion": " yes", "label": True},
    ),
    "unpaired_false": (
        {"prompt": "Q", "completion": " no", "label": False, "extra": [1, 2]},
        {"prompt": "Q", "completion": " no", "label": False},
    ),
    "unpaired_message_prompt_string_completion": (
        {"prompt": [user("Q")], "completion": "yes", "label": True},
        {"prompt": [user("Q")], "completion": [assistant("yes")], "label": True},
    ),
    "unpaired_messages": (
        {"prompt": [user("Q")], "completion": [assistant("yes")], "label": False},
        {"prompt": [user("Q")], "completion": [assistant("yes")], "label": False},
    ),
    "unpaired_full_conversation": (
        {"prompt": "Q", "completion": [user("Q"), assistant("yes")], "label": True},
        {"prompt": [user("Q")], "completion": [assistant("yes")], "label": True},
    ),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_record_forms(tmp_path, fmt, case):
    row, expected = GOOD[case]
    records = read_preference_file(write_rows(tmp_path, case, fmt, [row]))
    assert records == [{**expected, "origin": first_origin(case, fmt), "problem": ""}]
    assert is_paired(records[0]) == ("chosen" in expected)


# (row, reason, formats it can be written in: Parquet cannot hold mixed-type lists or lone surrogates)
BAD = {
    "only_chosen": ({"prompt": "p", "chosen": "a"}, "missing_field", FORMATS),
    "only_rejected": ({"rejected": "b"}, "missing_field", FORMATS),
    "null_chosen": ({"prompt": "p", "chosen": None, "rejected": "b"}, "missing_field", FORMATS),
    "no_kind_keys": ({"prompt": "p", "text": "t"}, "missing_field", FORMATS),
    "empty_object": ({}, "missing_field", ("jsonl", "json")),
    "unpaired_without_prompt": ({"completion": "c", "label": True}, "missing_field", FORMATS),
    "unpaired_without_label": ({"prompt": "p", "completion": "c"}, "missing_field", FORMATS),
    "unpaired_without_completion": ({"prompt": "p", "label": False}, "missing_field", FORMATS),
    "label_one": ({"prompt": "p", "completion": "c", "label": 1}, "bad_label", FORMATS),
    "label_zero": ({"prompt": "p", "completion": "c", "label": 0}, "bad_label", FORMATS),
    "label_yes": ({"prompt": "p", "completion": "c", "label": "yes"}, "bad_label", FORMATS),
    "label_true_string": ({"prompt": "p", "completion": "c", "label": "true"}, "bad_label", FORMATS),
    "chosen_number": ({"prompt": "p", "chosen": 3, "rejected": "b"}, "not_a_string", FORMATS),
    "prompt_object": ({"prompt": {"text": "p"}, "chosen": "a", "rejected": "b"}, "not_a_string", FORMATS),
    "completion_bool": ({"prompt": "p", "completion": True, "label": True}, "not_a_string", FORMATS),
    "message_without_content": ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "bad_messages",
                                FORMATS),
    "message_content_null": ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"},
                             "bad_messages", FORMATS),
    "message_content_parts": ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                               "chosen": "a", "rejected": "b"}, "bad_messages", FORMATS),
    "list_of_strings": ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "bad_messages", FORMATS),
    "mixed_list": ({"prompt": "p", "chosen": [user("a"), 3], "rejected": "b"}, "bad_messages", ("jsonl", "json")),
    "no_shared_text": ({"chosen": "yes", "rejected": "no"}, "no_shared_prompt", FORMATS),
    "shared_only_a_space": ({"chosen": " yes", "rejected": " no"}, "no_shared_prompt", FORMATS),
    "no_shared_message": ({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("b")]},
                          "no_shared_prompt", FORMATS),
    "text_beside_messages": ({"chosen": "user: a", "rejected": [user("a")]}, "no_shared_prompt", FORMATS),
    "one_completion_repeats_prompt": ({"prompt": [user("q")], "chosen": [user("q"), assistant("a")],
                                       "rejected": [assistant("b")]}, "prompt_mismatch", FORMATS),
    "lone_surrogate_escape": ({"prompt": "p\udc80", "chosen": "a", "rejected": "b"}, "invalid_utf8",
                              ("jsonl", "json")),
    "lone_surrogate_in_message": ({"prompt": [user("\ud800")], "chosen": "a", "rejected": "b"}, "invalid_utf8",
                                  ("jsonl", "json")),
}


@pytest.mark.parametrize("case, fmt", [(case, fmt) for case in sorted(BAD) for fmt in BAD[case][2]])
def test_bad_records_are_marked(tmp_path, case, fmt):
    row, expected_reason, _ = BAD[case]
    [record] = read_preference_file(write_rows(tmp_path, case, fmt, [row]))
    assert set(record) == {"origin", "problem"}
    assert record["origin"] == first_origin(case, fmt)
    assert reason(record) == expected_reason and len(record["problem"]) > len(expected_reason) + 2
    with pytest.raises(BadRecord, match=expected_reason) as raised:
        raise_if_bad(record)
    assert raised.value.origin == record["origin"]


def test_problem_details_name_the_field(tmp_path):
    rows = [
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        {"prompt": "p", "completion": "c", "label": "yes"},
        {"prompt": [user("q"), {"role": "assistant"}], "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"chosen": "yes", "rejected": "no"},
    ]
    problems = [r["problem"] for r in read_preference_file(write_rows(tmp_path, "d", "json", rows))]
    assert problems == [
        "not_a_string: 'chosen' is a number (3), not a string or chat messages",
        "bad_label: 'label' is a string ('yes'), not true or false",
        "bad_messages: prompt[1] is an object ({'role': 'assistant'}), not {role: string, content: string}",
        "missing_field: 'rejected' is missing",
        "missing_field: 'chosen' is null",
        "no_shared_prompt: chosen and rejected differ from their first character",
    ]


# --- TRL's prompt extraction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chosen, rejected, expected",
    [
        # TRL's docstring example: the completions keep their leading space.
        ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
        ("Q: 2+2=4", "Q: 2+2=5", ("Q: 2+2=", "4", "5")),  # no space before the difference: no step back
        ("Q:\nyes", "Q:\nno", ("Q:\n", "yes", "no")),  # only a space steps back, not other whitespace
        ("A  b", "A  c", ("A ", " b", " c")),  # one step back, even after two spaces
        # No difference within the shorter: TRL's loop stops at its last index, which stays a completion.
        ("abc", "abcd", ("ab", "c", "cd")),
        ("same text", "same text", ("same tex", "t", "t")),
        ([user("q"), assistant("a")], [user("q"), assistant("b")], ([user("q")], [assistant("a")], [assistant("b")])),
        ([user("q"), assistant("a")], [user("q"), assistant("a")], ([user("q")], [assistant("a")], [assistant("a")])),
    ],
)
def test_extract_prompt_follows_trl(chosen, rejected, expected):
    assert extract_prompt(chosen, rejected) == expected


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        ("yes", "no"),  # differ at once
        ("yes ", "no"),  # TRL would read chosen[-1] here and wrap around; nothing is shared
        (" a", " b"),  # the shared space goes back to the completions
        ("", "abc"),  # TRL raises UnboundLocalError on an empty text
        ("a", "ab"),  # the shorter's last (only) character stays a completion
        ([user("q")], [user("r")]),
        ([], [user("q")]),
        ("text", [user("text")]),
    ],
)
def test_extract_prompt_without_shared_prompt(chosen, rejected):
    with pytest.raises(BadRecord, match="no_shared_prompt"):
        extract_prompt(chosen, rejected)


# --- file formats and whole-file errors -----------------------------------------------------------------------------

PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}
PAIR_RECORD = {"prompt": "p", "chosen": "a", "rejected": "b", "problem": ""}


def test_jsonl_lines_blank_lines_bad_lines(tmp_path):
    lines = [
        json.dumps(PAIR).encode(),
        b"",
        b"  \t\r",
        b"{not json",
        b"[1, 2]",
        b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # Latin-1, not UTF-8
        b'"just a string"',
        json.dumps({"prompt": "p", "completion": "c", "label": False}).encode() + b"\r",  # CRLF line end
    ]
    records = read_preference_file(write_bytes(tmp_path, "prefs.jsonl", b"\n".join(lines)))
    assert [r["origin"] for r in records] == [f"prefs.jsonl:{n}" for n in (1, 4, 5, 6, 7, 8)]
    assert records[0] == {**PAIR_RECORD, "origin": "prefs.jsonl:1"}
    assert [reason(r) for r in records[1:5]] == ["unparsable", "unparsable", "invalid_utf8", "unparsable"]
    assert records[1]["problem"].startswith("unparsable: not JSON (")
    assert records[2]["problem"] == "unparsable: a list ([1, 2]) is not a JSON object"
    assert records[5] == {"prompt": "p", "completion": "c", "label": False, "origin": "prefs.jsonl:8", "problem": ""}


def test_jsonl_byte_order_mark_and_no_final_newline(tmp_path):
    path = write_bytes(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + json.dumps(PAIR).encode())
    assert read_preference_file(path) == [{**PAIR_RECORD, "origin": "bom.jsonl:1"}]
    assert read_preference_file(write_bytes(tmp_path, "empty.jsonl", b"\n\n")) == []


def test_json_array_wrapper_and_bad_elements(tmp_path):
    rows = [PAIR, 7, None, {"prompt": "p", "completion": "c", "label": True}]
    expected = [
        {**PAIR_RECORD, "origin": "w.json:row 0"},
        {"origin": "w.json:row 1", "problem": "unparsable: a number (7) is not a JSON object"},
        {"origin": "w.json:row 2", "problem": "unparsable: null (None) is not a JSON object"},
        {"prompt": "p", "completion": "c", "label": True, "origin": "w.json:row 3", "problem": ""},
    ]
    assert read_preference_file(write_rows(tmp_path, "w", "json", rows)) == expected
    with open(os.path.join(tmp_path, "w.json"), "w") as f:
        json.dump({"data": rows, "version": 2}, f)
    assert read_preference_file(os.path.join(tmp_path, "w.json")) == expected


def test_json_undecodable_bytes_spoil_only_their_record(tmp_path):
    data = b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "\xff", "chosen": "a", "rejected": "b"}]'
    records = read_preference_file(write_bytes(tmp_path, "u.json", data))
    assert records[0] == {**PAIR_RECORD, "origin": "u.json:row 0"}
    assert records[1] == {"origin": "u.json:row 1",
                          "problem": "invalid_utf8: 'prompt' is not valid UTF-8 at character 0"}


def test_json_file_of_json_lines_reads_as_jsonl(tmp_path):
    data = b"\n".join([json.dumps(PAIR).encode(), b"", b"oops", json.dumps(PAIR).encode()])
    records = read_preference_file(write_bytes(tmp_path, "lines.json", data))
    assert [r["origin"] for r in records] == ["lines.json:1", "lines.json:3", "lines.json:4"]
    assert [reason(r) for r in records] == ["", "unparsable", ""]
    single = read_preference_file(write_bytes(tmp_path, "one.json", json.dumps(PAIR).encode()))
    assert single == [{**PAIR_RECORD, "origin": "one.json:1"}]


@pytest.mark.parametrize(
    "data, message",
    [
        (b'"a string"', "the JSON document is a string"),
        (b"42", "the JSON document is a number"),
        (b'{\n  "rows": []\n}', "the JSON document is an object"),
        (b"[1, 2", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
    ],
)
def test_json_whole_file_errors_name_the_file(tmp_path, data, message):
    path = write_bytes(tmp_path, "bad.json", data)
    with pytest.raises(ValueError, match=message) as raised:
        read_preference_file(path)
    assert path in str(raised.value) and "expected" in str(raised.value)


def test_parquet_rows_nulls_and_mixed_kinds(tmp_path):
    rows = [
        PAIR,
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "p", "completion": "c", "label": None},
    ]
    records = read_preference_file(write_rows(tmp_path, "mixed", "parquet", rows))
    assert records == [
        {**PAIR_RECORD, "origin": "mixed.parquet:row 0"},
        {"prompt": "p", "completion": "c", "label": True, "origin": "mixed.parquet:row 1", "problem": ""},
        {"origin": "mixed.parquet:row 2", "problem": "missing_field: 'label' is null"},
    ]


def test_parquet_invalid_utf8_marks_only_its_row(tmp_path):
    raw = pa.array([b"p", b"\xff\xfe", b"q"], type=pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # a string column pyarrow never validated
    table = pa.table({"prompt": prompts, "chosen": ["a"] * 3, "rejected": ["b"] * 3})
    path = os.path.join(tmp_path, "bytes.parquet")
    pq.write_table(table, path)
    records = read_preference_file(path)
    assert [reason(r) for r in records] == ["", "invalid_utf8", ""]
    assert records[2] == {"prompt": "q", "chosen": "a", "rejected": "b", "origin": "bytes.parquet:row 2", "problem": ""}


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        read_preference_file(os.path.join(tmp_path, "nope.jsonl"))
    with pytest.raises(ValueError, match=r"prefs\.csv.*\.csv.*expected one of \.jsonl, \.json, \.parquet"):
        read_preference_file(write_bytes(tmp_path, "prefs.csv", b"prompt,chosen\n"))
    with pytest.raises(ValueError, match="no suffix"):
        read_preference_file(write_bytes(tmp_path, "prefs", b""))
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable Parquet file"):
        read_preference_file(write_bytes(tmp_path, "junk.parquet", b"not parquet at all"))
    os.mkdir(os.path.join(tmp_path, "dir.json"))
    with pytest.raises(FileNotFoundError, match=r"dir\.json"):
        read_preference_file(os.path.join(tmp_path, "dir.json"))


def test_suffix_is_case_insensitive(tmp_path):
    path = write_bytes(tmp_path, "UPPER.JSONL", json.dumps(PAIR).encode())
    assert read_preference_file(path) == [{**PAIR_RECORD, "origin": "UPPER.JSONL:1"}]
    assert FILE_SUFFIXES == (".jsonl", ".json", ".parquet")


# --- the seeded eval split ------------------------------------------------------------------------------------------


def numbered(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"{tag}{i}", "origin": f"f.jsonl:{i + 1}"} for i in range(n)]


@pytest.mark.parametrize(
    "n, fraction, num_eval",
    [(100, 0.1, 10), (100, 0.05, 5), (10, 0.25, 2), (7, 0.5, 4), (2, 0.01, 1), (3, 0.99, 2), (1, 0.5, 0), (0, 0.5, 0)],
)
def test_split_sizes(n, fraction, num_eval):
    records = numbered(n)
    train, held_out = split_records(records, fraction, seed=0)
    assert len(held_out) == num_eval and len(train) == n - num_eval
    assert sorted(train + held_out, key=records.index) == records
    assert train == [r for r in records if r in train] and held_out == [r for r in records if r in held_out]


def test_split_is_a_function_of_seed_and_order():
    records = numbered(50)
    assert split_records(records, 0.2, seed=3) == split_records(list(records), 0.2, seed=3)
    # Other contents, same length: the same positions go to eval.
    positions = [r["prompt"] for r in split_records(records, 0.2, seed=3)[1]]
    other = split_records(numbered(50, tag="x"), 0.2, seed=3)[1]
    assert [r["prompt"].removeprefix("x") for r in other] == positions
    assert split_records(records, 0.2, seed=4)[1] != split_records(records, 0.2, seed=3)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fraction_outside_open_unit_interval(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        split_records(numbered(10), fraction, seed=0)


# --- fuzzing ----------------------------------------------------------------------------------------------------------


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
        for m in value
    )


def _utf8_encodable(value) -> bool:
    texts = [value] if isinstance(value, str) else [v for m in value for v in m.values()]
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_record(record) -> None:
    """A good record is of one kind with well-typed fields; a bad one has only origin and a known problem."""
    assert isinstance(record["origin"], str) and record["origin"]
    if record["problem"]:
        assert set(record) == {"origin", "problem"}
        assert reason(record) in REASONS
        record["problem"].encode("utf-8")  # details are printable
        return
    if is_paired(record):
        assert set(record) == {"prompt", "chosen", "rejected", "origin", "problem"}
        texts = [record["prompt"], record["chosen"], record["rejected"]]
    else:
        assert set(record) == {"prompt", "completion", "label", "origin", "problem"}
        assert isinstance(record["label"], bool)
        texts = [record["prompt"], record["completion"]]
    assert all(isinstance(t, str) for t in texts) or all(_is_messages(t) for t in texts)
    assert all(_utf8_encodable(t) for t in texts)


KEYS = ("prompt", "chosen", "rejected", "completion", "label", "role", "content", "data", "x")
texts = st.text(max_size=12)  # includes lone surrogates, written as \udXXX escapes
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                           "content": st.sampled_from(["hi", "q", " a", ""]) | texts}), max_size=3)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    scalars | messages,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
    max_leaves=12,
)
# Rows shaped like records more often than not, so the normalisation paths are fuzzed, not only the rejections.
text_fields = texts | messages | st.just(None) | json_values
shared_start = st.tuples(texts | messages, texts | messages, texts | messages).map(
    lambda t: {"chosen": t[0] + t[1], "rejected": t[0] + t[2]} if type(t[0]) is type(t[1]) is type(t[2]) else {})
rows = st.one_of(
    st.fixed_dictionaries({"chosen": text_fields, "rejected": text_fields}, optional={"prompt": text_fields}),
    st.tuples(shared_start, st.dictionaries(st.sampled_from(KEYS), json_values, max_size=2)).map(
        lambda t: {**t[1], **t[0]}),
    st.fixed_dictionaries({"prompt": text_fields, "completion": text_fields, "label": st.booleans() | json_values}),
    st.dictionaries(st.sampled_from(KEYS), text_fields, max_size=5),
    json_values,
)


def _read(directory: str, name: str, data: bytes) -> list[dict]:
    records = read_preference_file(write_bytes(directory, name, data))
    for record in records:
        check_record(record)
    return records


@settings(max_examples=150, deadline=None)
@given(st.lists(rows, max_size=6))
def test_fuzz_json_values_as_jsonl_and_json(values):
    with tempfile.TemporaryDirectory() as directory:
        lines = [json.dumps(v).encode() for v in values]
        records = _read(directory, "f.jsonl", b"\n".join(lines))
        assert [r["origin"] for r in records] == [f"f.jsonl:{i}" for i in range(1, len(values) + 1)]
        records = _read(directory, "f.json", json.dumps(values).encode())
        assert [r["origin"] for r in records] == [f"f.json:row {i}" for i in range(len(values))]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=30) | rows.map(lambda v: json.dumps(v).encode()), max_size=6))
def test_fuzz_arbitrary_bytes(lines):
    data = b"\n".join(lines)
    with tempfile.TemporaryDirectory() as directory:
        records = _read(directory, "f.jsonl", data)
        non_blank = [line for line in data.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip(b" \t\r")]
        assert len(records) == len(non_blank)
        path = write_bytes(directory, "f.json", data)
        try:
            records = read_preference_file(path)
        except ValueError as error:  # the documented whole-file error, naming the file
            assert path in str(error)
        else:
            for record in records:
                check_record(record)
