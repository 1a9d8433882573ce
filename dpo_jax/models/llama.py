"""Llama-family decoder (pre-norm, RMSNorm, rotary, grouped-query attention, SwiGLU), also the body of Qwen2 and
Mistral: biases on q/k/v (Qwen2), a sliding attention window (Mistral, some Qwen2 layers), Llama-3 rope scaling.

Submodule names are Hugging Face's (`model.layers.N.self_attn.q_proj`, ...). The module holds only `nnx.Param`
state: `nnx.split(model, nnx.Param)` is exhaustive.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import layers
from dpo_jax.models.decoder import Decoder, DecoderNames
from dpo_jax.models.family import (
    Family, HFLayout, check_choice, check_config, resolve_scan_layers, rope_from_hf, rope_to_hf,
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder; `dtype` names the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: layers.RopeScaling | None = None  # Llama 3.1+: {"rope_type": "llama3", "factor": 8.0, ...}; yarn
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama's attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3's q_norm, k_norm)
    activation: str = "silu"
    sliding_window: int | None = None  # attend to the latest `sliding_window` positions only (Mistral)
    sliding_window_layers: tuple[int, ...] | None = None  # the layers that use the window; None: all of them
    max_position_embeddings: int = 2048  # recorded for export; rotary positions are not capped
    dtype: str = "float32"
    remat: str = "none"  # recompute each block in the backward pass: none, block (keep matmuls), full
    scan_layers: bool | None = None  # blocks stacked, run in one scan; None: from 8 layers on (decoder.py)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", layers.RopeScaling(**self.rope_scaling))
        if isinstance(self.sliding_window_layers, list):
            object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
        check_config(
            self,
            positive_ints=("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                           "intermediate_size", "max_position_embeddings"),
            positive_numbers=("rope_theta", "rms_norm_eps"),
            bools=("tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm"),
        )
        name = type(self).__name__
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_choice(self, "activation", layers.ACTIVATIONS)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, layers.RopeScaling):
            raise ValueError(f"{name}.rope_scaling must be None or a RopeScaling / dict, got {self.rope_scaling!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
                self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"{name}.sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if self.sliding_window_layers is not None and not all(
                isinstance(i, int) and 0 <= i < self.num_layers for i in self.sliding_window_layers):
            raise ValueError(
                f"{name}.sliding_window_layers must be None or layer indices below {self.num_layers}, "
                f"got {self.sliding_window_layers!r}"
            )
        resolve_scan_layers(self)

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`, or None for full causal attention."""
        if self.sliding_window_layers is None or index in self.sliding_window_layers:
            return self.sliding_window
        return None


