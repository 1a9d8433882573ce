"""Each loss against values computed by hand, the registry's errors, and the metrics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from dpo_jax import data, losses, models, step

# Two pairs. Pair 0: policy prefers y_w relative to the reference (Δ = 2); pair 1: the reverse (Δ = −1).
POLICY_W, POLICY_L = [-3.0, -5.0], [-6.0, -4.0]
REF_W, REF_L = [-4.0, -4.0], [-5.0, -4.0]
LEN_W, LEN_L = [3.0, 5.0], [4.0, 2.0]
DELTA = [2.0, -1.0]  # ((−3+4) − (−6+5), (−5+4) − (−4+4))


def pair_logps():
    arrays = (POLICY_W, POLICY_L, REF_W, REF_L, LEN_W, LEN_L)
    return losses.PairLogps(*(jnp.array(a, jnp.float32) for a in arrays))


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def expected(name, p):
    """The loss of each pair written out with the math module, one pair at a time."""
    out = []
    for i in range(2):
        d, b, eps = DELTA[i], p.beta, p.label_smoothing
        lw, ll, nw, nl = POLICY_W[i], POLICY_L[i], LEN_W[i], LEN_L[i]
        hw, hl = lw - REF_W[i], ll - REF_L[i]  # (1, −1) and (−1, 0)
        if name in ("dpo", "cdpo"):
            out.append((1 - eps) * neg_log_sigmoid(b * d) + eps * neg_log_sigmoid(-b * d))
        elif name == "robust":
            out.append(((1 - eps) * neg_log_sigmoid(b * d) - eps * neg_log_sigmoid(-b * d)) / (1 - 2 * eps))
        elif name == "ipo":
            out.append((d - 1 / (2 * b)) ** 2)
        elif name == "hinge":
            out.append(max(0.0, 1 - b * d))
        elif name == "unweighted":
            out.append(-b * d)
        elif name == "rdpo":
            out.append(neg_log_sigmoid(b * d + p.alpha * (nw - nl)))
        elif name == "rpo":
            dpo = (1 - eps) * neg_log_sigmoid(b * d) + eps * neg_log_sigmoid(-b * d)
            out.append(dpo + p.alpha * (-lw / nw))
        elif name == "unlikelihood":
            out.append(-lw + p.alpha * ll)
        elif name == "simpo":
            out.append(neg_log_sigmoid(b * lw / nw - b * ll / nl - p.gamma))
        elif name == "orpo":
            odds_w = math.log(math.exp(lw / nw) / (1 - math.exp(lw / nw)))
            odds_l = math.log(math.exp(ll / nl) / (1 - math.exp(ll / nl)))
            out.append(-lw / nw + p.orpo_lambda * neg_log_sigmoid(odds_w - odds_l))
        elif name == "sft":
            out.append(-lw / nw)
        elif name == "dpo_norm":
            out.append(neg_log_sigmoid(b * (hw / nw - hl / nl)))
        elif name == "dpop":
            out.append(neg_log_sigmoid(b * (d - p.dpop_lambda * max(0.0, -hw))))
        elif name == "nca_pair":
            out.append(neg_log_sigmoid(b * hw) + 0.5 * neg_log_sigmoid(-b * hw) + 0.5 * neg_log_sigmoid(-b * hl))
        elif name == "apo_zero":
            out.append((1 - sigmoid(b * hw)) + sigmoid(b * hl))
        elif name == "apo_down":
            out.append(sigmoid(b * hw) + (1 - sigmoid(b * d)))
        elif name == "exo_pair":
            e = p.exo_epsilon
            out.append(sigmoid(b * d) * (math.log(sigmoid(b * d)) - math.log(1 - e))
                       + sigmoid(-b * d) * (math.log(sigmoid(-b * d)) - math.log(e)))
        elif name == "sppo_hard":
            out.append((hw - 1 / (2 * b)) ** 2 + (hl + 1 / (2 * b)) ** 2)
        elif name == "discopop":
            m = sigmoid(b * d / p.discopop_tau)
            out.append((1 - m) * neg_log_sigmoid(b * d) + m * math.exp(-b * d))
        elif name == "bco_pair":
            shift = bco_shift(p)
            out.append(neg_log_sigmoid(b * hw - shift) + neg_log_sigmoid(shift - b * hl))
        elif name == "wpo":
            dpo = (1 - eps) * neg_log_sigmoid(b * d) + eps * neg_log_sigmoid(-b * d)
            out.append(math.exp(lw / nw + ll / nl) * dpo)
        else:
            raise AssertionError(f"no hand-computed value for {name}")
    return out


# The running mean a stateful loss starts each hand-computed test from: a mean of 0.3 over 4 earlier batches.
EARLIER_MEAN, EARLIER_BATCHES = 0.3, 4


def bco_shift(p):
    """δ after this batch: the earlier mean updated with this batch's mean reward β·mean over pairs of (h_w + h_l)/2
    (h_w + h_l = 0 for pair 0, −1 for pair 1)."""
    batch_mean = p.beta * (0.0 + -1.0) / 4
    return EARLIER_MEAN + (batch_mean - EARLIER_MEAN) / (EARLIER_BATCHES + 1)


def running_state(name):
    """`name`'s loss state holding the earlier mean (None for a loss without one)."""
    state = losses.init_loss_state(name)
    if state is None:
        return None
    return {loss: losses.RunningMean(jnp.float32(EARLIER_MEAN), jnp.float32(EARLIER_BATCHES)) for loss in state}


