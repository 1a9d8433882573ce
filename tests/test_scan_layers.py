"""scan_layers: blocks stacked into one lax.scan compute what unrolled blocks compute, for every family, from the same
initialisation, and everything that touches params works in both forms: Hugging Face import/export, partition rules
(on an 8-device CPU mesh, in a subprocess), KV-cache decoding, and checkpoints of one form restoring into the other.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_scan_layers.py mesh OUT_DIR   (the mesh part)
"""

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import HF_FIXTURES, interrupt_stage_at, make_short_config
from dpo_jax import build, checkpoint, export, models, run, sharding
from dpo_jax.sampling import generate
from dpo_jax.step import TrainState
from test_models import TINY_FAMILIES, VOCAB

FAMILIES = {**TINY_FAMILIES, "qwen2": {**TINY_FAMILIES["qwen2"], "sliding_window": 2, "sliding_window_layers": [1]},
            # layers of different types in one scan: each step gets its layer's window and rotary frequencies
            "gemma2": {**TINY_FAMILIES["gemma2"], "layer_types": ("sliding_attention", "full_attention", "sliding_attention")},
            "gemma3": {**TINY_FAMILIES["gemma3"], "layer_types": ("full_attention", "sliding_attention", "full_attention")}}
NUM_LAYERS = 3
TOKENS = jax.random.randint(jax.random.key(1), (2, 8), 0, VOCAB)
# Two packed sequences a row, the second a prompt with two branches (as shared-prompt rows are laid out).
POSITIONS = jnp.array([[0, 1, 2, 0, 1, 2, 2, 3]] * 2)
SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * 2)
BRANCHES = jnp.array([[0, 0, 0, 0, 0, 1, 2, 2]] * 2)


def both_forms(family, **overrides):
    """{scan_layers: (config, graphdef, params)} of one tiny random model in either form, each initialised anew."""
    forms = {}
    for scan_layers in (False, True):
        fields = {**FAMILIES[family], "num_layers": NUM_LAYERS, **overrides, "scan_layers": scan_layers}
        config = models.make_config(family, **fields)
        forms[scan_layers] = (config, *models.split_params(models.model_from_config(config, nnx.Rngs(0))))
    return forms


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@functools.lru_cache(maxsize=None)
def logits_and_grads_fn(graphdef):
    """Jitted (params) -> (logits of packed rows with branches, grads of a scalar of them), one compile per model."""

    def logits(params):
        hidden, logits_fn = models.apply_model(graphdef, params, TOKENS, POSITIONS, SEGMENTS, BRANCHES)
        return logits_fn(hidden)

    return jax.jit(lambda params: (logits(params), jax.grad(lambda p: jnp.std(logits(p)))(params)))


@functools.partial(jax.jit, static_argnums=0)
def full_logits(graphdef, params, tokens_BxT):
    """float32 logits [B, T, V] of one forward pass."""
    hidden, logits_fn = models.apply_model(graphdef, params, tokens_BxT)
    return logits_fn(hidden)


