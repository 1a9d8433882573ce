"""Hub datasets by name (data.source = "hf:ORG/NAME"), read offline from a cache in the Hub's layout
(tests/fixtures/make_hub_dataset.py): the card's splits, a config's directory, gzipped JSON lines, column renames,
the same records and bad-record accounting as the file source, and clear errors."""

import os
import sys

import jax
import numpy as np
import pytest

from conftest import HF_FIXTURES, make_short_config
from dpo_jax import build, data
from dpo_jax import config as config_lib
from dpo_jax.data import hub

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
from make_hub_dataset import make_hub_cache  # noqa: E402

UF = "hf:acme/ultrafeedback_tiny"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_hub_cache(str(tmp_path_factory.mktemp("hub_cache")))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_card_splits_and_chat_records(cache):
    train = data.load_split(UF, "train", hf_split="train_prefs", hf_eval_split="test_prefs", hf_cache_dir=cache)
    held_out = data.load_split(UF, "eval", hf_split="train_prefs", hf_eval_split="test_prefs", hf_cache_dir=cache)
    assert len(train) == 12 and len(held_out) == 4
    # A string prompt beside conversations that repeat it: the shared turns are the prompt (TRL's rule).
    assert train[0] == {"prompt": [{"role": "user", "content": "train question 0"}],
                        "chosen": [{"role": "assistant", "content": "good answer 0"}],
                        "rejected": [{"role": "assistant", "content": "bad answer 0"}],
                        "origin": "acme/ultrafeedback_tiny/data/train_prefs-00000-of-00001.parquet:row 0",
                        "problem": ""}
    assert train[5]["problem"].startswith("missing_field: 'rejected' is null")
    assert held_out[3]["prompt"][0]["content"] == "test question 3"


def test_config_directory_gzipped_lines_and_seeded_eval_share(cache):
    train = data.load_split("hf:acme/hh_tiny?config=helpful-base&split=train", "train", hf_cache_dir=cache,
                            eval_fraction=0.2, seed=3)
    held_out = data.load_split("hf:acme/hh_tiny?config=helpful-base", "eval", hf_cache_dir=cache,
                               eval_fraction=0.2, seed=3)
    assert len(train) == 8 and len(held_out) == 2  # 10 rows of helpful-base/train, none of harmless-base
    assert {r["origin"] for r in train + held_out} == {f"acme/hh_tiny/helpful-base/train.jsonl.gz:{i}"
                                                      for i in range(1, 11)}
    assert train[0]["prompt"].endswith("\n\nAssistant:") and train[0]["chosen"].startswith(" kind reply")
    test = data.load_split("hf:acme/hh_tiny?config=helpful-base&eval_split=test", "eval", hf_cache_dir=cache)
    assert len(test) == 3 and "test ask 0" in test[0]["prompt"]


def test_columns_rename_and_records_cap(cache):
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k", "label": ""}
    records = data.load_split("hf:acme/columns_tiny", "train", hf_cache_dir=cache, columns=columns, num_records=3,
                              hf_eval_split="train")
    assert [r["chosen"] for r in records] == ["yes 0", "yes 1", "yes 2"] and records[0]["prompt"] == "q 0"
    unrenamed = data.load_split("hf:acme/columns_tiny", "train", hf_cache_dir=cache, hf_eval_split="train")
    assert unrenamed[0]["problem"].startswith("missing_field: needs chosen and rejected")


def test_errors_name_the_dataset_and_what_is_there(cache, tmp_path):
    with pytest.raises(ValueError, match=r"hf:acme/absent: could not get the dataset \(HF_HUB_OFFLINE=1: only the "
                                         "local cache is read"):
        data.load_split("hf:acme/absent", "train", hf_cache_dir=cache)
    with pytest.raises(ValueError, match=r"no split 'train'; it has: train_prefs, test_prefs"):
        data.load_split(UF, "train", hf_cache_dir=cache)
    with pytest.raises(ValueError, match=r"no config 'nope'; its card lists: default"):
        data.load_split(UF + "?config=nope", "train", hf_cache_dir=cache)
    with pytest.raises(ValueError, match=r"unknown or repeated setting 'splt'"):
        hub.parse_spec(UF + "?splt=x")
    with pytest.raises(ValueError, match=r"expected 'hf:ORG/NAME'"):
        hub.parse_spec("hf:a/b/c")


def same_batch(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def hub_config(cache, **data_settings):
    config = make_short_config()
    config.data.update(source=UF, hf_split="train_prefs", hf_eval_split="test_prefs", hf_cache_dir=cache,
                       num_train_pairs=0, num_eval_pairs=0, num_eval_prompts=2, max_length=96,
                       max_prompt_length=64, length_buckets=(),
                       tokenizer="hf:" + os.path.join(HF_FIXTURES, "qwen2"), **data_settings)  # a chat template
    config.train.update(batch_size=4, eval_batch_size=4)
    return config


def test_same_pipeline_report_strict_mode_and_resumable_order(cache):
    config = hub_config(cache)
    config_lib.validate(config)
    tokenizer = data.get_tokenizer(config.data.tokenizer, "")
    run_data = build.build_data(config, tokenizer)
    assert run_data.train.report["records"] == 12 and run_data.train.report["examples"] == 11
    assert run_data.train.report["truncated"] == 0
    assert run_data.train.report["skipped"] == {"missing_field": 1}
    assert run_data.train.report["skipped_examples"]["missing_field"][0].startswith(
        "acme/ultrafeedback_tiny/data/train_prefs-00000-of-00001.parquet:row 5")
    batches = build.train_batches(config, "dpo", run_data, "dpo")
    iterator = batches.iterator()
    for _ in range(3):
        next(iterator)
    resumed = batches.iterator(iterator.get_state())
    assert same_batch(next(resumed), next(iterator))
    config.data.strict = True
    with pytest.raises(ValueError, match=r"train_prefs-00000-of-00001.parquet:row 5: missing_field.*data.strict"):
        build.build_data(config, tokenizer)


def test_config_validation_of_hub_keys(cache):
    for key, value, message in (("source", "hf:acme/a/b", r"config.data.source = 'hf:acme/a/b' is invalid"),
                                ("source", "hff:x", r"config.data.source = 'hff:x' is invalid: expected one of"),
                                ("hf_split", "", r"config.data.hf_split = '' is invalid: expected a split name")):
        config = hub_config(cache)
        config.data[key] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(config)
