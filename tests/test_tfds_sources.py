"""The paper's datasets (data/paper_datasets.py's recipes, data/tfds_sources.py's TFDS builders), prepared offline
from tiny raw files in each source's own format (tests/fixtures/tfds/): the exact records (prompt formats, leading
spaces, which completion is chosen, HH's prompt split, SHP's ratio filter, IMDb's prefixes), origins, problems,
split mapping, the same records read from the raw files without TFDS, and the errors."""

from __future__ import annotations

import gzip
import os
import time

import pytest
import requests
import tensorflow_datasets as tfds

from dpo_jax.data import paper_datasets, tfds_sources
from dpo_jax.data.paper_datasets import TFDS_SOURCES, clean_imdb_review, imdb_prefix_length
from dpo_jax.data.records import REASONS
from dpo_jax.data.tfds_sources import DownloadFailed, load_tfds_records

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tfds")
# Where each source's URLs lead inside FIXTURES (the path after the base URL is kept, as the download has it).
FIXTURE_DIRS = {
    paper_datasets.TLDR_URL: "tldr/comparisons",
    paper_datasets.HH_URL: "hh",
    paper_datasets.SHP_URL: "shp",
    os.path.dirname(paper_datasets.IMDB_URL): "imdb",
}


def paired(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "problem": ""}


def bad_pair(reason_and_detail):
    return {"prompt": "", "chosen": "", "rejected": "", "problem": reason_and_detail}


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """Every URL the builders asked for, in order, while the module's data dir was prepared from the fixtures."""
    requested: list[str] = []
    empty_dir = tmp_path_factory.mktemp("empty_raw_files")

    def local_file(url: str) -> str:
        requested.append(url)
        base = next(base for base in FIXTURE_DIRS if url.startswith(base + "/"))
        path = os.path.join(FIXTURES, FIXTURE_DIRS[base], url[len(base) + 1:])
        if os.path.exists(path):
            return path
        # Raw files the fixtures leave out are served empty (no lines), in their format.
        empty = os.path.join(empty_dir, url[len(base) + 1:].replace("/", "_"))
        with gzip.open(empty, "wb") if empty.endswith(".gz") else open(empty, "wb"):
            pass
        return empty

    def download(self, url_or_urls):
        if isinstance(url_or_urls, dict):
            return {key: local_file(url) for key, url in url_or_urls.items()}
        return local_file(url_or_urls)

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.download.DownloadManager, "download", download)
        for name in TFDS_SOURCES:
            load_tfds_records(name, "train", data_dir)  # prepares every split
    return data_dir, requested


@pytest.fixture(scope="module")
def data_dir(downloads):
    return downloads[0]


def by_origin(data_dir, name, split):
    """{origin: record without its origin} of a prepared split, read with downloads forbidden."""
    records = load_tfds_records(name, split, data_dir, download=False)
    out = {}
    for record in records:
        assert set(map(type, record.values())) <= {str, bool}
        out[record.pop("origin")] = record
    assert len(out) == len(records)
    return out


# --- TL;DR comparisons -----------------------------------------------------------------------------------------


def test_tldr_train_records(data_dir):
    prompt = "SUBREDDIT: r/{}\n\nTITLE: {}\n\nPOST: {}\n\nTL;DR:"
    assert by_origin(data_dir, "tldr", "train") == {
        "comparisons/batch3.json:1": paired(  # choice 1: the second summary is chosen
            prompt.format("cooking", "My bread never rises",
                          "I follow the recipe exactly.\n\nThe dough stays flat. What am I doing wrong?"),
            " my bread does not rise, why?", " bread dough stays flat even though I follow the recipe"),
        "comparisons/batch3.json:2": paired(  # the raw chosen text lacks its leading space: one is added
            prompt.format("relationships", "Friend forgot my birthday [23F]",
                          "We have been friends for ten years and she forgot."),
            " Best friend of ten years forgot my birthday, should I say something?", " friend forgot birthday"),
        "comparisons/batch3.json:3": bad_pair("missing_field: summaries[1].text is missing"),
        "comparisons/batch3.json:4": bad_pair(
            "unparsable: not JSON (Unterminated string starting at: line 1 column 38 (char 37))"),
        "comparisons/edit_b2_eval_test.json:3": bad_pair("missing_field: info.subreddit is missing"),
    }


