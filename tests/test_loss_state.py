"""Losses beyond one function of sequence log-probs, through the train step: weighted combinations, BCO's running
reward shift in the train state, LD-DPO's length-desensitised log-probs in every layout, TR-DPO's moving π_ref, and
a run using all of them resumed bitwise."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import interrupt_stage_at, make_short_config
from dpo_jax import build, checkpoint, data, losses, run, step
from dpo_jax.config import ConfigError, validate
from test_packing import LAYOUTS, PLAIN, batch_of, make_model, random_pairs

LOGPS = losses.PairLogps(*(jnp.array(a, jnp.float32) for a in (
    [-3.0, -5.0], [-6.0, -4.0], [-4.0, -4.0], [-5.0, -4.0], [3.0, 5.0], [4.0, 2.0])))


def softplus(x):
    return math.log1p(math.exp(x))


def test_a_weighted_combination_sums_its_components_and_logs_each():
    params = losses.LossParams(beta=0.5)
    total, metrics = losses.loss_and_metrics("dpo+0.25*sft", LOGPS, params)
    # dpo: Δ = (2, −1), β = 0.5 → softplus(−1), softplus(0.5); sft: −lp_w/|y_w| = (1, 1).
    dpo = [softplus(-1.0), softplus(0.5)]
    np.testing.assert_allclose(metrics["loss/dpo"], np.mean(dpo), rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/sft"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(total, np.mean(dpo) + 0.25, rtol=1e-6)
    assert losses.get_loss("dpo+0.25*sft").needs_reference and not losses.get_loss("sft+simpo").needs_reference


@pytest.mark.parametrize("name, message", [
    ("dpo+sfft", r"unknown loss 'sfft' in 'dpo\+sfft'; valid losses: .*dpo"),
    ("dpo+dpo", r"names dpo more than once"),
    ("dpo+x*sft", r"its weight 'x' is not a number"),
    ("dpo+0*sft", r"the weight must be a positive finite number"),
    ("dpo+kto", r"mixes losses of paired and unpaired data"),
])
def test_a_bad_combination_is_refused_naming_the_term(name, message):
    with pytest.raises(ValueError, match=message):
        losses.get_loss(name)


def test_bco_pair_shifts_by_the_running_mean_of_batch_rewards():
    """δ is the mean over batches of each batch's mean reward, this batch included (TRL's RunningMoments fed one
    value a batch); the loss is softplus(δ − βh_w) + softplus(βh_l − δ)."""
    params = losses.LossParams(beta=0.5)
    state = losses.init_loss_state("bco_pair")
    first = losses.update_loss_state("bco_pair", state, LOGPS, params)
    # Batch mean reward: β·mean(h_w, h_l) over both pairs = 0.5·(1 − 1 − 1 + 0)/4 = −0.125.
    assert float(first["bco_pair"].mean) == pytest.approx(-0.125) and float(first["bco_pair"].count) == 1
    # h_w + 2 on both pairs: the batch's mean reward is −0.125 + 0.5·(2 + 2)/4 = 0.375; δ = (−0.125 + 0.375)/2.
    shifted = LOGPS._replace(policy_chosen=LOGPS.policy_chosen + 2.0)
    second = losses.update_loss_state("bco_pair", first, shifted, params)
    assert float(second["bco_pair"].mean) == pytest.approx(0.125) and float(second["bco_pair"].count) == 2
    got = losses.pair_losses("bco_pair", shifted, params, second)
    hw, hl, delta = [3.0, 1.0], [-1.0, 0.0], 0.125
    np.testing.assert_allclose(
        got, [softplus(delta - 0.5 * w) + softplus(0.5 * l - delta) for w, l in zip(hw, hl)], rtol=1e-6)
    with pytest.raises(ValueError, match="keeps a running mean: pass its loss_state"):
        losses.pair_losses("bco_pair", LOGPS, params)


def test_bco_on_unpaired_data_classifies_each_completion_around_the_shift():
    logps = losses.UnpairedLogps(policy=jnp.array([-2.0, -6.0, -3.0]), reference=jnp.array([-3.0, -5.0, -3.0]),
                                 kl_policy=jnp.zeros(3), kl_reference=jnp.zeros(3), lengths=jnp.ones(3),
                                 labels=jnp.array([1.0, 0.0, 0.0]))
    params = losses.LossParams(beta=1.0)
    state = losses.update_loss_state("bco", losses.init_loss_state("bco"), logps, params)
    delta = (1.0 - 1.0 + 0.0) / 3  # the mean of βh = (1, −1, 0)
    assert float(state["bco"].mean) == pytest.approx(delta)
    got = losses.pair_losses("bco", logps, params, state)
    np.testing.assert_allclose(got, [softplus(-(1 - delta)), softplus(-1 - delta), softplus(0 - delta)], rtol=1e-6)
    assert not losses.get_loss("bco").kl_rows and losses.get_loss("kto").kl_rows


def tiny_step(loss_name, grad_accum_steps=1, reference_sync=None, **loss_params):
    graphdef, params = make_model("llama")
    tx = optax.sgd(0.05)
    loss_fn = step.make_loss_fn(graphdef, loss_name, losses.LossParams(beta=0.5, **loss_params), chunk_size=5)
    train_step = step.make_train_step(loss_fn, tx, optax.constant_schedule(0.05), grad_accum_steps,
                                      reference_sync=reference_sync)
    return graphdef, params, tx, train_step, loss_fn


def test_the_running_mean_lives_in_the_train_state_and_takes_in_each_micro_batch():
    graphdef, params, tx, train_step, loss_fn = tiny_step("dpo+bco_pair", grad_accum_steps=2)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    batch = batch_of(random_pairs(8, seed=4), LAYOUTS["shared_prompt"])
    state = step.TrainState.create(jax.tree.map(jnp.copy, params), tx, losses.init_loss_state("dpo+bco_pair"))
    state, metrics = train_step(state, ref_params, batch)
    running = state.loss_state["bco_pair"]
    assert float(running.count) == 2  # one update per micro-batch, as TRL's per-forward update
    # Its mean is the mean of the two micro-batches' mean rewards (rows 0, 2, 4, 6 and 1, 3, 5, 7).
    (chosen, rejected), _ = step.make_pair_logps(graphdef, 5)(params, batch)
    (ref_chosen, ref_rejected), _ = step.make_pair_logps(graphdef, 5)(ref_params, batch)
    rewards = 0.5 * ((chosen - ref_chosen) + (rejected - ref_rejected)) / 2  # β·(h_w + h_l)/2 per pair
    expected = np.mean([np.mean(rewards[0::2]), np.mean(rewards[1::2])])
    np.testing.assert_allclose(running.mean, expected, rtol=1e-4, atol=1e-6)
    assert float(metrics["running_mean/bco_pair"]) == pytest.approx(float(running.mean), rel=1e-6)
    assert {"loss/dpo", "loss/bco_pair"} <= set(metrics)
    # Evaluation reads the running mean and leaves it alone: its loss is the one of δ = the state's mean.
    weighted = batch.replace(weight=np.ones(8, np.float32))
    eval_metrics, _ = step.make_eval_step(loss_fn)(state.params, ref_params, weighted, state.loss_state)
    logps = loss_fn(state.params, ref_params, batch, state.loss_state, train=False)[1][0]
    np.testing.assert_allclose(eval_metrics["loss/bco_pair"], logps["loss/bco_pair"], rtol=1e-6)
    moved = {"bco_pair": running._replace(mean=running.mean + 1.0)}
    assert float(loss_fn(state.params, ref_params, batch, moved, train=False)[1][0]["loss/bco_pair"]) != float(
        eval_metrics["loss/bco_pair"])


def test_a_skipped_step_keeps_the_running_mean():
    _, params, tx, train_step, _ = tiny_step("bco_pair")
    batch = batch_of(random_pairs(4, seed=5), LAYOUTS["shared_prompt"])
    state = step.TrainState.create(jax.tree.map(jnp.copy, params), tx, losses.init_loss_state("bco_pair"))
    poisoned = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    state, metrics = train_step(state, poisoned, batch)  # a NaN π_ref: a NaN loss and batch reward
    assert float(metrics["skipped"]) == 1
    assert float(state.loss_state["bco_pair"].count) == 0 and float(state.loss_state["bco_pair"].mean) == 0


def hand_desensitised(graphdef, params, examples, alpha):
    """Each completion's log-prob from its token log-probs (plain layout), tokens past the pair's shorter length
    weighted α."""
    sums = {"chosen": [], "rejected": []}
    for example in examples:
        shared = min(len(example["chosen"]), len(example["rejected"]))
        for key in sums:
            one = data.collate([{"prompt": example["prompt"], "chosen": example[key], "rejected": example[key]}],
                               (40,), 0, layout=PLAIN)
            rows = one.chosen
            hidden, logits_fn = step.apply_model(graphdef, params, rows.tokens_BxT, rows.positions_BxT, None,
                                                 rows.branch_ids_BxT)
            tokens = np.asarray(rows.tokens_BxT[0])
            logps = np.asarray(jax.nn.log_softmax(logits_fn(hidden)[0], axis=-1))
            scored = np.flatnonzero(np.asarray(rows.loss_mask_BxT[0]))
            assert len(scored) == len(example[key])
            token_logps = [logps[t - 1, tokens[t]] for t in scored]
            sums[key].append(sum(lp * (1.0 if i < shared else alpha) for i, lp in enumerate(token_logps)))
    return np.array([sums["chosen"], sums["rejected"]])


def test_ld_alpha_weighs_the_longer_completions_tail_in_every_layout():
    graphdef, params = make_model("llama")
    examples = random_pairs(seed=6)
    pair_logps = jax.jit(step.make_pair_logps(graphdef, chunk_size=5), static_argnums=(2, 3))
    expected = hand_desensitised(graphdef, params, examples, 0.3)
    plain = np.asarray(pair_logps(params, batch_of(examples, PLAIN), "policy", 1.0)[0])
    assert not np.allclose(plain, expected)  # some pair has completions of different lengths
    for name, layout in {"plain": PLAIN, **LAYOUTS}.items():
        got = np.asarray(pair_logps(params, batch_of(examples, layout), "policy", 0.3)[0])
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5, err_msg=name)


def test_ld_alpha_changes_only_the_policys_log_probs():
    """As TRL's ld_alpha: the policy's sums are desensitised, π_ref's are whole (so h ≠ 0 at the start)."""
    graphdef, params = make_model("llama")
    batch = batch_of(random_pairs(seed=6), LAYOUTS["shared_prompt"])
    loss_fn = step.make_loss_fn(graphdef, "dpo", losses.LossParams(beta=0.5, ld_alpha=0.3), chunk_size=5)
    _, (metrics, _) = loss_fn(params, params, batch)
    (chosen, rejected), _ = step.make_pair_logps(graphdef, 5)(params, batch, "policy", 0.3)
    (ref_chosen, _), _ = step.make_pair_logps(graphdef, 5)(params, batch)
    np.testing.assert_allclose(metrics["logps/chosen"], np.mean(chosen), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.5 * np.mean(chosen - ref_chosen), rtol=1e-5)