class LlamaAttention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings (half-split layout)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, D, K = jnp.dtype(config.dtype), config.hidden_size, config.head_dim
        self.q_proj = layers.linear(D, config.num_heads * K, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = layers.linear(D, config.num_kv_heads * K, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = layers.linear(D, config.num_kv_heads * K, bias=config.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = layers.linear(config.num_heads * K, D, bias=config.o_bias, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = layers.RMSNorm(K, eps=config.rms_norm_eps)
            self.k_norm = layers.RMSNorm(K, eps=config.rms_norm_eps)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """Attend over the row (or the cache) under `mask`; returns ([B, T, D], the updated cache)."""
        config = self.config
        B, T, _ = x_BxTxD.shape
        H, G, K = config.num_heads, config.num_kv_heads, config.head_dim
        inv_freq_R = layers.rotary_inv_freq(K, config.rope_theta, config.rope_scaling)
        q_BxTxHxK, k_BxTxGxK = self.q_proj(x_BxTxD).reshape(B, T, H, K), self.k_proj(x_BxTxD).reshape(B, T, G, K)
        if config.qk_norm:
            q_BxTxHxK, k_BxTxGxK = self.q_norm(q_BxTxHxK), self.k_norm(k_BxTxGxK)
        scale = layers.rotary_attention_factor(config.rope_scaling)  # 1.0 but for YaRN
        q_BxTxHxK = layers.apply_rotary(q_BxTxHxK, positions_BxT, inv_freq_R, scale=scale)
        k_BxTxGxK = layers.apply_rotary(k_BxTxGxK, positions_BxT, inv_freq_R, scale=scale)
        v_BxTxGxK = self.v_proj(x_BxTxD).reshape(B, T, G, K)
        k_BxSxGxK, v_BxSxGxK, cache = layers.cache_kv(cache, k_BxTxGxK, v_BxTxGxK, positions_BxT)
        out_BxTxHxK = layers.attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale=K**-0.5)
        return self.o_proj(out_BxTxHxK.reshape(B, T, H * K)), cache


class LlamaDecoderLayer(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.input_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = layers.SwiGLUMLP(
            config.hidden_size, config.intermediate_size, activation=config.activation, bias=config.mlp_bias,
            dtype=dtype, rngs=rngs,
        )

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """One pre-norm residual block; returns ([B, T, D], the updated cache)."""
        attn_BxTxD, cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT, mask_Bx1xTxS, cache)
        x_BxTxD = x_BxTxD + attn_BxTxD
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)), cache


class Llama(Decoder):
    """Llama decoder (also Qwen2's and Mistral's): RMSNorm blocks, grouped KV heads, per-layer sliding windows."""

    NAMES = DecoderNames(embed="embed_tokens", blocks="layers", final_norm="norm", head="lm_head")

    def make_block(self, config: LlamaConfig, index: int, rngs: nnx.Rngs) -> LlamaDecoderLayer:
        """A pre-norm residual block (its window, if any, comes with its mask)."""
        return LlamaDecoderLayer(config, rngs=rngs)

    def make_norm(self, config: LlamaConfig, rngs: nnx.Rngs) -> layers.RMSNorm:
        """The final RMSNorm `norm`."""
        return layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def layer_window(self, index: int) -> int | None:
        """The config's window of layer `index` (`LlamaConfig.layer_window`)."""
        return self.config.layer_window(index)

    def kv_heads(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim): grouped-query attention caches fewer heads than it queries."""
        return self.config.num_kv_heads, self.config.head_dim


# The config.json fields every Llama-like family (llama, qwen2, mistral) states the same way.
LLAMA_FIELDS = (
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
    ("intermediate_size", "intermediate_size"), ("rms_norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"), ("activation", "hidden_act"),
    ("max_position_embeddings", "max_position_embeddings"),
)
LLAMA_IGNORED = (r".*\.rotary_emb\.inv_freq$",)  # a buffer that checkpoints of older transformers carry


def llama_rope_from_hf(hf: Any) -> dict[str, Any]:
    """rope_theta, rope_scaling and head_dim of a Llama-like config.json (head_dim may be absent: D / H)."""
    theta, scaling, partial_rotary_factor = rope_from_hf(hf)
    if partial_rotary_factor != 1.0:
        raise ValueError(f"config.json: {hf.model_type} with partial_rotary_factor={partial_rotary_factor} is not supported")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return dict(rope_theta=theta, rope_scaling=scaling, head_dim=head_dim)


def llama_rope_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The config.json form of `llama_rope_from_hf`'s fields."""
    return dict(rope_parameters=rope_to_hf(config.rope_theta, config.rope_scaling), head_dim=config.head_dim)


def _extras_to_hf(config: LlamaConfig) -> dict[str, Any]:
    if config.qkv_bias != config.o_bias or config.sliding_window is not None or config.qk_norm:
        raise ValueError(
            f"{config} has no Llama checkpoint form: Llama has one attention_bias for q, k, v and o, no "
            "sliding window and no q/k norms (use the qwen2, mistral or qwen3 family)"
        )
    return dict(llama_rope_to_hf(config), attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)


FAMILY = Family(
    name="llama",
    config_class=LlamaConfig,
    model_class=Llama,
    hf=HFLayout(
        model_type="llama",
        architecture="LlamaForCausalLM",
        config_class="LlamaConfig",
        prefix="model.",
        fields=LLAMA_FIELDS,
        extras_from_hf=lambda hf: dict(
            llama_rope_from_hf(hf), qkv_bias=hf.attention_bias, o_bias=hf.attention_bias, mlp_bias=hf.mlp_bias
        ),
        extras_to_hf=_extras_to_hf,
        ignored=LLAMA_IGNORED,
    ),
)
