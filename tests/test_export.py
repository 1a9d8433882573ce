"""Training from a Hugging Face checkpoint with its own tokenizer, then exporting the run back to one."""

import glob
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import HF_FIXTURES, make_short_config
from dpo_jax import build, checkpoint, data, export, models, run

FIXTURE = os.path.join(HF_FIXTURES, "llama")


def tensors_of(directory):
    tensors = {}
    for file in glob.glob(os.path.join(directory, "*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """SFT then DPO, a few steps each, starting from the fixture checkpoint and using its BPE tokenizer."""
    config = make_short_config()
    config.model.path = FIXTURE
    config.data.update(tokenizer="model", max_length=48, max_prompt_length=24)
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, run.train_and_evaluate(config, workdir)


def test_dpo_trains_from_a_checkpoint_with_its_tokenizer(trained_run):
    workdir, summary = trained_run
    assert summary["dpo"]["rewards/accuracies"] > 0 and np.isfinite(summary["dpo"]["loss"])
    # π_ref is the checkpoint after SFT; the DPO policy moved away from it, and both started at the checkpoint.
    assert summary["dpo_initial"]["rewards/margins"] == 0.0 and summary["samples"]["policy"]["kl"] > 0
    _, start, fixture_config = models.load_hf(FIXTURE)
    _, meta = checkpoint.read_meta(workdir, "sft", 5)
    assert models.config_from_dict(meta["model"]) == fixture_config


def test_export_loads_back_with_the_checkpoints_names_and_tokenizer(trained_run, tmp_path):
    workdir, _ = trained_run
    assert export.export_checkpoint(workdir, str(tmp_path / "dpo")) == ("dpo", 5)
    _, exported, config = models.load_hf(str(tmp_path / "dpo"))
    _, start, fixture_config = models.load_hf(FIXTURE)
    assert config == fixture_config
    trained = checkpoint.load_final_params(workdir, "dpo", models.abstract_model(config)[1])
    for a, b, s in zip(jax.tree.leaves(exported), jax.tree.leaves(trained), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(s)) for a, s in zip(jax.tree.leaves(exported), jax.tree.leaves(start)))

    original, written = tensors_of(FIXTURE), tensors_of(str(tmp_path / "dpo"))
    assert {k: (v.shape, v.dtype) for k, v in written.items()} == {k: (v.shape, v.dtype) for k, v in original.items()}
    text = "review of the film : great"
    assert data.get_tokenizer(f"hf:{tmp_path / 'dpo'}").encode(text) == data.get_tokenizer("model", FIXTURE).encode(text)


def test_export_an_earlier_step_of_another_stage(trained_run, tmp_path):
    workdir, _ = trained_run
    assert export.export_checkpoint(workdir, str(tmp_path / "sft4"), stage="sft", step=4) == ("sft", 4)
    _, exported, config = models.load_hf(str(tmp_path / "sft4"))
    sft4 = checkpoint.load_final_params(workdir, "sft", models.abstract_model(config)[1], step=4)
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(sft4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match=r"no sft checkpoint at step 3 under .*; steps: \[4, 5\]"):
        export.export_checkpoint(workdir, str(tmp_path / "sft3"), stage="sft", step=3)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    config = make_short_config()
    config.model.update(path=os.path.join(HF_FIXTURES, "gpt2"))
    config.data.tokenizer = f"hf:{tmp_path}"
    words = data.get_tokenizer("synthetic_words")
    words.save_pretrained(str(tmp_path))
    tokenizer = data.get_tokenizer(config.data.tokenizer)
    mesh = build.make_mesh(config)
    build.build_model(config, tokenizer, mesh)  # fits in the checkpoint's 320 ids
    tokenizer.tokenizer.add_tokens([f"extra{i}" for i in range(300)])
    with pytest.raises(ValueError, match=rf"has {words.vocab_size + 300} ids but the model's vocabulary has 320"):
        build.build_model(config, tokenizer, mesh)