PARAMS = [
    losses.LossParams(beta=0.1),
    losses.LossParams(beta=0.5, label_smoothing=0.2, alpha=0.3, gamma=0.7, orpo_lambda=0.25, dpop_lambda=2.0,
                      discopop_tau=0.3, exo_epsilon=0.1),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("name", [n for n in losses.loss_names() if losses.takes(n, paired=True)])
def test_loss_matches_hand_computed(name, params):
    state = losses.update_loss_state(name, running_state(name), pair_logps(), params)
    got = losses.pair_losses(name, pair_logps(), params, state)
    np.testing.assert_allclose(got, expected(name, params), rtol=1e-5, atol=1e-6)


def test_dpo_hand_numbers():
    # β=0.1, Δ=2: −log σ(0.2) = log(1 + e^−0.2) = 0.598139...
    got = losses.pair_losses("dpo", pair_logps(), losses.LossParams(beta=0.1))
    assert float(got[0]) == pytest.approx(0.5981389, abs=1e-6)


def test_dpo_is_log2_when_policy_equals_reference():
    logps = pair_logps()
    same = logps._replace(reference_chosen=logps.policy_chosen, reference_rejected=logps.policy_rejected)
    np.testing.assert_allclose(losses.pair_losses("dpo", same, losses.LossParams()), math.log(2), rtol=1e-6)


def test_dpo_falls_as_margin_grows():
    logps = pair_logps()
    values = [
        float(losses.pair_losses("dpo", logps._replace(policy_chosen=logps.policy_chosen + m), losses.LossParams())[0])
        for m in (-2.0, 0.0, 2.0, 4.0)
    ]
    assert values == sorted(values, reverse=True) and len(set(values)) == 4


def test_reference_free_zeroes_reference():
    logps = pair_logps()
    free = losses.pair_losses("dpo", logps, losses.LossParams(reference_free=True))
    zero_ref = logps._replace(reference_chosen=jnp.zeros(2), reference_rejected=jnp.zeros(2))
    np.testing.assert_allclose(free, losses.pair_losses("dpo", zero_ref, losses.LossParams()))
    assert not losses.uses_reference("dpo", losses.LossParams(reference_free=True))
    assert losses.uses_reference("dpo", losses.LossParams())
    assert not losses.uses_reference("simpo", losses.LossParams())


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'.*dpo.*ipo.*unweighted"):
        losses.get_loss("dpoo")


def test_metrics_by_hand():
    params = losses.LossParams(beta=0.5)
    loss, metrics = losses.loss_and_metrics("dpo", pair_logps(), params)
    # rewards: β(π − ref): chosen (0.5, −0.5), rejected (−0.5, 0.0)
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.0)
    assert float(metrics["rewards/rejected"]) == pytest.approx(-0.25)
    assert float(metrics["rewards/margins"]) == pytest.approx(0.25)
    assert float(metrics["rewards/accuracies"]) == pytest.approx(0.5)
    assert float(metrics["logps/chosen"]) == pytest.approx(-4.0)
    assert float(metrics["logps/rejected"]) == pytest.approx(-5.0)
    assert float(loss) == pytest.approx((neg_log_sigmoid(1.0) + neg_log_sigmoid(-0.5)) / 2, rel=1e-6)