@pytest.mark.parametrize("layout", ["plain", "shared_prompt"])
def test_new_losses_take_pi_ref_from_a_cache_as_from_its_forward(layout):
    """A batch carrying π_ref's cached log-probs (the reference cache) gives the loss, metrics and running mean that
    π_ref's forward gives, for a stateful combination with LD-DPO, one row per completion or shared-prompt rows."""
    graphdef, params = make_model("llama")
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    examples = random_pairs(seed=8)
    layout = PLAIN if layout == "plain" else LAYOUTS[layout]
    (ref_chosen, ref_rejected), _ = step.make_pair_logps(graphdef, 5)(ref_params, batch_of(examples, layout))
    cached = batch_of(data.with_reference_logps(examples, ref_chosen, ref_rejected), layout)
    name = "dpo+0.5*bco_pair+0.2*sft"
    loss_fn = step.make_loss_fn(graphdef, name, losses.LossParams(beta=0.5, ld_alpha=0.5), chunk_size=5)
    state = losses.init_loss_state(name)
    forward = loss_fn(params, ref_params, batch_of(examples, layout), state)
    from_cache = loss_fn(params, None, cached, state)
    for a, b in zip(jax.tree.leaves(forward), jax.tree.leaves(from_cache)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_reference_sync_mixes_pi_ref_towards_the_policy_every_n_steps():
    _, params, tx, train_step, _ = tiny_step("dpo", reference_sync=step.ReferenceSync(every=2, mixup_alpha=0.25))
    initial_ref = jax.tree.map(lambda x: x * 0.9, params)
    batches = [batch_of(random_pairs(4, seed=s), LAYOUTS["shared_prompt"]) for s in range(3)]
    state = step.TrainState.create(jax.tree.map(jnp.copy, params), tx, None, jax.tree.map(jnp.copy, initial_ref))
    state, _ = train_step(state, None, batches[0])  # step 1: not due
    for got, want in zip(jax.tree.leaves(state.reference), jax.tree.leaves(initial_ref)):
        np.testing.assert_array_equal(got, want)
    policy_before = jax.tree.map(np.asarray, state.params)
    state, _ = train_step(state, None, batches[1])  # step 2: π_ref ← 0.25·π + 0.75·π_ref
    policy_after = jax.tree.map(np.asarray, state.params)
    for got, ref, p in zip(jax.tree.leaves(state.reference), jax.tree.leaves(initial_ref),
                           jax.tree.leaves(policy_after)):
        np.testing.assert_allclose(got, 0.25 * p + 0.75 * np.asarray(ref), rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(
        policy_after)))