def test_scan_layers_is_auto_from_eight_layers_and_recorded_resolved():
    config = functools.partial(models.make_config, "llama", **{**FAMILIES["llama"], "num_layers": 7})
    assert not config().scan_layers and config(num_layers=8).scan_layers
    assert not config(num_layers=8, scan_layers=False).scan_layers and config(scan_layers=True).scan_layers
    assert models.config_to_dict(config(num_layers=8))["scan_layers"] is True  # a checkpoint records the form
    old_meta = {k: v for k, v in models.config_to_dict(config(num_layers=8)).items() if k != "scan_layers"}
    assert models.config_from_dict(old_meta).scan_layers  # metadata of older runs: auto
    with pytest.raises(ValueError, match=r"LlamaConfig\.scan_layers must be None"):
        config(scan_layers="yes")
    gpt2 = functools.partial(models.make_config, "gpt2", **{**FAMILIES["gpt2"], "num_layers": 8},
                             scale_attn_by_inverse_layer_idx=True)
    assert not gpt2().scan_layers  # each layer's own attention scale: auto keeps the blocks unrolled
    with pytest.raises(ValueError, match=r"GPT2Config\.scan_layers=True is not supported with scale_attn_by_inverse"):
        gpt2(scan_layers=True)
    with pytest.raises(ValueError, match=r"LlamaConfig\.remat must be one of"):
        config(remat="some")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stacked_blocks_start_from_the_unrolled_weights_and_compute_the_same_logits(family):
    forms = both_forms(family)
    unrolled_config, unrolled_graphdef, unrolled = forms[False]
    stacked_config, stacked_graphdef, stacked = forms[True]
    blocks = models.blocks_name(family)
    assert all(isinstance(k, int) for k in unrolled[blocks]) and not any(isinstance(k, int) for k in stacked[blocks])
    assert all(leaf.shape[0] == NUM_LAYERS for leaf in jax.tree.leaves(stacked[blocks]))
    # The same initialisation, slice i being block i; the conversions are exact both ways.
    converted, converted_config = models.to_form(unrolled, unrolled_config, scan_layers=True)
    assert converted_config == stacked_config
    assert_trees_equal(converted, stacked)
    assert_trees_equal(models.to_form(stacked, stacked_config, scan_layers=False)[0], unrolled)

    logits, grads = logits_and_grads_fn(unrolled_graphdef)(unrolled)
    scanned_logits, scanned_grads = logits_and_grads_fn(stacked_graphdef)(stacked)
    # Not bitwise: XLA fuses a loop body differently from straight-line code (measured differences ≤ 1e-7).
    np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-6)
    scanned_grads = models.to_form(scanned_grads, stacked_config, scan_layers=False)[0]
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", ["block", "full"])
def test_remat_policies_apply_inside_the_scan(remat):
    config, graphdef, params = both_forms("llama", remat=remat)[True]
    _, plain_graphdef, _ = both_forms("llama")[True]

    def jaxpr(graphdef):
        return str(jax.make_jaxpr(lambda p: models.apply_model(graphdef, p, TOKENS)[0])(params))

    assert "scan[" in jaxpr(graphdef) and "remat" in jaxpr(graphdef)  # each scanned block rematerialised
    assert "remat" not in jaxpr(plain_graphdef)
    logits, _ = logits_and_grads_fn(graphdef)(params)
    np.testing.assert_array_equal(logits, logits_and_grads_fn(plain_graphdef)(params)[0])


@pytest.mark.parametrize("name", ["gpt2", "gptj", "gpt_neox", "llama3", "qwen2", "mistral", "qwen3", "gemma2",
                                  "gemma3", "phi3"])
def test_hugging_face_checkpoints_load_stacked(name):
    """Each layer's tensors load into its slice, and the logits are transformers' (test_hf.py saves stacked)."""
    directory = os.path.join(HF_FIXTURES, name)
    _, unrolled, config = models.load_hf(directory)
    graphdef, stacked, stacked_config = models.load_hf(directory, scan_layers=True)
    assert not config.scan_layers and stacked_config == dataclasses.replace(config, scan_layers=True)
    assert_trees_equal(stacked, models.to_form(unrolled, config, scan_layers=True)[0])
    with np.load(os.path.join(directory, "golden.npz")) as golden:  # transformers' logits, as test_hf compares
        tokens, expected = golden["tokens"], golden["logits"]
    np.testing.assert_allclose(full_logits(graphdef, stacked, tokens), expected, atol=1e-4)


