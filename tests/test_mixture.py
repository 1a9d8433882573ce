"""Weighted mixtures (data.source = "mixture"): each source scanned and reported on its own, training batches drawn
by weight in a seeded order that a checkpoint's iterator state resumes, held-out examples of every source."""

import json

import jax
import numpy as np
import pytest

from conftest import make_short_config
from dpo_jax import build, data
from dpo_jax import config as config_lib

WORDS = data.WORDS


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixture")
    # Source a: prompts of word 0, b: of word 1 (one bad record in b), so an example's source shows in its tokens.
    a = write(directory / "a.jsonl", [{"prompt": f"{WORDS[0]} {WORDS[2 + i % 5]}", "chosen": WORDS[10],
                                       "rejected": WORDS[11]} for i in range(40)])
    b = write(directory / "b.jsonl", [{"prompt": f"{WORDS[1]} {WORDS[2 + i % 5]}", "chosen": WORDS[10],
                                       "rejected": WORDS[11]} for i in range(20)] + [{"prompt": "x"}])
    return a, b


def mixture_config(files, weights=(3.0, 1.0), seed=0):
    config = make_short_config()
    config.seed = seed
    config.data.update(source="mixture", mixture=tuple((f"file:{f}", w) for f, w in zip(files, weights)),
                       num_train_pairs=0, num_eval_pairs=0, eval_fraction=0.1)
    config.train.update(batch_size=8, eval_batch_size=4)
    return config


def source_of(batch, tokenizer):
    """Per row of a shared-prompt batch: 'a' or 'b', by the prompt's first word."""
    first = np.asarray(batch.rows.tokens_BxT)[:, 0]
    return ["a" if t == tokenizer.encode(WORDS[0])[0] else "b" for t in first]


def test_report_counts_and_skips_per_source(files):
    config = mixture_config(files)
    config_lib.validate(config)
    run_data = build.build_data(config, data.get_tokenizer(config.data.tokenizer, ""))
    report = run_data.train.report
    a, b = (f"file:{f}" for f in files)
    assert report["sources"][a]["examples"] == 36 and report["sources"][a]["weight"] == 3.0
    assert report["sources"][b]["records"] == 19  # the split is seeded: 21 -> 19 + 2
    assert report["skipped"] == report["sources"][b]["skipped"] and report["sources"][a]["skipped"] == {}
    assert report["examples"] == sum(s["examples"] for s in report["sources"].values())
    assert sum(s["skipped"].get("missing_field", 0) for s in (run_data.train.report, run_data.eval.report)) == 1
    assert run_data.train.mixture == ((a, 3.0, 36), (b, 1.0, report["sources"][b]["examples"]))
    assert len(run_data.eval) == run_data.eval.report["examples"] == 4 + 2 - run_data.eval.report["skipped"].get(
        "missing_field", 0)


def test_batches_follow_the_weights_and_resume(files):
    config = mixture_config(files)
    tokenizer = data.get_tokenizer(config.data.tokenizer, "")
    run_data = build.build_data(config, tokenizer)
    batches = build.train_batches(config, "dpo", run_data, "dpo")
    drawn = [s for step in range(20) for s in source_of(batches.batch_at(step), tokenizer)]
    assert drawn.count("a") == 3 * drawn.count("b")  # 160 rows: 120 of a, 40 of b
    iterator = batches.iterator()
    for _ in range(5):
        next(iterator)
    resumed = batches.iterator(iterator.get_state())
    for _ in range(3):
        x, y = next(resumed), next(iterator)
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    other = build.train_batches(mixture_config(files, seed=1), "dpo", run_data, "dpo")
    assert not np.array_equal(batches.batch_at(0).rows.tokens_BxT, other.batch_at(0).rows.tokens_BxT)
    even = build.train_batches(mixture_config(files, (1.0, 1.0)), "dpo",
                               build.build_data(mixture_config(files, (1.0, 1.0)), tokenizer), "dpo")
    drawn = [s for step in range(10) for s in source_of(even.batch_at(step), tokenizer)]
    assert drawn.count("a") == drawn.count("b")


def test_mixture_settings_are_checked(files):
    for mixture, message in (((), r"config.data.mixture = \(\) is invalid: expected \(\(source spec, weight\), "
                                  r"...\) exactly when data.source = 'mixture'"),
                             ((("tldr", 0.0),), r"weight > 0"),
                             ((("tldr", 1.0), ("tldr", 2.0)), r"appears twice"),
                             ((("file:/no/such.jsonl", 1.0),), r"'file:/no/such.jsonl': no such file"),
                             ((("imbd", 1.0),), r"unknown data source 'imbd'")):
        config = mixture_config(files)
        config.data.mixture = mixture
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate(config)
