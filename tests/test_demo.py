"""The embedded demo, shortened, end to end through the CLI: it learns the preferences and writes its outputs."""

import json
import os
import subprocess
import sys

from dpo_jax import data, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {
    "stage", "step", "loss", "grad_norm", "learning_rate", "examples_per_second", "rewards/chosen",
    "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
}


def test_short_demo_learns_and_writes_its_outputs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.main", "--config=configs/demo.py:smoke", f"--workdir={tmp_path}",
         "--config.train.progress_bar=False"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["dpo"]["rewards/accuracies"] >= 0.9
    # Before DPO the policy is π_ref: every margin is 0, so no pair is ranked right.
    assert summary["dpo_initial"]["rewards/margins"] == 0.0 and summary["dpo_initial"]["rewards/accuracies"] == 0.0
    samples = summary["samples"]
    assert samples["policy"]["reward"] > samples["reference"]["reward"] + 0.5
    assert samples["policy"]["kl"] > 0
    assert "eval reward accuracy" in result.stdout and "after (DPO)" in result.stdout

    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert {r["stage"] for r in records} == {"sft", "dpo"}
    assert all(METRIC_KEYS <= r.keys() for r in records)
    assert any("eval/rewards/accuracies" in r for r in records)
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    for stage in ("sft", "dpo"):  # one TensorBoard run per stage
        assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard" / stage))

    # The trained policy exports as a Hugging Face model, its word tokenizer included.
    out = tmp_path / "hf"
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.export", f"--workdir={tmp_path}", f"--out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"exported dpo step 200 of {tmp_path} to {out}" in result.stdout
    _, params, config = models.load_hf(str(out))
    assert config.num_layers == 2 and config.tie_embeddings and config.vocab_size == data.get_tokenizer("synthetic_words").vocab_size
    assert data.get_tokenizer(f"hf:{out}").encode("review of the film : great") == data.get_tokenizer(
        "synthetic_words").encode("review of the film : great")
