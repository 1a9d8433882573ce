"""The pure train step: the paper's gradient, a frozen reference, gradient accumulation."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from dpo_jax import data, losses, models, optimizer, step
from dpo_jax.logprobs import sequence_logprobs
from dpo_jax.models import apply_model, config_from_section, model_from_config, split_params

VOCAB, LENGTH, PAIRS = 17, 12, 8


def tiny_config():
    """The demo config, shrunk further: a 1-layer decoder."""
    config = demo.get_config()
    config.model.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32)
    config.train.batch_size = PAIRS
    return config


def make_model(config, seed=0):
    return split_params(model_from_config(config_from_section(config.model, vocab_size=VOCAB), nnx.Rngs(seed)))


def random_batch(seed=0, pairs=PAIRS):
    """A PairedBatch of random rows (prompt 2-4 tokens, completion 1-5), scored at every position."""
    rng = np.random.default_rng(seed)
    rows = {}
    for key in ("chosen", "rejected"):
        tokens = rng.integers(3, VOCAB, (pairs, LENGTH)).astype(np.int32)
        mask = np.zeros((pairs, LENGTH), np.float32)
        for i in range(pairs):
            prompt, completion = rng.integers(2, 5), rng.integers(1, 6)
            mask[i, prompt : prompt + completion] = 1
            tokens[i, prompt + completion :] = 0  # right padding
        rows[key] = data.Rows(tokens_BxT=jnp.asarray(tokens), loss_mask_BxT=jnp.asarray(mask))
    return data.PairedBatch(**rows)


def perturbed(params, seed=1, scale=0.05):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])


def sequence_logp(graphdef, params, tokens, mask):
    hidden, logits_fn = apply_model(graphdef, params, tokens)
    return sequence_logprobs(hidden, logits_fn, tokens, mask)[0]


@pytest.mark.parametrize("loss_name", ["dpo", "unweighted"])
def test_gradient_equals_papers_closed_form(loss_name):
    """∇L = −β·mean_i w_i·(∇log π(y_w,i) − ∇log π(y_l,i)), w_i = σ(r̂_l,i − r̂_w,i) (dpo) or 1 (unweighted)."""
    config = tiny_config()
    beta = 0.5
    graphdef, params = make_model(config)
    ref_params = perturbed(params)
    batch = random_batch()
    loss_fn = step.make_loss_fn(graphdef, loss_name, losses.LossParams(beta=beta), chunk_size=5)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, ref_params, batch)[0]))(params)

    # One sequence at a time: log π(y|x) and its gradient, and log π_ref(y|x).
    logp_and_grad = jax.jit(jax.value_and_grad(lambda p, tokens, mask: sequence_logp(graphdef, p, tokens, mask)[0]))
    ref_logp = jax.jit(lambda tokens, mask: sequence_logp(graphdef, ref_params, tokens, mask)[0])
    expected = jax.tree.map(jnp.zeros_like, params)
    for i in range(PAIRS):
        logp = {}
        grad_logp = {}
        for key in ("chosen", "rejected"):
            rows = getattr(batch, key)
            tokens, mask = rows.tokens_BxT[i : i + 1], rows.loss_mask_BxT[i : i + 1]
            logp[key], grad_logp[key] = logp_and_grad(params, tokens, mask)
            logp[key] -= ref_logp(tokens, mask)
        weight = jax.nn.sigmoid(beta * (logp["rejected"] - logp["chosen"])) if loss_name == "dpo" else 1.0
        expected = jax.tree.map(
            lambda e, gw, gl: e - beta * weight * (gw - gl) / PAIRS, expected, grad_logp["chosen"], grad_logp["rejected"]
        )
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_dpo_and_unweighted_gradients_differ_by_the_sigma_weight():
    # Guard against the closed-form test passing trivially: the weight must matter here.
    graphdef, params = make_model(tiny_config())
    ref_params, batch = perturbed(params, scale=0.3), random_batch()
    grads = {
        name: jax.grad(lambda p: step.make_loss_fn(graphdef, name, losses.LossParams(beta=0.5), 128)(p, ref_params, batch)[0])(params)
        for name in ("dpo", "unweighted")
    }
    difference = jax.tree.map(lambda a, b: jnp.abs(a - 0.5 * b).max(), grads["dpo"], grads["unweighted"])
    assert max(jax.tree.leaves(difference)) > 1e-4


def make_step(config, graphdef, loss_name="dpo", grad_accum_steps=1):
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.dpo)
    loss_fn = step.make_loss_fn(graphdef, loss_name, losses.LossParams(beta=0.1), 128)
    return tx, step.make_train_step(loss_fn, tx, schedule, grad_accum_steps)


def test_reference_params_frozen_and_outside_optimizer_state():
    config = tiny_config()
    graphdef, params = make_model(config)
    ref_params = jax.tree.map(jnp.copy, params)
    ref_before = jax.tree.map(np.asarray, ref_params)
    tx, train_step = make_step(config, graphdef)
    state = step.TrainState.create(params, tx)
    for i in range(3):
        state, metrics = train_step(state, ref_params, random_batch(i))
    assert int(state.step) == 3
    for before, after in zip(jax.tree.leaves(ref_before), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(before, np.asarray(after))
    # The policy did move away from its (equal) start.
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, ref_params)
    assert max(jax.tree.leaves(moved)) > 0
    # The optimizer state holds one slot per policy leaf only: nothing shaped like an extra copy.
    num_params = len(jax.tree.leaves(params))
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if jnp.ndim(x) > 0]
    assert len(opt_leaves) == num_params  # RMSprop: one accumulator per policy param, none for π_ref
    assert set(metrics) >= {"loss", "grad_norm", "learning_rate", "rewards/accuracies", "logps/chosen"}


def test_each_batch_type_trains_in_micro_batches_and_evaluates_by_weight():
    """The step takes every layout's batch type (data.collate's), split into micro-batches over its pytree: paired
    rows in 2 micro-batches, and shared-prompt rows in 2, train to the params and metrics of the paired batch in one;
    unpaired (KTO) rows train and evaluate by weight; anything else is refused by name."""
    config = tiny_config()
    graphdef, params = make_model(config)
    ref_params = perturbed(params)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, VOCAB, n).astype(np.int32)  # noqa: E731
    pairs = [{"prompt": ids(3), "chosen": ids(1 + i % 3), "rejected": ids(2)} for i in range(4)]
    unpaired = [{"prompt": e["prompt"], "completion": e["chosen"], "label": i % 2 == 0} for i, e in enumerate(pairs)]
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.dpo)
    trained = {}
    for name, loss_name, examples, layout, batch_type, grad_accum_steps in (
        ("large batch", "dpo", pairs, data.Layout(), data.PairedBatch, 1),
        ("paired", "dpo", pairs, data.Layout(), data.PairedBatch, 2),
        ("shared_prompt", "dpo", pairs, data.Layout("shared_prompt"), data.SharedPromptBatch, 2),
        ("unpaired", "kto", unpaired, data.Layout(), data.UnpairedBatch, 2),
    ):
        batch = data.collate(examples, (16,), 0, layout=layout)
        assert type(batch) is batch_type, name
        loss_fn = step.make_loss_fn(graphdef, loss_name, losses.LossParams(beta=0.1), 128)
        train_step = step.make_train_step(loss_fn, tx, schedule, grad_accum_steps)
        state, metrics = train_step(step.TrainState.create(jax.tree.map(jnp.copy, params), tx), ref_params, batch)
        assert int(state.step) == 1 and float(metrics["skipped"]) == 0 and np.isfinite(metrics["loss"]), name
        trained[name] = state.params, metrics
    for name in ("paired", "shared_prompt"):
        for got, want in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(trained["large batch"])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    weighted = batch.replace(weight=np.array([1, 1, 1, 0], np.float32))
    means, weight_sum = jax.jit(step.make_eval_step(loss_fn))(params, ref_params, weighted)
    assert float(weight_sum) == 3 and np.isfinite(means["loss"])
    with pytest.raises(ValueError, match="eval_step takes a batch with `weight`"):
        step.make_eval_step(loss_fn)(params, ref_params, batch)
    with pytest.raises(ValueError, match=r"needs π_ref: pass ref_params, \(unpaired batches carry no cached"):
        loss_fn(params, None, batch)
    with pytest.raises(TypeError, match="PairedBatch, data.SharedPromptBatch or data.UnpairedBatch, got dict"):
        loss_fn(params, ref_params, {"chosen_tokens": np.zeros((4, 16), np.int32)})


def test_learning_rate_schedule_warmup_then_constant_or_cosine():
    constant = optimizer.learning_rate_schedule(1.0, 10, 100, "constant")
    cosine = optimizer.learning_rate_schedule(1.0, 10, 100, "cosine")
    assert float(constant(0)) == 0.0 and float(constant(5)) == pytest.approx(0.5)
    assert float(constant(10)) == pytest.approx(1.0) and float(constant(99)) == pytest.approx(1.0)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(100)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_changes_neither_params_nor_optimizer_state(poison):
    """The step advances (its batch is consumed), `skipped` is 1, and every param and optimizer slot is bitwise
    what it was; the next finite step updates as usual."""
    config = tiny_config()
    graphdef, params = make_model(config)
    loss_fn = step.make_loss_fn(graphdef, "dpo", losses.LossParams(beta=0.1), 128)

    def poisoned_loss_fn(params, ref_params, batch_and_poison, loss_state):
        batch, poison_now = batch_and_poison
        loss, (metrics, loss_state) = loss_fn(params, ref_params, batch, loss_state)
        nan = jnp.where(poison_now, jnp.nan, 0.0)
        if poison == "loss":  # a NaN loss whose gradient stays finite
            return loss + jax.lax.stop_gradient(nan), ({**metrics, "loss": metrics["loss"] + nan}, loss_state)
        return loss + nan * jax.tree.leaves(params)[0].sum(), (metrics, loss_state)  # finite loss, NaN gradient

    tx, schedule = optimizer.make_optimizer(config.optimizer, config.dpo)
    train_step = step.make_train_step(poisoned_loss_fn, tx, schedule)
    ref_params = perturbed(params)
    state = step.TrainState.create(jax.tree.map(jnp.copy, params), tx)
    state, _ = train_step(state, ref_params, (random_batch(0), jnp.array(False)))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = train_step(state, ref_params, (random_batch(1), jnp.array(True)))
    assert int(state.step) == 2 and float(metrics["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, metrics = train_step(state, ref_params, (random_batch(2), jnp.array(False)))
    assert float(metrics["skipped"]) == 0.0
    assert not np.array_equal(jax.tree.leaves(before[0])[0], np.asarray(jax.tree.leaves(state.params)[0]))


def remat_model(family, remat):
    fixture = models.read_hf_config(os.path.join(os.path.dirname(__file__), "fixtures", "hf", family))
    return split_params(model_from_config(dataclasses.replace(fixture, remat=remat), nnx.Rngs(0)))


def loss_and_grad(graphdef, params):
    loss_fn = step.make_loss_fn(graphdef, "dpo", losses.LossParams(beta=0.1), 128)
    return jax.value_and_grad(lambda p: loss_fn(p, perturbed(params), random_batch(0))[0])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_remat_wraps_every_block_of_every_family(family):
    counts = {}
    for remat in ("none", "block", "full"):
        graphdef, params = remat_model(family, remat)
        jaxpr = str(jax.make_jaxpr(loss_and_grad(graphdef, params))(params))
        counts[remat] = jaxpr.count("remat")  # jax.checkpoint's primitive; the chunked log-probs always have it
    assert counts["block"] == counts["full"] == counts["none"] + 2 * 2  # 2 layers, forward of policy and reference


def test_remat_recomputes_the_same_loss_and_gradient():
    """Rematerialising each block (keeping its matmuls, or nothing) changes memory, not the numbers."""
    results = {}
    for remat in ("none", "block", "full"):
        graphdef, params = remat_model("llama", remat)
        results[remat] = jax.jit(loss_and_grad(graphdef, params))(params)
    for remat in ("block", "full"):
        np.testing.assert_allclose(results[remat][0], results["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results["none"][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_log_probs_and_loss():
    """Compute in bfloat16 (as on TPU/GPU), π_ref stored in bfloat16: params stay float32, log-probs and the loss are
    float32 and close to the float32 run's."""
    fixture = models.read_hf_config(os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama"))
    graphdef, params = split_params(model_from_config(fixture, nnx.Rngs(0)))
    bf16_graphdef, _ = models.abstract_model(dataclasses.replace(fixture, dtype="bfloat16"))
    ref_params = perturbed(params)
    ref_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ref_params)
    batch = random_batch(0)
    loss32, (metrics32, _) = jax.jit(step.make_loss_fn(graphdef, "dpo", losses.LossParams(beta=0.1), 128))(
        params, ref_params, batch)
    loss16, (metrics16, _) = jax.jit(step.make_loss_fn(bf16_graphdef, "dpo", losses.LossParams(beta=0.1), 128))(
        params, ref_bf16, batch)
    assert loss16.dtype == metrics16["logps/chosen"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_allclose(loss16, loss32, atol=2e-2)
    np.testing.assert_allclose(metrics16["logps/chosen"], metrics32["logps/chosen"], rtol=2e-2)
    assert float(loss16) != float(loss32)  # it did compute in bfloat16