@pytest.mark.parametrize("changes, message", [
    (dict(ref={"sync_every": 4, "cache": "/tmp/x"}), r"config\.ref\.sync_every = 4.*a cached π_ref cannot move"),
    (dict(ref={"sync_every": 4}, mode="sft"), r"config\.ref\.sync_every = 4.*mode = 'sft', which trains no DPO"),
    (dict(ref={"sync_every": 4}, loss={"name": "simpo"}), r"loss\.name = 'simpo'.*uses no π_ref"),
    (dict(ref={"mixup_alpha": 0.0}), r"config\.ref\.mixup_alpha = 0\.0 is invalid"),
    (dict(loss={"ld_alpha": 1.5}), r"config\.loss\.ld_alpha = 1\.5 is invalid"),
    (dict(loss={"ld_alpha": 0.5, "name": "kto"}), r"config\.loss\.ld_alpha = 0\.5.*trains on unpaired data"),
    (dict(loss={"name": "dpo+0.5*kto"}), r"config\.loss\.name = 'dpo\+0\.5\*kto' is invalid: .*mixes losses"),
])
def test_bad_loss_and_reference_settings_are_refused_naming_the_key(changes, message):
    config = make_short_config()
    for section, value in changes.items():
        if isinstance(value, dict):
            config[section].update(value)
        else:
            config[section] = value
    with pytest.raises(ConfigError, match=message):
        validate(config)


