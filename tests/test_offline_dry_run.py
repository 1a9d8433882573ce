"""The dry run sizes a model from its config.json alone (model.config_path: the file, or a directory holding only
it): configs/tldr.py's GPT-J 6B is sized offline, its default checkpoint (a Hub repo id) never looked up."""

import os
import subprocess
import sys

import pytest

from configs import tldr
from dpo_jax import config as config_lib
from dpo_jax import dry_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPTJ_6B = os.path.join(REPO, "configs", "shapes", "gpt-j-6b")
# GPT-J 6B by hand (d = 4096, 28 layers, vocabulary 50400, MLP 4d with biases, untied LM head with a bias): the
# embedding and LM head (2·V·d + V), per layer a LayerNorm (2d), q/k/v/o (4d²) and the MLP (8d² + 5d), a final
# LayerNorm (2d).
D, LAYERS, V = 4096, 28, 50400
GPTJ_6B_PARAMS = 2 * V * D + V + LAYERS * (2 * D + 4 * D * D + 8 * D * D + 5 * D) + 2 * D


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("path", [GPTJ_6B, os.path.join(GPTJ_6B, "config.json")])
def test_tldr_is_sized_from_a_config_json_alone(path):
    config = tldr.get_config()
    config.update(dry_run=True)
    config.model.config_path = path
    config.mesh.update(data=1, fsdp=8, tensor=1)  # a TPU slice this machine lacks: the table only, no compile
    config_lib.validate(config)
    report = dry_run.report(config)
    assert f"GPTJConfig with {GPTJ_6B_PARAMS:,} parameters" in report
    assert "params (float32)" in report and "= 8 devices" in report


def test_cli_dry_run_offline():
    """As a user types it, with no network: `python -m dpo_jax.main --config=configs/tldr.py ...`."""
    command = [sys.executable, "-m", "dpo_jax.main", "--config=configs/tldr.py", "--config.dry_run=True",
               f"--config.model.config_path={GPTJ_6B}", "--config.mesh.fsdp=8"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{GPTJ_6B_PARAMS:,} parameters" in result.stdout


def test_config_path_is_checked(tmp_path):
    config = tldr.get_config()
    config.model.config_path = GPTJ_6B
    with pytest.raises(config_lib.ConfigError, match=r"config.model.config_path = .* is invalid: expected '' unless "
                                                      "config.dry_run = True"):
        config_lib.validate(config)
    config.dry_run = True
    config.model.config_path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"config.json: missing"):
        config_lib.validate(config)
