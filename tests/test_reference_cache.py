"""Cached reference log-probs: written once by mode=precompute_ref, equal to π_ref's forward, reused across a β or
loss sweep, and refused (naming what differs) when the data, tokenizer, lengths or π_ref are not the run's."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_short_config
from dpo_jax import dry_run, reference_cache, run
from dpo_jax.config import ConfigError, validate
from dpo_jax.errors import UserError


def dpo_config(cache=""):
    """The short config as a DPO run from the (random) initial model, with ref.cache = `cache`."""
    config = make_short_config()
    config.mode = "dpo"
    config.data.num_eval_prompts = 0  # the log-probs are what this file compares; sampling is tested elsewhere
    config.ref.cache = cache
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A precompute_ref run writing the cache, DPO with and without it, and a β = 0.5 DPO reusing it."""
    root = tmp_path_factory.mktemp("ref_cache")
    cache = str(root / "cache")
    precompute = dpo_config(cache)
    precompute.mode = "precompute_ref"
    summaries = {"precompute": run.train_and_evaluate(precompute, str(root / "precompute"))}
    written = os.path.getmtime(os.path.join(cache, reference_cache.KEY_FILE))
    summaries["cached"] = run.train_and_evaluate(dpo_config(cache), str(root / "cached"))
    summaries["uncached"] = run.train_and_evaluate(dpo_config(), str(root / "uncached"))
    sweep = dpo_config(cache)
    sweep.loss.beta = 0.5
    summaries["sweep"] = run.train_and_evaluate(sweep, str(root / "sweep"))
    return summaries, cache, written


def test_precompute_writes_every_example_once(runs):
    summaries, cache, _ = runs
    info = summaries["precompute"]["reference_cache"]
    assert set(info["key"]) == set(reference_cache.KEY_PARTS)
    for split in reference_cache.SPLITS:
        with np.load(os.path.join(cache, f"{split}.npz")) as arrays:
            assert arrays["chosen"].shape == arrays["rejected"].shape == (info["examples"][split],)
            assert np.all(arrays["chosen"] < 0) and np.all(np.isfinite(arrays["rejected"]))
    assert "dpo" not in summaries["precompute"]  # it trains nothing


def test_cached_run_equals_the_run_with_reference_forward(runs):
    summaries, _, _ = runs
    for stage in ("dpo_initial", "dpo"):
        cached, uncached = summaries["cached"][stage], summaries["uncached"][stage]
        assert cached.keys() == uncached.keys()
        for name in cached:
            np.testing.assert_allclose(cached[name], uncached[name], rtol=1e-5, atol=1e-5, err_msg=f"{stage} {name}")
    assert summaries["cached"]["dpo_initial"]["rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_a_beta_sweep_reuses_the_cache(runs):
    summaries, cache, written = runs
    assert os.path.getmtime(os.path.join(cache, reference_cache.KEY_FILE)) == written  # read, not rewritten
    assert summaries["sweep"]["dpo"]["loss"] != pytest.approx(summaries["cached"]["dpo"]["loss"])
    assert summaries["sweep"]["dpo_initial"]["loss"] == pytest.approx(np.log(2), abs=1e-5)


@pytest.mark.parametrize("change, part", [
    (lambda c: c.data.update(max_length=22), "lengths"),
    (lambda c: c.model.update(num_layers=1), "reference"),
    (lambda c: c.model.update(reference_dtype="bfloat16"), "reference"),
    (lambda c: c.data.update(num_train_pairs=48), "data"),
])
def test_a_stale_cache_is_refused_naming_the_part(runs, tmp_path, change, part):
    _, cache, _ = runs
    config = dpo_config(cache)
    change(config)
    with pytest.raises(UserError, match=f"computed for a different {part} "):
        run.train_and_evaluate(config, str(tmp_path / "run"))


def test_check_key_names_each_differing_part(tmp_path):
    key = {"data": "records a", "tokenizer": "files b", "lengths": "max_length=8", "reference": "params c"}
    reference_cache.write(str(tmp_path / "cache"), key, {"train": {"chosen": np.zeros(1), "rejected": np.zeros(1)}})
    reference_cache.check_key(str(tmp_path / "cache"), key)
    with pytest.raises(reference_cache.StaleReferenceCache, match="different tokenizer and lengths .*files z"):
        reference_cache.check_key(str(tmp_path / "cache"), {**key, "tokenizer": "files z", "lengths": "max_length=9"})


def test_params_fingerprint_sees_one_changed_bit_and_not_the_copy():
    params = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "b": {"c": jnp.ones(5, jnp.bfloat16)}}
    fingerprint = reference_cache.params_fingerprint(params)
    assert reference_cache.params_fingerprint(jax.tree.map(jnp.copy, params)) == fingerprint
    nudged = {**params, "a": params["a"].at[2, 3].set(np.nextafter(np.float32(11), np.float32(12)))}
    assert reference_cache.params_fingerprint(nudged) != fingerprint
    swapped = {**params, "a": params["a"][::-1]}  # same values, other places
    assert reference_cache.params_fingerprint(swapped) != fingerprint


def test_sft_then_dpo_builds_the_absent_cache_and_samples_against_the_reloaded_reference(tmp_path):
    """After SFT the absent cache is computed from the SFT params; π_ref, dropped for training, is read back from the
    SFT checkpoint for the samples: the samples and their KL equal the uncached run's."""
    summaries = {}
    for name, cache in (("cached", str(tmp_path / "cache")), ("uncached", "")):
        config = make_short_config()
        config.ref.cache = cache
        summaries[name] = run.train_and_evaluate(config, str(tmp_path / name))
    assert reference_cache.exists(str(tmp_path / "cache"))
    cached, uncached = summaries["cached"], summaries["uncached"]
    for name in ("loss", "rewards/margins"):
        assert cached["dpo"][name] == pytest.approx(uncached["dpo"][name], abs=1e-5)
    for who in ("reference", "policy"):
        assert cached["samples"][who]["kl"] == pytest.approx(uncached["samples"][who]["kl"], abs=1e-5)
    for step in (0, cached["config"]["dpo"]["num_steps"]):  # π_ref's samples, and the final policy's
        files = [tmp_path / name / "samples" / "dpo" / f"step_{step}.jsonl" for name in ("cached", "uncached")]
        texts = [[json.loads(line)["completion"] for line in open(path)] for path in files]
        assert texts[0] == texts[1] and len(texts[0]) > 0


def test_the_dry_run_with_a_cache_holds_no_reference(tmp_path):
    config = dpo_config(str(tmp_path / "cache"))
    text = dry_run.report(config)
    reference_line = next(line for line in text.splitlines() if "reference params" in line)
    assert "ref.cache: none" in reference_line and reference_line.split()[-2] == "0.00"
    assert "compiled step temporaries" in text  # the step compiles with the cached log-probs in its batch


def test_config_rules_for_the_cache():
    config = dpo_config()
    config.mode = "precompute_ref"
    with pytest.raises(ConfigError, match="config.ref.cache = '' is invalid"):
        validate(config)
    config = dpo_config("/tmp/cache")
    config.loss.name = "kto"
    with pytest.raises(ConfigError, match="trains on unpaired completions, whose π_ref log-probs no cache holds"):
        validate(config)