def tr_bco_config():
    config = make_short_config()
    config.mode = "dpo"
    config.loss.update(name="dpo+0.5*bco_pair", ld_alpha=0.5)
    config.ref.update(sync_every=2, mixup_alpha=0.5)
    config.data.num_eval_prompts = 0
    return config


@pytest.fixture(scope="module")
def tr_bco_uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tr_bco"))
    run.train_and_evaluate(tr_bco_config(), workdir)
    return workdir


def final_state(workdir):
    directory = checkpoint.stage_directory(workdir, "dpo")
    step_number = max(int(name) for name in os.listdir(directory) if name.isdigit())
    return step_number, ocp.tree.to_flat_dict(
        ocp.PyTreeCheckpointer().restore(f"{directory}/{step_number}/state"))


class Interrupted(Exception):
    pass


def test_a_run_with_a_moving_reference_and_a_running_mean_resumes_bitwise(tmp_path, monkeypatch,
                                                                          tr_bco_uninterrupted):
    config = tr_bco_config()
    resumed = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:  # killed after the step-2 checkpoint, before step 4's
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS["dpo"], 3, Interrupted())
        with pytest.raises(Interrupted):
            run.train_and_evaluate(config, resumed)
    run.train_and_evaluate(config, resumed)
    (step_a, leaves_a), (step_b, leaves_b) = final_state(tr_bco_uninterrupted), final_state(resumed)
    assert step_a == step_b == 5 and leaves_a.keys() == leaves_b.keys()
    assert any(k[0] == "reference" for k in leaves_a) and any(k[0] == "loss_state" for k in leaves_a)
    for key in leaves_a:
        np.testing.assert_array_equal(leaves_a[key], leaves_b[key], err_msg=str(key))
    count = [v for k, v in leaves_a.items() if k[0] == "loss_state" and k[-1] in ("count", "1")]
    assert count and float(count[0]) == 5  # a batch mean a step, 5 steps
    moved = [k for k in leaves_a if k[0] == "reference" and not np.array_equal(
        leaves_a[k], leaves_a[("params",) + k[1:]])]
    assert moved  # π_ref moved half-way to the policy at steps 2 and 4, not all the way