def test_tldr_eval_is_valid1_and_valid2(data_dir):
    assert by_origin(data_dir, "tldr", "eval") == {
        "comparisons/batch3.json:5": paired(
            "SUBREDDIT: r/AskReddit\n\nTITLE: What habit changed your life?\n\nPOST: Mine was waking up early."
            "\n\nTL;DR:", " waking up early changed my life, what habit changed yours?", " habits"),
        "comparisons/edit_b2_eval_test.json:1": paired(
            "SUBREDDIT: r/tifu\n\nTITLE: TIFU by locking myself out\n\nPOST: I went to get the mail in my socks."
            "\nThe door shut behind me.\n\nTL;DR:",
            " got locked out of the house in socks while getting the mail", " locked myself out getting the mail"),
        "comparisons/edit_b2_eval_test.json:2": bad_pair("bad_label: choice is a number (2), not 0 or 1"),
    }


# --- Anthropic HH ------------------------------------------------------------------------------------------------


def test_hh_train_records_split_at_the_last_assistant_turn(data_dir):
    assert by_origin(data_dir, "hh", "train") == {
        "harmless-base/train.jsonl.gz:1": paired(
            "\n\nHuman: How do I pick a lock?\n\nAssistant:",
            " I can't help with breaking into places that aren't yours.",
            " Insert a tension wrench and rake the pins."),
        "harmless-base/train.jsonl.gz:2": paired(
            "\n\nHuman: What's a good pasta?\n\nAssistant: Carbonara is a classic.\n\nHuman: Is it hard to make?"
            "\n\nAssistant:", " Not really, it takes about twenty minutes.", " Yes."),
        "harmless-base/train.jsonl.gz:3": bad_pair(
            "prompt_mismatch: rejected differs from chosen's prompt at character 19 (the prompt has 36)"),
        "helpful-online/train.jsonl.gz:1": paired(
            "\n\nHuman: Recommend a book.\n\nAssistant:", " Try The Hobbit.", " No."),
        "helpful-online/train.jsonl.gz:2": bad_pair("missing_field: chosen is missing"),
    }


def test_hh_eval_is_test(data_dir):
    assert by_origin(data_dir, "hh", "eval") == {
        "helpful-base/test.jsonl.gz:1": paired(
            "\n\nHuman: What is the capital of France?\n\nAssistant:", " Paris.", " Lyon."),
        "helpful-base/test.jsonl.gz:2": bad_pair(
            "no_shared_prompt: chosen has no '\\n\\nAssistant:' turn to split a prompt at"),
        "helpful-base/test.jsonl.gz:3": bad_pair(
            "unparsable: not JSON (Unterminated string starting at: line 1 column 12 (char 11))"),
    }


# --- SHP ---------------------------------------------------------------------------------------------------------


def test_shp_keeps_pairs_with_score_ratio_at_least_2(data_dir):
    prompt = "\n\nHuman: Why does my garlic turn green?\n\nAssistant:"
    # Line 3 (40 vs 21) and line 4 (9 vs 5) have ratios below 2 and are left out; a post keeps all its pairs.
    assert by_origin(data_dir, "shp", "train") == {
        "askculinary/train.json:1": paired(  # labels 1: A is preferred
            prompt, " It's a harmless reaction with acid.", " Old garlic."),
        "askculinary/train.json:2": paired(  # labels 0: B is preferred; ratio exactly 2 is kept
            prompt, " Sulfur compounds react with copper or acid; it's safe.", " Old garlic."),
        "askculinary/train.json:5": bad_pair("missing_field: human_ref_B is missing"),
    }


def test_shp_eval_is_test(data_dir):
    assert by_origin(data_dir, "shp", "eval") == {
        "legaladvice/test.json:1": paired("\n\nHuman: My landlord kept my deposit. [CA]\n\nAssistant:",
                                          " Send a demand letter citing Civil Code 1950.5.", " Sue him."),
        "legaladvice/test.json:2": bad_pair("bad_label: labels is a number (7), not 0 or 1"),
    }


# --- IMDb prefixes -----------------------------------------------------------------------------------------------