def test_partition_rules_keep_the_layer_axis_of_stacked_params_and_slots_unsharded():
    config, _, params = both_forms("llama")[True]
    state = jax.eval_shape(lambda p: TrainState.create(p, optax.adam(1e-3)), params)
    specs = {sharding.path_string(k): s for k, s in jax.tree_util.tree_flatten_with_path(
        sharding.partition_specs(state, "llama"))[0]}
    assert specs["params/layers/self_attn/q_proj/kernel"] == sharding.P(None, "fsdp", "tensor")
    assert specs["params/layers/mlp/down_proj/kernel"] == sharding.P(None, "tensor", "fsdp")
    assert specs["params/layers/input_layernorm/scale"] == sharding.P(None)
    assert specs["opt_state/0/nu/layers/self_attn/q_proj/kernel"] == sharding.P(None, "fsdp", "tensor")
    assert specs["params/embed_tokens/embedding"] == sharding.EMBEDDING  # outside the blocks: as before
    unrolled = {sharding.path_string(k): s for k, s in jax.tree_util.tree_flatten_with_path(
        sharding.partition_specs(both_forms("llama")[False][2], "llama"))[0]}
    assert unrolled["layers/1/self_attn/q_proj/kernel"] == sharding.COLUMN
    for family in FAMILIES:  # every family's rules cover its stacked params
        sharding.partition_specs(both_forms(family)[True][2], family)


def mesh_main(out_dir):
    """On 8 CPU devices: a scanned model's loss and gradients on meshes fsdp=8 and data2×fsdp2×tensor2 equal one
    device's, its stacked params are sharded with the layer axis whole, and greedy decoding with the stacked KV cache
    on the mesh gives one device's tokens. Writes OUT_DIR/mesh.json."""
    config = models.make_config("llama", **{**FAMILIES["llama"], "num_layers": 8, "hidden_size": 64, "head_dim": 16,
                                            "intermediate_size": 128})
    assert config.scan_layers
    graphdef, params = models.split_params(models.model_from_config(config, nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (8, 8), 0, VOCAB)
    prompts, lengths = tokens[:, :4], jnp.array([4, 3, 2, 1] * 2)

    def loss(params, tokens):
        hidden, logits_fn = models.apply_model(graphdef, params, tokens)
        return -jnp.mean(jax.nn.log_softmax(logits_fn(hidden))[..., 0])

    value, grads = jax.jit(jax.value_and_grad(loss))(params, tokens)
    decoded = generate(graphdef, params, prompts, lengths, max_new_tokens=4, eos_id=-1, pad_id=0, rng=jax.random.key(0))
    found = {}
    for name, axes in {"fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}.items():
        mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, axes)))
        shardings = sharding.tree_shardings(params, "llama", mesh)
        placed = jax.device_put(params, shardings)
        step = jax.jit(jax.value_and_grad(loss), out_shardings=(sharding.replicated(mesh), shardings))
        mesh_value, mesh_grads = step(placed, jax.device_put(tokens, sharding.batch_sharding(mesh)))
        mesh_decoded = generate(graphdef, placed, prompts, lengths, max_new_tokens=4, eos_id=-1, pad_id=0,
                                rng=jax.random.key(0), mesh=mesh)
        kernel = mesh_grads["layers"]["self_attn"]["q_proj"]["kernel"][...]
        found[name] = {
            "loss_diff": abs(float(mesh_value) - float(value)),
            "grad_diff": max(float(jnp.abs(a - b).max())
                             for a, b in zip(jax.tree.leaves(mesh_grads), jax.tree.leaves(grads))),
            "q_proj_spec": [list(a) if isinstance(a, tuple) else a for a in kernel.sharding.spec],
            "q_proj_shard_shape": list(kernel.addressable_shards[0].data.shape),
            "decoded_equal": bool((np.asarray(mesh_decoded.tokens) == np.asarray(decoded.tokens)).all()),
        }
    with open(os.path.join(out_dir, "mesh.json"), "w") as f:
        json.dump(found, f)


