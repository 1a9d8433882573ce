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

NEW = ["qwen3", "gemma2", "gemma3", "phi3", "gemma3_multimodal", "qwen3_yarn"]  # gemma3_multimodal: Gemma 3's
# image-text checkpoint; qwen3_yarn: YaRN rope scaling
LAYOUTS = {"plain": data.Layout(), "completion_only": data.Layout(completion_only=True),
           "shared_prompt": data.Layout("shared_prompt")}
TOLERANCE = 1e-4


def golden_pair(name):
    with np.load(os.path.join(HF_FIXTURES, name, "golden.npz")) as golden:
        example = {k: golden[f"pair_{k}"] for k in ("prompt", "chosen", "rejected")}
        return example, golden["pair_logps"]


@pytest.mark.parametrize("name, scan_layers", [(name, False) for name in NEW] + [("gemma3", True)])
def test_pair_log_probs_equal_transformers_in_every_layout(name, scan_layers):
    """Σ log π(chosen | prompt) and Σ log π(rejected | prompt), each layout's batch (shared-prompt rows: rejected
    after chosen, on its own branch), within 1e-4 of transformers; chunk size 3 splits the completions. Scanned:
    Gemma 3, whose layers differ by type (scanned = unrolled for every family is test_scan_layers')."""
    graphdef, params, _ = models.load_hf(os.path.join(HF_FIXTURES, name), scan_layers=scan_layers)
    example, expected = golden_pair(name)
    pair_logps = jax.jit(step.make_pair_logps(graphdef, chunk_size=3))
    for layout_name, layout in LAYOUTS.items():
        batch = data.collate([example], data.length_buckets(16, pack=layout.pack), 0, layout=layout)
        (chosen, rejected), _ = pair_logps(params, batch)
        np.testing.assert_allclose([float(chosen[0]), float(rejected[0])], expected, rtol=0, atol=TOLERANCE,
                                   err_msg=layout_name)
    # Packed: the pair twice in one row, each copy its own segment with positions from 0.
    packed = data.collate([example, example], (128,), 0, layout=data.Layout("packed"))
    assert packed.rows.tokens_BxT.shape[0] == 1
    (chosen, rejected), _ = pair_logps(params, packed)
    np.testing.assert_allclose(np.stack([chosen, rejected], axis=1), [expected, expected], rtol=0, atol=TOLERANCE,
                               err_msg="packed")


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
    ("qwen3_yarn", lambda c: c["rope_parameters"].update(mscale=0.7, mscale_all_dim=0.7),
     r"yarn with mscale=0.7, mscale_all_dim=0.7 is not supported"),
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


# config.json of two current models, as published (the dry run needs the architecture, not the weights).
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024,
    "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151645,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "max_position_embeddings": 32768, "rope_theta": 1000000, "rope_local_base_freq": 10000,
    "rope_scaling": None, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
    "rms_norm_eps": 1e-06, "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}


def decoder_params(vocab, hidden, layers_, heads, kv_heads, head_dim, ffn, norms_per_block, qk_norms):
    """Parameters of a tied-embedding gated-MLP decoder, counted by hand from its shapes."""
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    block = attention + 3 * hidden * ffn + norms_per_block * hidden + (2 * head_dim if qk_norms else 0)
    return vocab * hidden + layers_ * block + hidden


@pytest.mark.parametrize("config_json, name, num_params", [
    (QWEN3_0_6B, "Qwen3Config", decoder_params(151936, 1024, 28, 16, 8, 128, 3072, 2, True)),
    (GEMMA3_1B, "Gemma3Config", decoder_params(262144, 1152, 26, 4, 1, 256, 6912, 4, True)),
])
def test_the_dry_run_sizes_qwen3_and_gemma3_from_their_config_json(config_json, name, num_params, tmp_path):
    """configs/qwen3.py's accelerator recipe on a mesh of 8, with only config.json on disk: the parameter count
    is the hand count, and float32 params, RMSprop's slot and bfloat16 π_ref are split 8 ways (by the rules)."""
    from configs import qwen3
    from dpo_jax import dry_run

    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "config.json").write_text(json.dumps(config_json))
    config = qwen3.get_config()
    config.model.path = str(checkpoint_dir)
    config.mesh.update(fsdp=8, device_memory_gb=80.0)
    config.dry_run = True
    text = dry_run.report(config)
    assert f"{name} with {num_params:,} parameters, 64 pairs × 512 tokens" in text
    per_device = {key.strip(): float(value.split()[0]) for key, value in
                  (line.rsplit("  ", 1) for line in text.splitlines() if line.startswith("  "))}
    assert per_device["params (float32)"] == pytest.approx(4 * num_params / 8 / 2**30, abs=0.02)
    assert per_device["reference params (bfloat16)"] == pytest.approx(2 * num_params / 8 / 2**30, abs=0.02)


def test_the_qwen3_config_is_valid_in_both_variants():
    from configs import qwen3
    from dpo_jax.config import validate

    validate(qwen3.get_config())
    validate(qwen3.get_config("tiny"))
    with pytest.raises(ValueError, match="configs/qwen3.py: unknown argument 'big'"):
        qwen3.get_config("big")


