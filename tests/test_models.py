"""Tests for dpo_jax.models: every family's shapes and dtypes, tying, causality, GQA, rotary, masks, the registry.

Logits against transformers, Hugging Face import/export and packed rows are in test_hf.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import models
from dpo_jax.models import MODEL_FAMILIES, apply_model, create_model, family_names, split_params
from dpo_jax.models import layers
from dpo_jax.models.llama import Llama, LlamaAttention, LlamaConfig

VOCAB = 32
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=64)
# A tiny random model of every family (fields each family's config names differently stay family-specific).
TINY_FAMILIES = {
    "llama": TINY,
    "qwen2": TINY,
    "mistral": {**TINY, "sliding_window": 3},
    "gpt2": dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=16),
    "gptj": dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, rotary_dim=4),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "qwen3": {**TINY, "sliding_window": 3, "sliding_window_layers": (1,)},
    "phi3": {**TINY, "sliding_window": 3},
    # Soft-caps that bite on random weights, a window on the sliding layers, two rotary bases (Gemma 3).
    "gemma2": {**TINY, "layer_types": ("sliding_attention", "full_attention"), "sliding_window": 3,
               "attn_logit_softcap": 0.5, "final_logit_softcap": 0.2, "query_pre_attn_scalar": 6},
    "gemma3": {**TINY, "layer_types": ("full_attention", "sliding_attention"), "sliding_window": 3,
               "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
}


def tiny_model(family="llama", **overrides):
    return create_model(family, nnx.Rngs(0), **{**TINY_FAMILIES[family], **overrides})


@nnx.jit
def forward(model, tokens):
    """(hidden, logits), jitted: eager op-by-op dispatch is several times slower on CPU."""
    hidden = model(tokens)
    return hidden, model.logits(hidden)


def random_tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def test_every_family_is_registered_and_tested():
    assert family_names() == sorted(TINY_FAMILIES) == [
        "gemma2", "gemma3", "gpt2", "gpt_neox", "gptj", "llama", "mistral", "phi3", "qwen2", "qwen3"]
    assert (MODEL_FAMILIES["llama"].config_class, MODEL_FAMILIES["llama"].model_class) == (LlamaConfig, Llama)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_dtypes_and_causality(family, dtype):
    model = tiny_model(family, dtype=dtype)
    tokens = random_tokens((2, 8))
    hidden, logits = forward(model, tokens)
    assert hidden.shape == (2, 8, 32) and hidden.dtype == jnp.dtype(dtype)
    assert logits.shape == (2, 8, VOCAB) and logits.dtype == jnp.float32
    _, params = split_params(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    if dtype == "float32":  # changing token t leaves every earlier position's hidden state untouched
        t = 5
        changed_hidden, _ = forward(model, tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(hidden[:, :t], changed_hidden[:, :t])
        assert not np.allclose(hidden[:, t:], changed_hidden[:, t:])


@pytest.mark.parametrize("family, head", [("llama", "lm_head"), ("gpt2", "lm_head"), ("gpt_neox", "embed_out")])
def test_tied_vs_untied(family, head):
    untied, tied = tiny_model(family, tie_embeddings=False), tiny_model(family, tie_embeddings=True)
    assert head in split_params(untied)[1] and head not in split_params(tied)[1]
    hidden, logits = forward(tied, random_tokens((2, 5)))
    embedding = {"llama": "embed_tokens", "gpt2": "wte", "gpt_neox": "embed_in"}[family]
    np.testing.assert_allclose(logits, hidden @ getattr(tied, embedding).embedding[...].T, rtol=1e-5, atol=1e-6)


def test_gpt2_position_past_its_table_is_nan_not_a_wrong_row():
    model = tiny_model("gpt2")  # a 16-position table
    tokens = random_tokens((1, 3))
    assert np.isfinite(np.asarray(model(tokens, positions_BxT=jnp.array([[0, 1, 15]])))).all()
    assert np.isnan(np.asarray(model(tokens, positions_BxT=jnp.array([[0, 1, 16]]))[0, 2])).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_model(num_kv_heads=3)
    with pytest.raises(ValueError, match="GPT2Config.num_heads"):
        tiny_model("gpt2", num_heads=5)
    with pytest.raises(ValueError, match="GPTJConfig.rotary_dim"):
        tiny_model("gptj", rotary_dim=3)
    with pytest.raises(ValueError, match="GPTNeoXConfig.rotary_pct"):
        tiny_model("gpt_neox", rotary_pct=1.5)
    with pytest.raises(ValueError, match="MistralConfig.sliding_window"):
        tiny_model("mistral", sliding_window=0)
    with pytest.raises(ValueError, match="activation"):
        tiny_model(activation="gelu_fancy")
    with pytest.raises(ValueError, match="rope_type"):
        tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = LlamaAttention(LlamaConfig(**TINY), rngs=nnx.Rngs(0))
    mha = LlamaAttention(LlamaConfig(**{**TINY, "num_kv_heads": 4}), rngs=nnx.Rngs(1))
    mha.q_proj.kernel[...] = gqa.q_proj.kernel[...]
    mha.o_proj.kernel[...] = gqa.o_proj.kernel[...]
    for name in ("k_proj", "v_proj"):  # kv head g serves query heads 2g, 2g+1
        kernel_DxGxK = getattr(gqa, name).kernel[...].reshape(32, 2, 8)
        getattr(mha, name).kernel[...] = jnp.repeat(kernel_DxGxK, 2, axis=1).reshape(32, 32)
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    mask = layers.attention_mask(positions, jnp.zeros((2, 6), jnp.int32))
    call = nnx.jit(LlamaAttention.__call__)
    np.testing.assert_allclose(call(gqa, x, positions, mask, None)[0], call(mha, x, positions, mask, None)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_relative_position(interleaved):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    inv_freq = layers.rotary_inv_freq(8, 10000.0)

    def rotate(x, position):
        return layers.apply_rotary(x, jnp.array([[position]]), inv_freq, interleaved=interleaved)

    def score(m, n):
        return float(jnp.sum(rotate(q, m) * rotate(k, n)))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
    assert score(3, 1) == pytest.approx(score(102, 100), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-4)
    # Position 0 is the identity, and rotation preserves norms.
    np.testing.assert_allclose(rotate(q, 0), q, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 7)), jnp.linalg.norm(q), rtol=1e-5)


def test_partial_rotary_leaves_the_other_dims_alone():
    x = jax.random.normal(jax.random.key(0), (1, 1, 2, 8))
    for interleaved in (False, True):
        out = layers.apply_rotary(x, jnp.array([[5]]), layers.rotary_inv_freq(4, 10000.0), interleaved=interleaved)
        np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
        assert not np.allclose(out[..., :4], x[..., :4])


def test_llama3_rope_scaling_keeps_short_divides_long_and_smooths_between():
    base = layers.rotary_inv_freq(8, 10000.0)  # wavelengths 6.3, 63, 628, 6283
    scaling = layers.RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64)
    scaled = layers.rotary_inv_freq(8, 10000.0, scaling)
    assert scaled[0] == base[0]  # wavelength 6.3 < 64 / 4: kept
    np.testing.assert_allclose(scaled[2:], base[2:] / 8)  # wavelengths > 64: divided by the factor
    smooth = (64 / (2 * np.pi / base[1]) - 1) / 3
    np.testing.assert_allclose(scaled[1], (1 - smooth) * base[1] / 8 + smooth * base[1], rtol=1e-6)
    np.testing.assert_allclose(layers.rotary_inv_freq(8, 10000.0, layers.RopeScaling("linear", factor=2.0)), base / 2)


def test_attention_mask_segments_and_window():
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3]])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
    mask = np.asarray(layers.attention_mask(positions, segments)[0, 0])
    expected = np.zeros((7, 7), bool)
    expected[:3, :3] = np.tril(np.ones((3, 3), bool))
    expected[3:, 3:] = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(mask, expected)
    windowed = np.asarray(layers.attention_mask(positions, segments, sliding_window=2)[0, 0])
    np.testing.assert_array_equal(windowed, expected & (np.abs(positions.T - positions) < 2))
    assert windowed[6].tolist() == [False] * 5 + [True, True]  # the window holds the 2 latest positions


def test_mistral_window_limits_what_a_token_sees():
    model = tiny_model("mistral")  # window 3
    tokens = random_tokens((1, 8))
    hidden, _ = forward(model, tokens)
    # Token 7 sees positions 5..7 in layer 1, so up to 3 more through layer 0 (positions 3..7): position 2 is out.
    changed, _ = forward(model, tokens.at[0, 2].set((tokens[0, 2] + 1) % VOCAB))
    np.testing.assert_array_equal(hidden[0, 7], changed[0, 7])
    assert not np.allclose(hidden[0, 4], changed[0, 4])


def test_split_params_and_apply_model():
    model = tiny_model()
    graphdef, params = split_params(model)
    assert all(isinstance(v, nnx.Param)
               for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    tokens = random_tokens((2, 6))

    @jax.jit
    def pure_forward(params, tokens):
        hidden, logits_fn = apply_model(graphdef, params, tokens)
        # Chunked use, as logprobs.py does: logits for each half separately.
        return hidden, jnp.concatenate([logits_fn(hidden[:, :3]), logits_fn(hidden[:, 3:])], axis=1)

    hidden, logits = pure_forward(params, tokens)
    expected_hidden, expected_logits = forward(model, tokens)
    np.testing.assert_allclose(hidden, expected_hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: pure_forward(p, tokens)[1].sum())(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # The abstract model has the same structure, shapes and dtypes, without allocating anything.
    abstract_graphdef, abstract = models.abstract_model(model.config)
    assert abstract_graphdef == graphdef
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), params)


def test_config_dict_round_trip():
    config = tiny_model("qwen2", rope_scaling={"rope_type": "llama3", "factor": 8.0}, sliding_window=4,
                        sliding_window_layers=[1]).config
    recorded = models.config_to_dict(config)
    assert recorded["family"] == "qwen2" and recorded["rope_scaling"]["rope_type"] == "llama3"
    assert models.config_from_dict(recorded) == config
    assert config.layer_window(0) is None and config.layer_window(1) == 4
    assert models.family_of(dataclasses.replace(config)).name == "qwen2"


def test_create_model_errors():
    with pytest.raises(ValueError, match="gpt5.*llama"):
        create_model("gpt5", nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match="num_layer_count.*num_layers"):
        create_model("llama", nnx.Rngs(0), num_layer_count=2, **TINY)
    missing = {k: v for k, v in TINY.items() if k != "head_dim"}
    with pytest.raises(ValueError, match="head_dim"):
        create_model("llama", nnx.Rngs(0), **missing)
    with pytest.raises(ValueError, match="dtype"):
        tiny_model(dtype="float8")