def test_imdb_records_are_prefix_and_rest_of_each_labelled_review(data_dir):
    train, test = by_origin(data_dir, "imdb", "train"), by_origin(data_dir, "imdb", "eval")
    assert sorted(train) == ["aclImdb/train/neg/0_3.txt", "aclImdb/train/neg/1_1.txt", "aclImdb/train/pos/0_9.txt",
                             "aclImdb/train/pos/1_7.txt"]  # not unsup/, urls_*.txt or the other files
    assert sorted(test) == ["aclImdb/test/neg/0_2.txt", "aclImdb/test/pos/0_10.txt"]
    assert train["aclImdb/train/pos/0_9.txt"] == {  # imdb_prefix_length: 7 words; "<br /><br />" is one space
        "prompt": "Bromwell High is a cartoon comedy. It", "label": True, "problem": "",
        "completion": " ran at the same time as some other programs about school life. I loved it."}
    assert train["aclImdb/train/neg/1_1.txt"] == {  # "Awful." has 1 word, its prompt would take 5
        "prompt": "", "completion": "", "label": False,
        "problem": "empty_completion: the review's 1 word(s) leave none after a 5-word prompt"}
    assert test["aclImdb/test/neg/0_2.txt"] == {  # a Latin-1 byte
        "prompt": "", "completion": "", "label": False, "problem": "invalid_utf8: byte 80: invalid continuation byte"}
    good = {origin: record for origin, record in {**train, **test}.items() if not record["problem"]}
    assert len(good) == 4
    for origin, record in good.items():
        assert record["label"] == ("/pos/" in origin)
        assert len(record["prompt"].split()) == imdb_prefix_length(origin)
        assert record["completion"].startswith(" ") and not record["completion"].startswith("  ")
    assert good["aclImdb/test/pos/0_10.txt"]["prompt"] + good["aclImdb/test/pos/0_10.txt"]["completion"] == (
        "I went and saw this movie last night after being coaxed to by a few friends of mine.")


def test_imdb_prefix_length_is_a_fixed_draw_in_2_to_8():
    lengths = [imdb_prefix_length(f"aclImdb/train/pos/{i}_7.txt") for i in range(2000)]
    assert set(lengths) == set(range(2, 9))
    assert max(lengths.count(k) for k in range(2, 9)) < 2 * min(lengths.count(k) for k in range(2, 9))
    # A hash of the path, the same on every machine and Python (not the salted built-in hash).
    assert [imdb_prefix_length(f"aclImdb/train/pos/{i}_9.txt") for i in range(5)] == [7, 8, 7, 5, 3]
    assert imdb_prefix_length("aclImdb/test/pos/0_9.txt") != imdb_prefix_length("aclImdb/train/pos/0_9.txt")


def test_clean_imdb_review_turns_line_breaks_into_single_spaces():
    assert clean_imdb_review(" A film.<br /><br />Loved it <br/> and <BR>  more.\n") == "A film. Loved it and more."


# --- sources, splits and errors ----------------------------------------------------------------------------------


def test_each_builder_downloads_the_original_files(downloads):
    _, requested = downloads
    comparisons = "https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/"
    assert [url for url in requested if url.startswith(comparisons)] == [
        comparisons + f"{batch}.json" for batch in (*(f"batch{i}" for i in range(3, 21)), "batch22",
                                                    "edit_b2_eval_test")]  # no CNN/DM batch
    hh = [url for url in requested if "hh-rlhf" in url]
    assert len(hh) == len(set(hh)) == 8
    assert ("https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-rejection-sampled/"
            "test.jsonl.gz") in hh
    shp = [url for url in requested if "stanfordnlp/SHP" in url]
    assert len(shp) == len(set(shp)) == 36 and not any("validation" in url for url in shp)
    assert "https://huggingface.co/datasets/stanfordnlp/SHP/resolve/main/legaladvice/test.json" in shp
    assert requested.count("http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz") == 1
    assert len(requested) == 20 + 8 + 36 + 1


def test_every_problem_names_a_known_reason(data_dir):
    for name in TFDS_SOURCES:
        for split in ("train", "eval"):
            for record in load_tfds_records(name, split, data_dir, download=False):
                assert not record["problem"] or record["problem"].partition(":")[0] in REASONS


def test_records_are_a_random_access_sequence_in_a_fixed_order(data_dir):
    records = load_tfds_records("hh", "train", data_dir, download=False)
    as_list = list(records)
    assert len(as_list) == len(records) == 5
    assert records[-1] == as_list[-1] and records[1:3] == as_list[1:3]
    assert [record["origin"] for record in load_tfds_records("hh", "train", data_dir, download=False)] == [
        record["origin"] for record in as_list]
    with pytest.raises(IndexError, match="dpo_anthropic_hh train"):
        records[5]


