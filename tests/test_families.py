"""The families added for issue 21 (Qwen3, Gemma 2, Gemma 3, Phi-3) beyond what test_hf / test_models / test_sampling /
test_scan_layers / test_packing check for every family: per-pair DPO log-probs equal transformers' in every batch
layout, the final soft-cap lives in the chunked logits function, Phi-3's fused tensors, per-layer rotary, and every
config.json value we do not implement is refused naming it.

Golden pairs: tests/fixtures/make_hf_fixtures.py stores transformers' float32 Σ log π(completion | prompt) of one
preference pair in each new fixture's golden.npz.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import HF_FIXTURES
from dpo_jax import data, logprobs, models, step
from dpo_jax.models import layers

NEW = ["qwen3", "gemma2", "gemma3", "phi3"]
LAYOUTS = {"plain": data.Layout(), "completion_only": data.Layout(completion_only=True),
           "shared_prompt": data.Layout("shared_prompt")}
TOLERANCE = 1e-4


def golden_pair(name):
    with np.load(os.path.join(HF_FIXTURES, name, "golden.npz")) as golden:
        example = {k: golden[f"pair_{k}"] for k in ("prompt", "chosen", "rejected")}
        return example, golden["pair_logps"]


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", NEW)
def test_pair_log_probs_equal_transformers_in_every_layout(name, scan_layers):
    """Σ log π(chosen | prompt) and Σ log π(rejected | prompt), each layout's batch (shared-prompt rows: rejected
    after chosen, on its own branch), within 1e-4 of transformers; chunk size 3 splits the completions."""
    graphdef, params, _ = models.load_hf(os.path.join(HF_FIXTURES, name), scan_layers=scan_layers)
    example, expected = golden_pair(name)
    pair_logps = jax.jit(step.make_pair_logps(graphdef, chunk_size=3))
    for layout_name, layout in LAYOUTS.items():
        batch = data.collate([example], data.length_buckets(16, pack=layout.pack), 0, layout=layout)
        (chosen, rejected), _ = pair_logps(params, batch)
        np.testing.assert_allclose([float(chosen[0]), float(rejected[0])], expected, rtol=0, atol=TOLERANCE,
                                   err_msg=layout_name)


def test_final_soft_cap_is_applied_per_chunk_by_the_logits_fn():
    """Gemma 2's logits_fn caps every chunk it is given (|logit| < cap); chunked token log-probs equal the
    log-softmax of transformers' capped logits."""
    graphdef, params, config = models.load_hf(os.path.join(HF_FIXTURES, "gemma2"))
    with np.load(os.path.join(HF_FIXTURES, "gemma2", "golden.npz")) as golden:
        tokens, expected_logits = golden["tokens"], golden["logits"]

    @jax.jit
    def run(params, tokens):
        hidden, logits_fn = models.apply_model(graphdef, params, tokens)
        return logits_fn(hidden[:, :7]), logprobs.token_logprobs(hidden, logits_fn, tokens, chunk_size=4)

    chunk_logits, token_logps = run(params, tokens)
    assert float(jnp.abs(chunk_logits).max()) < config.final_logit_softcap
    expected = jax.nn.log_softmax(expected_logits[:, :-1].astype(np.float64), axis=-1)
    expected = np.take_along_axis(np.asarray(expected), tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(token_logps, expected, atol=TOLERANCE)


def test_phi3_fused_tensors_split_on_load_and_fuse_on_export(tmp_path):
    directory = os.path.join(HF_FIXTURES, "phi3")
    stored = load_file(os.path.join(directory, "model.safetensors"))
    _, params, config = models.load_hf(directory)
    attention, mlp = params["layers"][1]["self_attn"], params["layers"][1]["mlp"]
    qkv = stored["model.layers.1.self_attn.qkv_proj.weight"]  # [q | k | v] rows, nn.Linear's [out, in]
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    np.testing.assert_array_equal(attention["q_proj"]["kernel"][...], qkv[:q_rows].T)
    np.testing.assert_array_equal(attention["v_proj"]["kernel"][...], qkv[q_rows + kv_rows:].T)
    gate_up = stored["model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(mlp["up_proj"]["kernel"][...], gate_up[config.intermediate_size:].T)
    # A fused tensor of the wrong size is reported as what it is, not silently sliced.
    broken = shutil.copytree(directory, tmp_path / "phi3")
    tensors = dict(stored)
    tensors["model.layers.0.mlp.gate_up_proj.weight"] = tensors["model.layers.0.mlp.gate_up_proj.weight"][:100]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"fused tensor 'model.layers.0.mlp.gate_up_proj.weight' has 100 rows"):
        models.load_hf(str(broken))


def test_gemma3_rotary_is_per_layer_type():
    """Sliding layers rotate with the local base, full layers with the global base and its scaling."""
    _, _, config = models.load_hf(os.path.join(HF_FIXTURES, "gemma3"))
    model = models.model_from_config(config, models.nnx.Rngs(0))
    assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    np.testing.assert_array_equal(model.layer_inputs(0)[0], layers.rotary_inv_freq(16, 1e6) / 4)
    np.testing.assert_array_equal(model.layer_inputs(1)[0], layers.rotary_inv_freq(16, 1e4))
    stacked = layers.per_layer_inv_freq(16, [config.layer_rope(i) for i in range(3)])
    np.testing.assert_array_equal(stacked[2], model.layer_inputs(2)[0])
    assert (config.layer_window(0), config.layer_window(1)) == (None, 5)


def edit_config(name, tmp_path, edit):
    directory = shutil.copytree(os.path.join(HF_FIXTURES, name), tmp_path / name)
    with open(directory / "config.json") as f:
        config = json.load(f)
    edit(config)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.mark.parametrize("name, edit, message", [
    ("phi3", lambda c: c.update(rope_parameters={
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 32}), r"rope_type 'longrope' is not supported"),
    ("qwen3", lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0,
                                                    original_max_position_embeddings=32),
     r"rope_type 'yarn' is not supported"),
    ("gemma3", lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="dynamic", factor=2.0),
     r"rope_type 'dynamic' is not supported"),
    ("gemma3", lambda c: c.update(use_bidirectional_attention=True), r"use_bidirectional_attention=True is not"),
    ("gemma3", lambda c: c.update(attn_logit_softcapping=20.0), r"attn_logit_softcapping=20.0 is not supported"),
    ("gemma2", lambda c: c.update(hidden_activation="gelu_fancy"), r"activation must be one of .* got 'gelu_fancy'"),
    ("phi3", lambda c: c.update(hidden_act="relu2"), r"activation must be one of .* got 'relu2'"),
    ("gemma2", lambda c: c.update(model_type="gemma"), r"model_type 'gemma' is not supported"),
])
def test_values_we_do_not_implement_are_refused_naming_them(name, edit, message, tmp_path):
    directory = edit_config(name, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        models.load_hf(directory)


def test_configs_without_a_checkpoint_form_are_refused_at_export(tmp_path):
    _, params, config = models.load_hf(os.path.join(HF_FIXTURES, "gemma2"))
    with pytest.raises(ValueError, match="has no Gemma 2 checkpoint form"):
        models.save_hf(params, dataclasses.replace(config, sliding_rope_theta=123.0), str(tmp_path / "a"))
    _, params, config = models.load_hf(os.path.join(HF_FIXTURES, "qwen3"))
    with pytest.raises(ValueError, match="has no Qwen3 checkpoint form"):
        models.save_hf(params, dataclasses.replace(config, mlp_bias=True), str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"Gemma3Config.layer_types must be None or 2 of"):
        models.make_config("gemma3", vocab_size=8, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=4, intermediate_size=8, layer_types=["sliding_attention"])
