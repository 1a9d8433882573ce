"""GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v projection with bias, GELU MLP, tied output head.

Submodule names are Hugging Face's (`transformer.h.N.attn.c_attn`, ...); GPT-2's Conv1D stores kernels [in, out]
as we do, so its weights load untransposed. The paper's IMDb experiment fine-tunes GPT-2 large.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import layers
from dpo_jax.models.decoder import Decoder, DecoderNames
from dpo_jax.models.family import (
    Family, HFLayout, check_choice, check_config, hf_unsupported, resolve_scan_layers,
)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 decoder; `dtype` names the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int | None = None  # None: 4 · hidden_size
    max_position_embeddings: int = 1024  # the learned position table's size; later positions give NaN
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores / (layer index + 1) as well
    tie_embeddings: bool = True
    dtype: str = "float32"
    remat: str = "none"  # recompute each block in the backward pass: none, block (keep matmuls), full
    scan_layers: bool | None = None  # blocks stacked, run in one scan; None: from 8 layers on (decoder.py)

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        check_config(
            self,
            positive_ints=("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                           "max_position_embeddings"),
            positive_numbers=("layer_norm_eps",),
            bools=("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "tie_embeddings"),
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPT2Config.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        check_choice(self, "activation", layers.ACTIVATIONS)
        # Each block's own attention scale differs by layer, which one stacked block cannot express.
        resolve_scan_layers(self, "scale_attn_by_inverse_layer_idx" if self.scale_attn_by_inverse_layer_idx else None)


class GPT2Attention(nnx.Module):
    """Causal self-attention from one fused [D, 3D] projection (q | k | v), no rotary embeddings."""

    def __init__(self, config: GPT2Config, layer_index: int, *, rngs: nnx.Rngs):
        dtype, D = jnp.dtype(config.dtype), config.hidden_size
        self.num_heads = config.num_heads
        self.scale = (D // config.num_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_index + 1
        self.c_attn = layers.linear(D, 3 * D, bias=True, dtype=dtype, rngs=rngs)
        self.c_proj = layers.linear(D, D, bias=True, dtype=dtype, rngs=rngs)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """Attend over the row (or the cache) under `mask`; returns ([B, T, D], the updated cache)."""
        B, T, D = x_BxTxD.shape
        H = self.num_heads
        q_BxTxD, k_BxTxD, v_BxTxD = jnp.split(self.c_attn(x_BxTxD), 3, axis=-1)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (a.reshape(B, T, H, D // H) for a in (q_BxTxD, k_BxTxD, v_BxTxD))
        k_BxSxHxK, v_BxSxHxK, cache = layers.cache_kv(cache, k_BxTxHxK, v_BxTxHxK, positions_BxT)
        out_BxTxHxK = layers.attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS, scale=self.scale)
        return self.c_proj(out_BxTxHxK.reshape(B, T, D)), cache


class GPT2Block(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_index: int, *, rngs: nnx.Rngs):
        dtype, D, eps = jnp.dtype(config.dtype), config.hidden_size, config.layer_norm_eps
        self.ln_1 = layers.layer_norm(D, eps=eps, dtype=dtype, rngs=rngs)
        self.attn = GPT2Attention(config, layer_index, rngs=rngs)
        self.ln_2 = layers.layer_norm(D, eps=eps, dtype=dtype, rngs=rngs)
        self.mlp = layers.DenseMLP(
            config.hidden_size, config.intermediate_size, names=("c_fc", "c_proj"), activation=config.activation,
            dtype=dtype, rngs=rngs,
        )

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """One pre-norm residual block; returns ([B, T, D], the updated cache)."""
        attn_BxTxD, cache = self.attn(self.ln_1(x_BxTxD), positions_BxT, mask_Bx1xTxS, cache)
        x_BxTxD = x_BxTxD + attn_BxTxD
        return x_BxTxD + self.mlp(self.ln_2(x_BxTxD)), cache


class GPT2(Decoder):
    """GPT-2 decoder: learned positions added to the token embedding, LayerNorm blocks, tied head by default."""

    NAMES = DecoderNames(embed="wte", blocks="h", final_norm="ln_f", head="lm_head")

    def make_extras(self, config: GPT2Config, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """The learned position table `wpe` [max_position_embeddings, D]."""
        dtype = jnp.dtype(config.dtype)
        return {"wpe": layers.embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype, rngs=rngs)}

    def make_block(self, config: GPT2Config, index: int, rngs: nnx.Rngs) -> GPT2Block:
        """Block `index` (its index scales its attention with scale_attn_by_inverse_layer_idx)."""
        return GPT2Block(config, index, rngs=rngs)

    def make_norm(self, config: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
        """ln_f."""
        dtype = jnp.dtype(config.dtype)
        return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def embed(self, tokens_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """wte(tokens) + wpe(positions); a position past the table gives NaN."""
        return self.wte(tokens_BxT) + self.wpe(positions_BxT)


FAMILY = Family(
    name="gpt2",
    config_class=GPT2Config,
    model_class=GPT2,
    hf=HFLayout(
        model_type="gpt2",
        architecture="GPT2LMHeadModel",
        config_class="GPT2Config",
        prefix="transformer.",
        fields=(
            ("vocab_size", "vocab_size"), ("hidden_size", "n_embd"), ("num_layers", "n_layer"),
            ("num_heads", "n_head"), ("intermediate_size", "n_inner"), ("max_position_embeddings", "n_positions"),
            ("layer_norm_eps", "layer_norm_epsilon"), ("activation", "activation_function"),
            ("scale_attn_weights", "scale_attn_weights"),
            ("scale_attn_by_inverse_layer_idx", "scale_attn_by_inverse_layer_idx"),
            ("tie_embeddings", "tie_word_embeddings"),
        ),
        extras_from_hf=lambda hf: hf_unsupported(hf, add_cross_attention=False),  # a decoder-only model
        conv1d=True,
        ignored=(r".*\.attn\.(masked_)?bias$",),  # causal-mask buffers in the original checkpoints
    ),
)
