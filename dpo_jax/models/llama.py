"""Llama-family decoder (pre-norm, RMSNorm, rotary, grouped-query attention, SwiGLU, no biases).

Submodule names follow Hugging Face's LlamaForCausalLM (q_proj, gate_proj, ...) so a weight importer
is a short name map. The module holds only `nnx.Param` state: `nnx.split(model, nnx.Param)` is exhaustive.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models.layers import INIT, Attention, RMSNorm, SwiGLUMLP

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder; `dtype` names the compute dtype (params are always float32)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"LlamaConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")


class DecoderBlock(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = Attention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            rope_theta=config.rope_theta, dtype=dtype, rngs=rngs,
        )
        self.post_attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """One pre-norm residual block; returns [B, T, D]."""
        x_BxTxD = x_BxTxD + self.attention(self.input_norm(x_BxTxD), positions_BxT)
        return x_BxTxD + self.mlp(self.post_attention_norm(x_BxTxD))


class Llama(nnx.Module):
    """Llama decoder: `__call__` gives final-normed hidden states, `logits` maps them to float32 logits."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(config.dtype)
        self.embed = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=INIT, rngs=rngs,
        )
        self.layers = nnx.List([DecoderBlock(config, rngs=rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=jnp.float32, kernel_init=INIT, rngs=rngs,
            )

    def __call__(self, tokens_BxT: jax.Array) -> jax.Array:
        """Hidden states [B, T, D] after the final norm, at positions 0..T−1, in the compute dtype."""
        B, T = tokens_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x_BxTxD = self.embed(tokens_BxT)
        for layer in self.layers:
            x_BxTxD = layer(x_BxTxD, positions_BxT)
        return self.norm(x_BxTxD)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits [B, T, V]: hidden @ embedding.T when tied, else the separate lm_head."""
        dtype = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            weight_VxD = self.embed.embedding[...].astype(dtype)
        else:
            weight_VxD = self.lm_head.kernel[...].astype(dtype).T
        return jnp.einsum(
            "btd,vd->btv", hidden_BxTxD.astype(dtype), weight_VxD, preferred_element_type=jnp.float32
        )
