"""Every config key is validated up front, with a message that names the key and what is allowed."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import demo
from dpo_jax import run
from dpo_jax.config import ConfigError, base_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_are_valid():
    validate(base_config())
    validate(demo.get_config())
    validate(demo.get_config("smoke"))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("mode", "rlhf", r"config\.mode = 'rlhf'.*one of sft, dpo, sft_then_dpo"),
        ("loss.name", "dpoo", r"config\.loss\.name = 'dpoo'.*unknown loss 'dpoo'; valid losses: .*dpo.*ipo.*unweighted"),
        ("loss.beta", -0.1, r"config\.loss\.beta = -0\.1 is invalid: expected a finite number > 0"),
        ("loss.beta", float("inf"), r"config\.loss\.beta = inf is invalid: expected a finite number > 0"),
        ("dpo.learning_rate", float("inf"), r"config\.dpo\.learning_rate = inf is invalid: expected a finite number > 0"),
        ("loss.alpha", float("nan"), r"config\.loss\.alpha = nan is invalid: expected a finite number$"),
        ("dpo.reference_workdir", "/tmp/sft", r"config\.dpo\.reference_workdir = '/tmp/sft' is invalid: expected '' "
                                              r"unless config\.mode = 'dpo' or 'precompute_ref' \(it is 'sft_then_dpo'"),
        ("train.pack", "rows", r"config\.train\.pack = 'rows' is invalid: expected one of none, shared_prompt"),
        ("train.logprobs", "all_positions", r"config\.train\.logprobs = 'all_positions' is invalid: expected "
                                            r"'completion_only' with train\.pack = 'shared_prompt'"),
        ("data.length_buckets", (100,), r"config\.data\.length_buckets = \(100,\) is invalid: expected a tuple of row "
                                       r"lengths in \[1, 48\]"),
        ("train.max_nonfinite_steps", 0, r"config\.train\.max_nonfinite_steps = 0 is invalid: expected an integer >= 1"),
        ("loss.label_smoothing", 0.5, r"config\.loss\.label_smoothing.*\[0, 0\.5\)"),
        ("loss.dpop_lambda", -1.0, r"config\.loss\.dpop_lambda = -1\.0 is invalid: expected a finite number >= 0"),
        ("loss.discopop_tau", 0.0, r"config\.loss\.discopop_tau = 0\.0 is invalid: expected a finite number > 0"),
        ("loss.exo_epsilon", 1.0, r"config\.loss\.exo_epsilon = 1\.0 is invalid: expected a finite number in \(0, 1\)"),
        ("optimizer.name", "sgd", r"config\.optimizer\.name = 'sgd'.*rmsprop, adamw"),
        ("optimizer.schedule", "linear", r"config\.optimizer\.schedule.*constant, cosine"),
        ("model.num_kv_heads", 3, r"config\.model is invalid: LlamaConfig\.num_kv_heads \(3\) must divide num_heads"),
        ("model.family", "gpt5", r"config\.model\.family = 'gpt5'.*llama"),
        ("model.hidden_size", 0, r"config\.model is invalid: LlamaConfig\.hidden_size must be a positive int, got 0"),
        ("model.dtype", "float8", r"config\.model\.dtype = 'float8'.*one of float32, bfloat16, float16"),
        ("model.rope_theta", -1.0, r"config\.model is invalid: LlamaConfig\.rope_theta must be a positive finite"),
        ("model.path", "/no/such/checkpoint", r"config\.model\.path = '/no/such/checkpoint' is invalid: .*no such directory"),
        ("data.tokenizer", "gpt2", r"config\.data\.tokenizer = 'gpt2' is invalid: .*synthetic_words, 'model' .*'hf:<"),
        ("data.tokenizer", "model", r"config\.data\.tokenizer = 'model' is invalid: .*needs config\.model\.path"),
        ("data.source", "reddit", r"config\.data\.source = 'reddit'.*synthetic_sentiment"),
        ("data.max_prompt_length", 24, r"config\.data\.max_prompt_length = 24.*less than data\.max_length"),
        ("data.truncation_mode", "middle", r"config\.data\.truncation_mode.*keep_end, keep_start"),
        ("train.grad_accum_steps", 3, r"config\.train\.grad_accum_steps = 3.*divisor of train\.batch_size"),
        ("train.batch_size", 10**6, r"config\.train\.batch_size.*at most data\.num_train_pairs"),
        ("sft.learning_rate", 0.0, r"config\.sft\.learning_rate = 0\.0"),
        ("dpo.num_steps", 0, r"config\.dpo\.num_steps = 0.*integer >= 1"),
        ("eval.top_p", 1.5, r"config\.eval\.top_p = 1\.5"),
    ],
)
def test_bad_value_names_key_and_allowed_values(key, value, message):
    config = demo.get_config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_model_path_is_checked_up_front(tmp_path):
    config = demo.get_config()
    config.model.path = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config\.model\.path = .* is invalid: .*config\.json: missing"):
        validate(config)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ConfigError, match=r"model_type 't5' is not supported; supported: gemma2, gemma3, gemma3_text, gpt2"):
        validate(config)
    # With a path, the family and size fields are not the architecture, so they are not validated.
    config.model.path = os.path.join(REPO, "tests", "fixtures", "hf", "gpt2")
    config.model.num_kv_heads = 3
    config.data.tokenizer = "model"
    validate(config)


def test_validation_runs_before_anything_is_built(tmp_path):
    config = demo.get_config()
    config.loss.name = "nope"
    with pytest.raises(ConfigError, match="config.loss.name"):
        run.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_cli_override_with_bad_value_fails_with_the_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--config.optimizer.name=sgd"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "config.optimizer.name = 'sgd' is invalid" in result.stderr


def test_demo_config_rejects_unknown_argument():
    with pytest.raises(ValueError, match="configs/demo.py: unknown argument 'big'"):
        demo.get_config("big")


def test_model_scan_layers_is_none_true_or_false():
    config = demo.get_config()
    for value in (None, True, False):  # None: auto, from 8 layers on
        config.model.scan_layers = value
        validate(config)
    with pytest.raises(TypeError):
        config.model.scan_layers = "yes"  # a typed placeholder: --config.model.scan_layers=True parses as a bool
    config.model = ml_collections.ConfigDict({**config.model.to_dict(), "scan_layers": "yes"})  # e.g. from JSON
    with pytest.raises(ConfigError, match=r"config\.model\.scan_layers = 'yes' is invalid: expected None \(auto: "
                                          r"from 8 layers on\), True or False"):
        validate(config)