def test_stacked_params_shard_and_decode_on_an_eight_device_mesh(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, os.path.abspath(__file__), "mesh", str(tmp_path)], env=env, check=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)))
    with open(tmp_path / "mesh.json") as f:
        found = json.load(f)
    # q_proj's kernel is [L, D, H·K] = [8, 64, 64]: D over fsdp, H·K over tensor, the layer axis whole.
    for name, shard_shape in {"fsdp8": [8, 8, 64], "data2_fsdp2_tensor2": [8, 32, 32]}.items():
        assert found[name]["loss_diff"] < 1e-5 and found[name]["grad_diff"] < 1e-5, found[name]  # sums reordered
        assert found[name]["q_proj_spec"] == [None, "fsdp", "tensor"]
        assert found[name]["q_proj_shard_shape"] == shard_shape
        assert found[name]["decoded_equal"]


def test_checkpoints_restore_into_the_other_form(tmp_path):
    """A train state (params and optimizer slots) saved unrolled restores stacked, and the reverse; π_ref's params
    (`load_final_params`) likewise."""
    forms = both_forms("llama")
    tx = optax.adam(1e-3)
    states = {}
    for scan_layers, (config, graphdef, params) in forms.items():
        state = TrainState.create(params, tx)
        grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)  # non-zero slots, so they are compared too
        updates, opt_state = tx.update(grads, state.opt_state, params)
        states[scan_layers] = state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                                            opt_state=opt_state)
    for saved_form in (False, True):
        workdir = str(tmp_path / f"saved_scan_{saved_form}")
        stage = checkpoint.StageCheckpoints(workdir, "sft", keep=1, max_save_failures=1)
        stage.save(1, states[saved_form], {"step": 1})
        stage.close()
        restored_form = not saved_form
        stage = checkpoint.StageCheckpoints(workdir, "sft", keep=1, max_save_failures=1)
        state, meta = stage.restore(checkpoint.abstract(states[restored_form]))
        stage.close()
        assert meta == {"step": 1}
        assert_trees_equal(state, states[restored_form])  # adam's slots are the same function of the same numbers
        params = checkpoint.load_final_params(workdir, "sft", models.abstract_model(forms[restored_form][0])[1])
        assert_trees_equal(params, states[restored_form].params)


def test_a_run_checkpointed_unrolled_resumes_scanned(tmp_path, monkeypatch, caplog):
    """The short run, killed after its step-2 SFT checkpoint with the blocks unrolled, resumes with them stacked
    (as a run of ≥ 8 layers written by older code resumes now), ends near the uninterrupted unrolled run, and
    exports (each layer's slice under its name) as the Hugging Face checkpoint those weights make."""

    class Interrupted(Exception):
        pass

    config = make_short_config()
    config.mode, config.model.scan_layers = "sft", False
    uninterrupted = str(tmp_path / "uninterrupted")
    run.train_and_evaluate(config, uninterrupted)
    resumed = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS["sft"], 3, Interrupted())
        with pytest.raises(Interrupted):
            run.train_and_evaluate(config, resumed)
    config.model.scan_layers = True
    with caplog.at_level(logging.INFO):
        run.train_and_evaluate(config, resumed)
    assert "sft: resumed from step 2" in caplog.text
    _, meta = checkpoint.read_meta(resumed, "sft", 5)
    assert meta["model"]["scan_layers"] is True
    model_config = models.config_from_dict(meta["model"])
    stacked = checkpoint.load_final_params(resumed, "sft", models.abstract_model(model_config)[1])
    expected = checkpoint.load_final_params(uninterrupted, "sft", models.abstract_model(model_config)[1])
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert export.export_checkpoint(resumed, str(tmp_path / "hf")) == ("sft", 5)
    _, exported, exported_config = models.load_hf(str(tmp_path / "hf"), scan_layers=True)
    assert exported_config == model_config
    assert_trees_equal(exported, stacked)


if __name__ == "__main__":
    command, target = sys.argv[1:]
    {"mesh": mesh_main}[command](target)
