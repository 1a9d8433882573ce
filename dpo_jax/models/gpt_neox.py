"""GPT-NeoX (Pythia): LayerNorm, fused per-head q/k/v projection, rotary embeddings on the first
`rotary_pct` of each head (half-split layout), GELU MLP, parallel residual, untied output head `embed_out`.

Submodule names are Hugging Face's (`gpt_neox.layers.N.attention.query_key_value`, ...). The paper's
Anthropic HH experiment fine-tunes Pythia 2.8B.
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
class GPTNeoXConfig:
    """Architecture of a GPT-NeoX decoder; `dtype` names the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    rotary_pct: float = 0.25  # fraction of each head's dims that rotate (HF: partial_rotary_factor)
    rope_theta: float = 10000.0
    rope_scaling: layers.RopeScaling | None = None
    max_position_embeddings: int = 2048  # recorded for export; rotary positions are not capped
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); else sequential blocks
    attention_bias: bool = True
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"  # recompute each block in the backward pass: none, block (keep matmuls), full
    scan_layers: bool | None = None  # blocks stacked, run in one scan; None: from 8 layers on (decoder.py)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", layers.RopeScaling(**self.rope_scaling))
        check_config(
            self,
            positive_ints=("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                           "max_position_embeddings"),
            positive_numbers=("rotary_pct", "rope_theta", "layer_norm_eps"),
            bools=("use_parallel_residual", "attention_bias", "tie_embeddings"),
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"GPTNeoXConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.rotary_pct > 1 or self.rotary_dim % 2:
            raise ValueError(
                f"GPTNeoXConfig.rotary_pct must give an even number of rotary dims, at most the head's "
                f"{self.hidden_size // self.num_heads}; got {self.rotary_pct} ({self.rotary_dim} dims)"
            )
        check_choice(self, "activation", layers.ACTIVATIONS)
        resolve_scan_layers(self)

    @property
    def rotary_dim(self) -> int:
        """Rotary dims per head: int(head_dim · rotary_pct), as Hugging Face rounds it."""
        return int(self.hidden_size // self.num_heads * self.rotary_pct)


class GPTNeoXAttention(nnx.Module):
    """Causal self-attention from one fused projection laid out per head as [q | k | v]."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, D = jnp.dtype(config.dtype), config.hidden_size
        self.query_key_value = layers.linear(D, 3 * D, bias=config.attention_bias, dtype=dtype, rngs=rngs)
        self.dense = layers.linear(D, D, bias=config.attention_bias, dtype=dtype, rngs=rngs)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """Attend over the row (or the cache) under `mask`; returns ([B, T, D], the updated cache)."""
        config = self.config
        B, T, D = x_BxTxD.shape
        H, K = config.num_heads, D // config.num_heads
        qkv_BxTxHx3K = self.query_key_value(x_BxTxD).reshape(B, T, H, 3 * K)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.split(qkv_BxTxHx3K, 3, axis=-1)
        inv_freq_R = layers.rotary_inv_freq(config.rotary_dim, config.rope_theta, config.rope_scaling)
        scale = layers.rotary_attention_factor(config.rope_scaling)  # 1.0 but for YaRN
        q_BxTxHxK = layers.apply_rotary(q_BxTxHxK, positions_BxT, inv_freq_R, scale=scale)
        k_BxTxHxK = layers.apply_rotary(k_BxTxHxK, positions_BxT, inv_freq_R, scale=scale)
        k_BxSxHxK, v_BxSxHxK, cache = layers.cache_kv(cache, k_BxTxHxK, v_BxTxHxK, positions_BxT)
        out_BxTxHxK = layers.attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS, scale=K**-0.5)
        return self.dense(out_BxTxHxK.reshape(B, T, D)), cache


class GPTNeoXLayer(nnx.Module):
    """Parallel: x + attn(ln1(x)) + mlp(ln2(x)). Sequential: y = x + attn(ln1(x)), then y + mlp(ln2(y))."""

    def __init__(self, config: GPTNeoXConfig, *, rngs: nnx.Rngs):
        dtype, D, eps = jnp.dtype(config.dtype), config.hidden_size, config.layer_norm_eps
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = layers.layer_norm(D, eps=eps, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = layers.layer_norm(D, eps=eps, dtype=dtype, rngs=rngs)
        self.attention = GPTNeoXAttention(config, rngs=rngs)
        self.mlp = layers.DenseMLP(
            config.hidden_size, config.intermediate_size, names=("dense_h_to_4h", "dense_4h_to_h"),
            activation=config.activation, dtype=dtype, rngs=rngs,
        )

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """One residual block; returns ([B, T, D], the updated cache)."""
        attn_BxTxD, cache = self.attention(self.input_layernorm(x_BxTxD), positions_BxT, mask_Bx1xTxS, cache)
        if self.use_parallel_residual:
            return x_BxTxD + attn_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD)), cache
        y_BxTxD = x_BxTxD + attn_BxTxD
        return y_BxTxD + self.mlp(self.post_attention_layernorm(y_BxTxD)), cache


class GPTNeoX(Decoder):
    """GPT-NeoX decoder: LayerNorm blocks, an untied output head `embed_out` by default."""

    NAMES = DecoderNames(embed="embed_in", blocks="layers", final_norm="final_layer_norm", head="embed_out")

    def make_block(self, config: GPTNeoXConfig, index: int, rngs: nnx.Rngs) -> GPTNeoXLayer:
        """A parallel (or sequential) residual block."""
        return GPTNeoXLayer(config, rngs=rngs)

    def make_norm(self, config: GPTNeoXConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
        """final_layer_norm."""
        dtype = jnp.dtype(config.dtype)
        return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)


def _rope_from_hf(hf: Any) -> dict[str, Any]:
    theta, scaling, partial_rotary_factor = rope_from_hf(hf)
    return dict(rope_theta=theta, rope_scaling=scaling, rotary_pct=partial_rotary_factor)


FAMILY = Family(
    name="gpt_neox",
    config_class=GPTNeoXConfig,
    model_class=GPTNeoX,
    hf=HFLayout(
        model_type="gpt_neox",
        architecture="GPTNeoXForCausalLM",
        config_class="GPTNeoXConfig",
        prefix="gpt_neox.",
        fields=(
            ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
            ("max_position_embeddings", "max_position_embeddings"), ("layer_norm_eps", "layer_norm_eps"),
            ("activation", "hidden_act"), ("use_parallel_residual", "use_parallel_residual"),
            ("attention_bias", "attention_bias"), ("tie_embeddings", "tie_word_embeddings"),
        ),
        extras_from_hf=_rope_from_hf,
        extras_to_hf=lambda c: {"rope_parameters": rope_to_hf(c.rope_theta, c.rope_scaling, c.rotary_pct)},
        head="embed_out",
        # Old checkpoints carry causal-mask and rotary buffers; transformers 5 reads the head as lm_head.
        ignored=(r".*\.attention\.(masked_)?bias$", r".*\.rotary_emb\.inv_freq$"),
        aliases=(("lm_head.weight", "embed_out.weight"),),
    ),
)
