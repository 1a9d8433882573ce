"""The tabular DPO simulation reproduces the paper's claims (experiments/bandit.py, issue 3)."""

import json

import numpy as np
import pytest

from experiments import bandit

UNIFORM = 1 / len(bandit.REPLIES)  # π_ref


@pytest.fixture(scope="module")
def runs():
    return {name: bandit.run(name) for name in ("align", "no_sigma", "mislabel")}


def _top(x):
    return bandit.RANKING[x][0]


def _mean_kl(history):
    return history["kl"].mean(-1)


def test_align_raises_preferred_replies_and_its_kl_settles(runs):
    probs, kl = runs["align"]["probs"], _mean_kl(runs["align"])
    np.testing.assert_allclose(probs[0], UNIFORM)  # the policy starts as a copy of π_ref
    for x in range(len(bandit.PROMPTS)):
        assert probs[-1, x, _top(x)] > UNIFORM  # the preferred reply rises above π_ref
        assert probs[-1, x].argmax() == _top(x)  # and ends the most probable
    # Bounded and converging: over the second half every tenth of the run adds less KL than
    # the tenth before it, and the last tenth adds under a tenth of the final value.
    steps = len(kl) - 1
    window_gains = np.diff(kl[:: steps // 10])
    assert np.all(np.diff(window_gains[len(window_gains) // 2 :]) < 0)
    assert kl[-1] - kl[int(0.9 * steps)] < 0.1 * kl[-1]


def test_no_sigma_degenerates(runs):
    probs, kl = runs["no_sigma"]["probs"], _mean_kl(runs["no_sigma"])
    align_kl = _mean_kl(runs["align"])
    for x in range(len(bandit.PROMPTS)):
        assert probs[-1, x, _top(x)] >= 0.99
    middle = (len(kl) - 1) // 2
    assert np.all(np.diff(kl) > 0)  # the KL grows at every step
    assert kl[-1] > kl[middle]
    for t in (middle, -1):
        assert kl[t] >= 5 * align_kl[t]


def test_mislabel_chases_the_wrong_reply(runs):
    ((_, pair),) = bandit.PRESETS["mislabel"].flips
    x, _, wrongly_preferred = bandit.PAIRS[pair]  # honest labels: chosen > rejected
    assert runs["mislabel"]["probs"][-1, x, wrongly_preferred] > runs["align"]["probs"][-1, x, wrongly_preferred]


def _closed_form_gradient(theta, swapped, beta, weighted):
    """−β·Σ_pairs σ(r̂_l − r̂_w)·(∇log π_w − ∇log π_l), ∇_θ[x] log π(y|x) = e_y − π(·|x); σ→1 unweighted."""
    theta = np.asarray(theta, np.float64)
    pi = np.exp(theta - theta.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    reward = beta * np.log(pi / UNIFORM)
    grad = np.zeros_like(theta)
    for (x, w, l), flipped in zip(bandit.PAIRS, swapped):
        if flipped:
            w, l = l, w
        weight = 1 / (1 + np.exp(reward[x, w] - reward[x, l])) if weighted else 1.0
        eye = np.eye(len(bandit.REPLIES))
        grad[x] += -beta * weight * ((eye[w] - pi[x]) - (eye[l] - pi[x]))
    return grad


@pytest.mark.parametrize("preset", ["align", "no_sigma", "mislabel"])
def test_applied_gradient_is_the_closed_form(runs, preset):
    settings = bandit.PRESETS[preset]
    step = bandit.make_step(settings)
    rng = np.random.default_rng(0)
    schedule = bandit.flip_schedule(settings)
    middle = settings.steps // 2
    states = [  # θ ≡ log π up to a per-prompt shift, which softmax ignores
        (np.log(runs[preset]["probs"][middle]), schedule[middle]),
        (rng.normal(0, 1.5, (len(bandit.PROMPTS), len(bandit.REPLIES))), rng.random(len(bandit.PAIRS)) < 0.3),
    ]
    for theta, swapped in states:
        theta = theta.astype(np.float32)
        (next_theta, _), record = step((theta, None), swapped)
        applied = (theta - np.asarray(next_theta, np.float64)) / settings.lr
        expected = _closed_form_gradient(theta, swapped, settings.beta, weighted=settings.loss == "dpo")
        np.testing.assert_allclose(applied, expected, rtol=2e-3, atol=2e-3 * settings.beta)
        expected_weight = record["sigma"] if settings.loss == "dpo" else np.ones(len(bandit.PAIRS))
        np.testing.assert_allclose(record["weight"], expected_weight, rtol=1e-5, atol=1e-6)


def test_cli_json_is_byte_identical_and_plots(tmp_path, capsys):
    outputs = []
    for i in range(2):
        json_path, png_path = tmp_path / f"{i}.json", tmp_path / f"{i}.png"
        argv = ["--preset", "mislabel", "--loss", "ipo", "--steps", "60", "--flip", "30:0",
                "--json", str(json_path), "--plot", str(png_path)]
        assert bandit.main(argv) == 0
        outputs.append(json_path.read_bytes())
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[0] == outputs[1]
    document = json.loads(outputs[0])
    assert document["settings"]["flips"] == [[0, 6], [30, 0]]
    assert len(document["steps"]) == 61
    assert set(document["steps"][0]) >= {"probs", "loss", "rewards", "sigma", "kl"}
    assert "final:" in capsys.readouterr().out


def test_compare_trains_each_loss_on_the_same_pairs_stateful_and_combined_ones_too(capsys):
    rows = bandit.compare("align", ["dpo", "bco_pair", "dpo+0.5*sft"], steps=60)
    assert [r["loss"] for r in rows] == ["dpo", "bco_pair", "dpo+0.5*sft"]
    assert all(r["accuracy"] == 1.0 and r["margin"] > 0 and r["kl"] > 0 for r in rows), rows
    # The SFT term pulls harder towards the chosen replies: more KL than DPO alone.
    assert rows[2]["kl"] > rows[0]["kl"]
    assert bandit.main(["--compare", "ipo,dpop", "--steps", "20"]) == 0
    assert "dpop" in capsys.readouterr().out
    assert set(bandit.paired_losses()) >= {"dpo", "bco_pair", "wpo"} and "kto" not in bandit.paired_losses()


def test_discopop_at_tau_005_moves_away_from_a_policy_equal_to_its_reference():
    """DiscoPOP's loss rises at ρ = βΔ = 0 when τ < (1 − log 2)/3 ≈ 0.10 (its derivative there is
    (1 − log 2)/(4τ) − 3/4): started at π = π_ref, gradient descent settles at a small negative margin; τ = 0.5
    trains like DPO."""
    paper_tau, = bandit.compare("align", ["discopop"], steps=60)
    wide_tau, = bandit.compare("align", ["discopop"], steps=60, loss_params={"discopop_tau": 0.5})
    assert paper_tau["margin"] < 0 and wide_tau["margin"] > 0 and wide_tau["accuracy"] == 1.0