def write_gemma3_gguf(path, edit=None):
    """The gemma3 fixture as llama.cpp's converter writes a Gemma 3 GGUF: its tensor names, every norm as w + 1, Q
    and K as they are (not permuted), no layer types / local base / query_pre_attn_scalar in the metadata;
    `edit(writer)` adds metadata."""
    import gguf

    source = os.path.join(HF_FIXTURES, "gemma3")
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["full_attention"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<pad>", "<eos>", "<bos>"] + [f"t{i}" for i in range(config["vocab_size"] - 3)])
    if edit is not None:
        edit(writer)
    for name, array in load_file(os.path.join(source, "model.safetensors")).items():
        shift = 1.0 if name.endswith("norm.weight") else 0.0
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), (array + shift).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_a_gemma3_gguf_loads_with_its_norms_shifted_q_k_as_stored_and_transformers_defaults(tmp_path):
    """The fixture written as a Gemma 3 GGUF loads to the fixture's weights (norms − 1 within float32 rounding,
    Q/K unpermuted); its config takes transformers' defaults for what the metadata lacks; with the fixture's own
    layer types and rotary (which the GGUF cannot state) the logits are transformers'."""
    path = write_gemma3_gguf(tmp_path / "tiny-gemma3.gguf")
    _, expected, fixture_config = models.load_hf(os.path.join(HF_FIXTURES, "gemma3"))
    _, params, config = models.load_hf(path)
    assert type(config).__name__ == "Gemma3Config" and config.query_pre_attn_scalar == 256
    assert config.layer_types == ("sliding_attention",) * 3  # Gemma3TextConfig's 5:1 pattern, cut to 3 layers
    assert (config.rope_theta, config.rope_scaling, config.sliding_rope_theta, config.sliding_window) == (
        1e6, None, 1e4, 5)
    for path_, got, want in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(params),
                                jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path_[0]))
    graphdef, _ = models.abstract_model(fixture_config)
    with np.load(os.path.join(HF_FIXTURES, "gemma3", "golden.npz")) as golden:
        tokens, logits = golden["tokens"], golden["logits"]
    hidden, logits_fn = models.apply_model(graphdef, params, tokens)
    np.testing.assert_allclose(logits_fn(hidden), logits, atol=TOLERANCE)


def test_the_text_part_of_a_gemma3_image_text_checkpoint_loads_and_exports_as_gemma3_text(tmp_path):
    """Gemma3ForConditionalGeneration's checkpoint (published names, a SigLIP tower): its language model loads
    (logits: test_hf), the tower is ignored, and the export is the text model alone, loading back bitwise."""
    directory = os.path.join(HF_FIXTURES, "gemma3_multimodal")
    _, params, config = models.load_hf(directory)
    assert type(config).__name__ == "Gemma3Config" and config.layer_types == ("sliding_attention", "full_attention")
    models.save_hf(params, config, str(tmp_path / "text"))
    with open(tmp_path / "text" / "config.json") as f:
        written = json.load(f)
    assert (written["model_type"], written["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    stored = load_file(os.path.join(directory, "model.safetensors"))
    exported = load_file(str(tmp_path / "text" / "model.safetensors"))
    assert sorted(exported) == sorted("model." + name.removeprefix("language_model.model.") for name in stored
                                      if name.startswith("language_model."))
    for name, array in exported.items():
        np.testing.assert_array_equal(array, stored["language_model." + name], err_msg=name)
    _, reloaded, reloaded_config = models.load_hf(str(tmp_path / "text"))
    assert reloaded_config == config


def test_yarn_blends_the_frequencies_and_scales_cos_and_sin():
    """YaRN (qwen3_yarn: factor 4 over an original context of 4096): the fastest dims kept, the slowest divided by
    4, a linear ramp between (transformers' formula by hand), and cos/sin × (0.1·ln 4 + 1), without which the
    logits are far from transformers'."""
    graphdef, params, config = models.load_hf(os.path.join(HF_FIXTURES, "qwen3_yarn"))
    scaling = config.rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == ("yarn", 4.0, 4096)
    base = layers.rotary_inv_freq(16, 10000.0)
    # correction dims: 16·ln(4096 / (2π·32)) / (2 ln 1e4) = 2.4 -> 2, and for 1 rotation 5.6 -> 6
    ramp = np.clip((np.arange(8) - 2) / (6 - 2), 0, 1)
    np.testing.assert_allclose(layers.rotary_inv_freq(16, 10000.0, scaling), base * (1 - ramp) + base / 4 * ramp,
                               rtol=1e-6)
    assert layers.rotary_attention_factor(scaling) == pytest.approx(0.1 * np.log(4) + 1)
    unscaled, _ = models.abstract_model(dataclasses.replace(
        config, rope_scaling=dataclasses.replace(scaling, attention_factor=1.0)))
    with np.load(os.path.join(HF_FIXTURES, "qwen3_yarn", "golden.npz")) as golden:
        tokens, expected = golden["tokens"], golden["logits"]
    hidden, logits_fn = models.apply_model(unscaled, params, tokens)
    assert float(np.abs(np.asarray(logits_fn(hidden)) - expected).max()) > 100 * TOLERANCE


def test_a_gemma3_gguf_sliding_window_pattern_sets_the_layer_types(tmp_path):
    """An int pattern N (every N-th layer global) as transformers reads it; llama.cpp's per-layer list form is
    refused naming the key."""
    path = write_gemma3_gguf(tmp_path / "pattern2.gguf", lambda writer: writer.add_sliding_window_pattern(2))
    assert models.read_hf_config(path).layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    listed = write_gemma3_gguf(tmp_path / "listed.gguf",
                               lambda writer: writer.add_array("gemma3.attention.sliding_window_pattern", [True] * 3))
    with pytest.raises(ValueError, match=r"gemma3.attention.sliding_window_pattern = \[True, True, True\] is not supported"):
        models.read_hf_config(listed)
