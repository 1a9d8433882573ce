"""Tests for dpo_jax.models: shapes, tying, causality, GQA, rotary, pure split/apply, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax.models import MODEL_FAMILIES, apply_model, create_model, family_names, split_params
from dpo_jax.models.layers import Attention, apply_rotary
from dpo_jax.models.llama import Llama, LlamaConfig

TINY = dict(vocab_size=32, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=64)


def tiny_model(**overrides) -> Llama:
    return create_model("llama", nnx.Rngs(0), **{**TINY, **overrides})


@nnx.jit
def forward(model, tokens):
    """(hidden, logits), jitted: eager op-by-op dispatch is several times slower on CPU."""
    hidden = model(tokens)
    return hidden, model.logits(hidden)


def random_tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY["vocab_size"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
    model = tiny_model(dtype=dtype)
    hidden, logits = forward(model, random_tokens((2, 7)))
    assert hidden.shape == (2, 7, 32) and hidden.dtype == jnp.dtype(dtype)
    assert logits.shape == (2, 7, 32) and logits.dtype == jnp.float32
    _, params = split_params(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_tied_vs_untied():
    untied, tied = tiny_model(), tiny_model(tie_embeddings=True)
    assert "lm_head" in split_params(untied)[1]
    assert "lm_head" not in split_params(tied)[1]
    hidden, logits = forward(tied, random_tokens((2, 5)))
    expected = hidden @ tied.embed.embedding[...].T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_causal():
    model = tiny_model()
    tokens = random_tokens((2, 8))
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY["vocab_size"])
    (h0, _), (h1, _) = forward(model, tokens), forward(model, changed)
    np.testing.assert_array_equal(h0[:, :t], h1[:, :t])
    assert not np.allclose(h0[:, t:], h1[:, t:])


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_model(num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(32, 4, 3, 8, rngs=nnx.Rngs(0))


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = Attention(32, 4, 2, 8, rngs=nnx.Rngs(0))
    mha = Attention(32, 4, 4, 8, rngs=nnx.Rngs(1))
    mha.q_proj.kernel[...] = gqa.q_proj.kernel[...]
    mha.o_proj.kernel[...] = gqa.o_proj.kernel[...]
    for name in ("k_proj", "v_proj"):  # kv head g serves query heads 2g, 2g+1
        kernel_DxGxK = getattr(gqa, name).kernel[...].reshape(32, 2, 8)
        getattr(mha, name).kernel[...] = jnp.repeat(kernel_DxGxK, 2, axis=1).reshape(32, 32)
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    np.testing.assert_allclose(nnx.jit(Attention.__call__)(gqa, x, positions),
                               nnx.jit(Attention.__call__)(mha, x, positions), rtol=1e-5, atol=1e-6)


def test_rotary_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(m, n):
        qm = apply_rotary(q, jnp.array([[m]]), 10000.0)
        kn = apply_rotary(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(qm * kn))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
    assert score(3, 1) == pytest.approx(score(102, 100), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-4)
    # Position 0 is the identity, and rotation preserves norms.
    np.testing.assert_allclose(apply_rotary(q, jnp.array([[0]]), 10000.0), q, rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(apply_rotary(q, jnp.array([[7]]), 1e4)), jnp.linalg.norm(q),
                               rtol=1e-5)


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


def test_create_model_errors():
    assert MODEL_FAMILIES["llama"] == (LlamaConfig, Llama)
    assert family_names() == ["llama"]
    with pytest.raises(ValueError, match="gpt5.*llama"):
        create_model("gpt5", nnx.Rngs(0), **TINY)
    with pytest.raises(ValueError, match="num_layer_count.*num_layers"):
        create_model("llama", nnx.Rngs(0), num_layer_count=2, **TINY)
    missing = {k: v for k, v in TINY.items() if k != "head_dim"}
    with pytest.raises(ValueError, match="head_dim"):
        create_model("llama", nnx.Rngs(0), **missing)
    with pytest.raises(ValueError, match="dtype"):
        tiny_model(dtype="float8")