def test_metric_weights_ignore_padding_rows():
    params = losses.LossParams(beta=0.5)
    _, weighted = losses.loss_and_metrics("dpo", pair_logps(), params, jnp.array([1.0, 0.0]))
    assert float(weighted["rewards/accuracies"]) == 1.0
    assert float(weighted["rewards/margins"]) == pytest.approx(1.0)


# Three unpaired examples (KTO): h = policy − reference = (1, −1, 1); labels desirable, undesirable, desirable.
# Mismatched pairs: kl_policy − kl_reference = (1, −1, 1), mean 1/3 = the reference point z0.
UNPAIRED = dict(policy=[-3.0, -5.0, -2.0], reference=[-4.0, -4.0, -3.0], kl_policy=[-6.0, -7.0, -5.0],
                kl_reference=[-7.0, -6.0, -6.0], lengths=[3.0, 5.0, 2.0], labels=[1.0, 0.0, 1.0])


def unpaired_logps(**changes):
    return losses.UnpairedLogps(**{k: jnp.array(v, jnp.float32) for k, v in {**UNPAIRED, **changes}.items()})


def test_kto_matches_hand_computed():
    params = losses.LossParams(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    z0 = 1 / 3
    want = [1.0 * (1 - sigmoid(0.5 * (1 - z0))), 1.5 * (1 - sigmoid(0.5 * (z0 + 1))), 1.0 * (1 - sigmoid(0.5 * (1 - z0)))]
    np.testing.assert_allclose(losses.pair_losses("kto", unpaired_logps(), params), want, rtol=1e-6)
    # The reference point is clamped at 0 and is a constant: no gradient flows through the mismatched pairs.
    assert float(losses.kto_reference_point(unpaired_logps(kl_policy=[-9.0, -9.0, -9.0]))) == 0.0
    grads = jax.grad(lambda kl: losses.pair_losses("kto", unpaired_logps()._replace(kl_policy=kl), params).sum())(
        unpaired_logps().kl_policy)
    assert not np.any(np.asarray(grads))
    # reference_free: π_ref ≡ 1 for the completions and the mismatched pairs alike.
    free = losses.pair_losses("kto", unpaired_logps(), losses.LossParams(beta=0.5, reference_free=True))
    zeroed = unpaired_logps(reference=[0.0] * 3, kl_reference=[0.0] * 3)
    np.testing.assert_allclose(free, losses.pair_losses("kto", zeroed, losses.LossParams(beta=0.5)))


def test_kto_metrics_and_sft_on_unpaired_data():
    params = losses.LossParams(beta=0.5)
    _, metrics = losses.loss_and_metrics("kto", unpaired_logps(), params)
    # rewards β·h = (0.5, −0.5, 0.5): desirable mean 0.5, undesirable −0.5; every sign matches its label.
    assert float(metrics["rewards/chosen"]) == pytest.approx(0.5) and float(metrics["rewards/rejected"]) == -0.5
    assert float(metrics["rewards/margins"]) == pytest.approx(1.0) and float(metrics["rewards/accuracies"]) == 1.0
    assert float(metrics["logps/chosen"]) == pytest.approx(-2.5) and float(metrics["kl"]) == pytest.approx(1 / 3)
    np.testing.assert_allclose(losses.pair_losses("sft", unpaired_logps(), params), [1.0, 1.0, 1.0])
    assert losses.takes("sft", paired=False) and losses.takes("kto", paired=False) and not losses.takes("dpo", False)
    with pytest.raises(ValueError, match="loss 'dpo' takes paired data, not unpaired"):
        losses.pair_losses("dpo", unpaired_logps(), params)


def test_dpop_penalises_chosen_below_reference():
    # β=0.1, λ=50. Pair 0: h_w = 1 > 0, no penalty, = dpo. Pair 1: h_w = −1, z = 0.1·(−1 − 50·1) = −5.1.
    got = losses.pair_losses("dpop", pair_logps(), losses.LossParams(beta=0.1))
    np.testing.assert_allclose(got, [0.5981389, 5.1 + math.log1p(math.exp(-5.1))], rtol=1e-6)


def test_wpo_weight_carries_no_gradient():
    # d wpo / d lp_w = w·(−β·σ(−βΔ)) with w = exp(lp_w/|y_w| + lp_l/|y_l|) held constant; pair 0: w = e^(−1 − 1.5).
    params = losses.LossParams(beta=0.1)
    grads = jax.grad(lambda lp: losses.pair_losses("wpo", pair_logps()._replace(policy_chosen=lp), params).sum())(
        pair_logps().policy_chosen)
    assert float(grads[0]) == pytest.approx(-math.exp(-2.5) * 0.1 * sigmoid(-0.2), rel=1e-5)


def test_discopop_is_finite_far_from_zero():
    # Pair 0: Δ = (−10003 + 4) − (−1) = −9998, βΔ = −999.8: exp(−βΔ) overflows float32 alone, but σ(βΔ/τ)·exp(−βΔ)
    # underflows to 0, leaving −log σ(βΔ) ≈ 999.8. Pair 1: βΔ = 1000.7, the loss ≈ 0.
    logps = pair_logps()._replace(policy_chosen=jnp.array([-10003.0, 10003.0]))
    params = losses.LossParams(beta=0.1)
    got = losses.pair_losses("discopop", logps, params)
    assert float(got[0]) == pytest.approx(999.8, rel=1e-6) and float(got[1]) == pytest.approx(0.0, abs=1e-6)
    grads = jax.grad(lambda lp: losses.pair_losses("discopop", logps._replace(policy_chosen=lp), params).sum())(
        logps.policy_chosen)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_new_losses_need_reference():
    for name in ("dpo_norm", "dpop", "nca_pair", "apo_zero", "apo_down", "exo_pair", "sppo_hard", "discopop", "wpo"):
        assert losses.uses_reference(name, losses.LossParams()), name


NEW_PAIR_LOSSES = ("dpo_norm", "dpop", "nca_pair", "apo_zero", "apo_down", "exo_pair", "sppo_hard", "discopop", "wpo",
                   "bco_pair", "dpo+0.5*bco_pair+0.2*sft")


def test_new_losses_train_a_tiny_model_without_nan():
    """A few SGD steps of a 1-layer decoder with each new loss through step.make_loss_fn (the train step's path),
    one copy of the model per loss, all in one jit to compile once: losses and parameters stay finite and move."""
    vocab, length, pairs = 17, 10, 4
    model_config = models.config_from_section(demo.get_config("smoke").model, vocab_size=vocab)
    model_config = dataclasses.replace(model_config, num_layers=1)
    graphdef, ref_params = models.split_params(models.model_from_config(model_config, nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    rows = {}
    for key in ("chosen", "rejected"):
        mask = np.zeros((pairs, length), np.float32)
        mask[:, 3:3 + rng.integers(2, 6)] = 1
        tokens = jnp.asarray(rng.integers(3, vocab, (pairs, length)), jnp.int32)
        rows[key] = data.Rows(tokens_BxT=tokens, loss_mask_BxT=jnp.asarray(mask))
    batch = data.PairedBatch(**rows)
    loss_fns = {name: step.make_loss_fn(graphdef, name, losses.LossParams(), chunk_size=length)
                for name in NEW_PAIR_LOSSES}

    @jax.jit
    def sgd_steps(params_by_loss):
        updated, values = {}, {}
        for name, params in params_by_loss.items():
            grad_fn = jax.value_and_grad(
                lambda p: loss_fns[name](p, ref_params, batch, losses.init_loss_state(name)), has_aux=True)
            (values[name], _), grads = grad_fn(params)
            updated[name] = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
        return updated, values

    params_by_loss = {name: ref_params for name in NEW_PAIR_LOSSES}
    history = []
    for _ in range(3):
        params_by_loss, values = sgd_steps(params_by_loss)
        history.append({name: float(v) for name, v in values.items()})
    for name in NEW_PAIR_LOSSES:
        assert np.isfinite(history[0][name]) and np.isfinite(history[-1][name]), (name, history)
        assert history[0][name] != history[-1][name], (name, history)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params_by_loss[name])), name
