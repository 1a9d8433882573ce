"""The paper's configs run end to end at CPU scale (`:tiny`: fixture checkpoints, dummy raw data prepared through
the TFDS builders), and a user's own preference file trains, its bad records skipped and reported."""

import importlib
import json
import os

import pytest

from conftest import make_short_config
from dpo_jax import run
from dpo_jax.errors import UserError

PAPER_SETTINGS = {  # what each config must keep of the paper (App. B), checked on the full-scale config
    "tldr": dict(mode="dpo", source="tldr", beta=0.5, model="CarperAI/openai_summarize_tldr_sft"),
    "hh": dict(mode="sft_then_dpo", source="hh", beta=0.1, model="EleutherAI/pythia-2.8b"),
    "imdb": dict(mode="sft", source="imdb", beta=0.1, model="gpt2-large"),
}


@pytest.mark.parametrize("name", sorted(PAPER_SETTINGS))
def test_paper_config_keeps_the_papers_settings_and_its_tiny_variant_runs(name, tmp_path):
    module = importlib.import_module(f"configs.{name}")
    full, expected = module.get_config(), PAPER_SETTINGS[name]
    assert (full.mode, full.data.source, full.loss.beta, full.model.path) == (
        expected["mode"], expected["source"], expected["beta"], expected["model"])
    assert (full.train.batch_size, full.optimizer.name, full.optimizer.max_grad_norm) == (64, "rmsprop", 10.0)
    assert full.data.tokenizer == "model" and full.data.num_train_pairs == 0

    config = module.get_config("tiny")
    config.data.tfds_data_dir = str(tmp_path / "tfds")
    config.train.progress_bar = False
    summary = run.train_and_evaluate(config, str(tmp_path / "run"))
    stages = {"sft": ("sft",), "dpo": ("dpo",), "sft_then_dpo": ("sft", "dpo")}[config.mode]
    assert all(summary[stage]["loss"] == summary[stage]["loss"] for stage in stages)  # finite eval metrics
    with open(tmp_path / "run" / "data_report.json") as f:
        report = json.load(f)
    assert report["train"]["examples"] >= 2 and report["train"]["records"] >= report["train"]["examples"]
    with pytest.raises(ValueError, match=f"configs/{name}.py: unknown argument 'big'"):
        module.get_config("big")


DIRTY_LINES = [
    b'{"prompt": "review of the film :", "chosen": " great loved", "rejected": " awful dull"}',
    b'{"prompt": "review of the book :", "chosen": " wonderful", "rejected": " boring"}',
    b'{"prompt": "review of the cafe :", "chosen": " amazing", "rejected": " terrible"}',
    b'{"prompt": "review of the show :", "chosen": " excellent", "rejected": " hated"}',
    b'{"prompt": "bad bytes \xff\xfe", "chosen": " great", "rejected": " dull"}',
    b'{"prompt": "review of the game :", "chosen": ""                , "rejected": " dull"}',
    b'{"prompt": "review of the album :", "chosen": " great", "rejected": " great"}',
    b'{"prompt": "review of the hotel :", "chosen": 7, "rejected": " dull"}',
    b'{"prompt": "review of the film :"}',
    b'not json at all',
    b'{"chosen": "Human: hi Assistant: great", "rejected": "Human: hi Assistant: awful"}',
]


def test_a_dirty_preference_file_trains_and_reports_every_skipped_record(tmp_path, caplog):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\n".join(DIRTY_LINES) + b"\n")
    config = make_short_config()
    config.mode = "sft"
    config.data.update(source="file", path=str(path), eval_fraction=0.2, num_train_pairs=0, num_eval_pairs=0,
                       num_eval_prompts=0)
    config.train.update(batch_size=2, eval_batch_size=1)
    run.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "data_report.json") as f:
        report = json.load(f)
    skipped = {**report["train"]["skipped"]}
    for reason, count in report["eval"]["skipped"].items():
        skipped[reason] = skipped.get(reason, 0) + count
    assert skipped == {"empty_completion": 1, "identical_completions": 1, "invalid_utf8": 1, "missing_field": 1,
                       "not_a_string": 1, "unparsable": 1}
    assert report["train"]["examples"] + report["eval"]["examples"] == 5  # 4 explicit pairs + 1 split by prefix
    origins = [o for r in (report["train"], report["eval"]) for found in r["skipped_examples"].values() for o in found]
    assert any(o.startswith("prefs.jsonl:5: ") for o in origins) and any(o.startswith("prefs.jsonl:10: ") for o in origins)
    config.data.strict = True
    with pytest.raises(UserError, match=r"^data: file/(train|eval): prefs\.jsonl:\d+: \w+: .*\(data\.strict = True\)$"):
        run.train_and_evaluate(config, str(tmp_path / "strict"))
    assert os.path.exists(tmp_path / "run" / "summary.json")


def test_the_own_file_config_needs_a_checkpoint_and_a_file_and_keeps_the_paper_defaults(tmp_path):
    from configs import file as file_config
    from dpo_jax.config import ConfigError, validate

    config = file_config.get_config()
    assert (config.mode, config.data.source, config.loss.beta, config.data.max_length) == ("dpo", "file", 0.1, 512)
    with pytest.raises(ConfigError, match="config.data.tokenizer = 'model' is invalid: .* needs config.model.path"):
        validate(config)
    config.model.path = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "qwen2")
    with pytest.raises(ConfigError, match="config.data.path = '' is invalid: expected a preference file"):
        validate(config)
    config.data.path = str(tmp_path / "prefs.jsonl")
    (tmp_path / "prefs.jsonl").write_text(DIRTY_LINES[0].decode() + "\n")
    validate(config)