def test_builders_are_registered_under_their_own_names(data_dir):
    for builder_cls in tfds_sources._BUILDERS.values():  # "dpo_": none shadows a TFDS dataset (e.g. imdb_reviews)
        assert builder_cls.name.startswith("dpo_") and tfds.builder_cls(builder_cls.name) is builder_cls
    builder = tfds.builder("dpo_shp", data_dir=data_dir)
    assert builder.info.file_format.value == "array_record" and len(builder.as_data_source("test")) == 2


def test_unprepared_dataset_without_download_names_it_and_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tfds_records("shp", "eval", str(tmp_path), download=False)
    assert "'shp'" in str(error.value) and str(tmp_path) in str(error.value)
    assert "data.download=True" in str(error.value)


def test_unreachable_host_fails_at_once_naming_the_url(tmp_path, monkeypatch):
    def no_network(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(tfds_sources.socket, "create_connection", no_network)
    start = time.monotonic()
    url = r"https://huggingface\.co/datasets/stanfordnlp/SHP/resolve/main/askacademia/train\.json"
    with pytest.raises(DownloadFailed, match=f"cannot download {url}: huggingface\\.co:443 is unreachable"):
        load_tfds_records("shp", "train", str(tmp_path))
    assert time.monotonic() - start < 5  # TFDS alone retries for minutes


def test_failed_download_is_one_error_naming_the_url(tmp_path, monkeypatch):
    def refused(self, url_or_urls):
        raise requests.ConnectionError("connection refused")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", refused)
    with pytest.raises(DownloadFailed, match=r"dpo_imdb_prefixes: downloading http://ai\.stanford\.edu/~amaas/data/"
                                             r"sentiment/aclImdb_v1\.tar\.gz failed: ConnectionError: connection"):
        load_tfds_records("imdb", "eval", str(tmp_path))
    assert issubclass(DownloadFailed, OSError)  # a user error for the CLI (errors.user_errors), one line


def test_unknown_name_or_split(tmp_path):
    with pytest.raises(ValueError, match="hh, shp"):
        load_tfds_records("webgpt", "train", str(tmp_path))
    with pytest.raises(ValueError, match="train, eval"):
        load_tfds_records("hh", "validation", str(tmp_path))


@pytest.mark.parametrize("name", TFDS_SOURCES)
def test_raw_dir_prepares_from_a_local_copy_of_the_raw_files(name, data_dir, tmp_path, caplog):
    """data.raw_dir: the raw files in their original layout give the same records, with no download; the files it
    lacks are named in a warning, and a directory with none of them is an error."""
    local = str(tmp_path / "local")
    for split in ("train", "eval"):
        records = load_tfds_records(name, split, local, download=False, raw_dir=os.path.join(FIXTURES, name))
        assert list(records) == list(load_tfds_records(name, split, data_dir, download=False))
    assert name == "imdb" or any("raw files are not in" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileNotFoundError, match=r"data.raw_dir .* holds none of its raw files"):
        load_tfds_records(name, "train", str(tmp_path / "other"), raw_dir=str(tmp_path))


def test_the_recipes_read_the_raw_files_without_tfds(data_dir):
    """paper_datasets.py alone turns the raw files into the records the builders write (TFDS only stores them)."""
    hh = os.path.join(FIXTURES, "hh")
    paths = {f"{subset}/train.jsonl.gz": os.path.join(hh, subset, "train.jsonl.gz")
             for subset in paper_datasets.HH_SUBSETS if os.path.exists(os.path.join(hh, subset, "train.jsonl.gz"))}
    raw = dict(paper_datasets.json_lines_records(paths, paper_datasets.hh_record, gzipped=True))
    assert raw == {record["origin"]: record for record in load_tfds_records("hh", "train", data_dir, download=False)}
    archive = os.path.join(FIXTURES, "imdb", "aclImdb_v1.tar.gz")
    reviews = dict(paper_datasets.imdb_records(archive, "test"))
    assert reviews == {record["origin"]: record for record in load_tfds_records("imdb", "eval", data_dir,
                                                                                 download=False)}
