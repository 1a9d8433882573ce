"""Shared Flax NNX decoder layers (Llama-style, no biases): RMSNorm, rotary embeddings, GQA attention, SwiGLU.

Shape suffixes: B batch, T sequence, D model width, H query heads, G key/value heads, R = H // G query heads
per key/value head, K head width, F MLP width. Params are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type
INIT = nnx.initializers.normal(stddev=0.02)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 (Llama's RMSNorm); returns the input's dtype."""

    def __init__(self, features: int, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Normalise over the last axis."""
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        inv_rms_BxTx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + self.eps)
        return (x32_BxTxD * inv_rms_BxTx1 * self.scale[...]).astype(x_BxTxD.dtype)


def apply_rotary(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split ("rotate_half") layout as in Hugging Face Llama.

    Pair (i, i + K/2) of each head is rotated by angle position · theta^(−2i/K), computed in float32.
    """
    head_dim = x_BxTxHxK.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    inv_freq_K2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxK2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_K2
    sin_BxTx1xK2 = jnp.sin(angles_BxTxK2)[:, :, None, :]
    cos_BxTx1xK2 = jnp.cos(angles_BxTxK2)[:, :, None, :]
    x1_BxTxHxK2, x2_BxTxHxK2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
    out_BxTxHxK = jnp.concatenate(
        [x1_BxTxHxK2 * cos_BxTx1xK2 - x2_BxTxHxK2 * sin_BxTx1xK2,
         x2_BxTxHxK2 * cos_BxTx1xK2 + x1_BxTxHxK2 * sin_BxTx1xK2],
        axis=-1,
    )
    return out_BxTxHxK.astype(x_BxTxHxK.dtype)


def _linear(in_features: int, out_features: int, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features, out_features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=INIT, rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings; softmax in float32.

    Sequences are right-padded, so the causal mask alone keeps real tokens from seeing padding.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
        rope_theta: float = 10000.0, dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
    ):
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must be positive and divide num_heads ({num_heads})"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.q_proj = _linear(hidden_size, num_heads * head_dim, dtype, rngs)
        self.k_proj = _linear(hidden_size, num_kv_heads * head_dim, dtype, rngs)
        self.v_proj = _linear(hidden_size, num_kv_heads * head_dim, dtype, rngs)
        self.o_proj = _linear(num_heads * head_dim, hidden_size, dtype, rngs)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """Attend causally over the sequence; returns [B, T, D]."""
        B, T, _ = x_BxTxD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        q_BxTxHxK = self.q_proj(x_BxTxD).reshape(B, T, H, K)
        k_BxTxGxK = self.k_proj(x_BxTxD).reshape(B, T, G, K)
        v_BxTxGxK = self.v_proj(x_BxTxD).reshape(B, T, G, K)
        q_BxTxHxK = apply_rotary(q_BxTxHxK, positions_BxT, self.rope_theta)
        k_BxTxGxK = apply_rotary(k_BxTxGxK, positions_BxT, self.rope_theta)

        # Query head h uses key/value head h // R (the Hugging Face repeat_kv order).
        q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
        scores_BxGxRxTxS = jnp.einsum(
            "btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxTxGxK, preferred_element_type=jnp.float32
        ) * (K ** -0.5)
        causal_TxS = jnp.tril(jnp.ones((T, T), dtype=bool))
        scores_BxGxRxTxS = jnp.where(causal_TxS, scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
        probs_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxTxGxK.dtype)
        out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", probs_BxGxRxTxS, v_BxTxGxK)
        return self.o_proj(out_BxTxGxRxK.reshape(B, T, H * K))


class SwiGLUMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), the Llama feed-forward block."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        self.gate_proj = _linear(hidden_size, intermediate_size, dtype, rngs)
        self.up_proj = _linear(hidden_size, intermediate_size, dtype, rngs)
        self.down_proj = _linear(intermediate_size, hidden_size, dtype, rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Apply the gated MLP; returns [B, T, D]."""
        h_BxTxF = jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD)
        return self.down_proj(h_BxTxF)
