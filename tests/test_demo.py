"""The embedded demo, shortened, end to end through the CLI: it learns the preferences and writes its outputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax import data, judges, models

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

    # Samples at every evaluation of both stages (DPO's step 0 is π_ref's), with reward, and KL in DPO.
    eval_steps = {stage: {r["step"] for r in records if r["stage"] == stage and "eval/loss" in r}
                  for stage in ("sft", "dpo")}
    for stage, steps in eval_steps.items():
        files = {int(n[5:-6]) for n in os.listdir(tmp_path / "samples" / stage)}
        assert files == steps | ({0} if stage == "dpo" else set())
    assert all("eval/samples/kl" in r for r in records if r["stage"] == "dpo" and "eval/loss" in r)
    with open(tmp_path / "samples" / "dpo" / "step_200.jsonl") as f:
        final = [json.loads(line) for line in f]
    assert len(final) == 32 and {"prompt", "completion", "length", "logprob", "kl", "reward"} <= final[0].keys()
    assert np.mean([r["reward"] for r in final]) == pytest.approx(samples["policy"]["reward"])
    assert all(r["reward"] == data.ground_truth_reward(r["completion"]) for r in final)

    # Win rates of the policy against the eval pairs' chosen answers, judged by the ground-truth reward.
    evaluation = tmp_path / "evaluation"
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.evaluate", f"--workdir={tmp_path}", "--against=chosen",
         "--temperatures=0,1", "--num_prompts=16", "--best_of_n=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "win rate" in result.stdout and (evaluation / "win_rates.png").stat().st_size > 1000
    with open(evaluation / "win_rates.json") as f:
        curves = json.load(f)["curves"]
    (label, points), = curves.items()
    assert label.endswith("(best of 2)") and [p["temperature"] for p in points] == [0.0, 1.0]
    for point in points:
        with open(evaluation / "comparisons" / f"{label.replace(' ', '_')}_t{point['temperature']:g}.jsonl") as f:
            comparisons = [json.loads(line) for line in f]
        assert len(comparisons) == 16 and len({c["evaluated_first"] for c in comparisons}) == 2  # both orders
        for c in comparisons:  # each verdict is the reward's, seen from the evaluated side whatever its position
            ours, theirs = data.ground_truth_reward(c["evaluated"]), data.ground_truth_reward(c["against"])
            assert c["verdict"] == ("win" if ours > theirs else "loss" if ours < theirs else "tie")
        assert point == {"temperature": point["temperature"], **judges.win_rate([c["verdict"] for c in comparisons])}

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
