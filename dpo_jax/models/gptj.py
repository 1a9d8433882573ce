"""GPT-J: one LayerNorm feeding attention and MLP in parallel, interleaved rotary embeddings on the first
`rotary_dim` dims of each head (base 10000), GELU MLP with biases, untied output head with a bias.

Submodule names are Hugging Face's (`transformer.h.N.attn.q_proj`, ...). The paper's TL;DR experiment
fine-tunes GPT-J 6B.
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

ROPE_THETA = 10000.0  # fixed in GPT-J


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    """Architecture of a GPT-J decoder; `dtype` names the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    rotary_dim: int | None = 64  # None: the whole head
    intermediate_size: int | None = None  # None: 4 · hidden_size
    max_position_embeddings: int = 2048  # recorded for export; rotary positions are not capped
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
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
        )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPTJConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        head_dim = self.hidden_size // self.num_heads
        if self.rotary_dim is not None and not (
            isinstance(self.rotary_dim, int) and 0 < self.rotary_dim <= head_dim and self.rotary_dim % 2 == 0
        ):
            raise ValueError(f"GPTJConfig.rotary_dim must be None or even and in (0, {head_dim}], got {self.rotary_dim!r}")
        check_choice(self, "activation", layers.ACTIVATIONS)
        resolve_scan_layers(self)


class GPTJAttention(nnx.Module):
    """Causal self-attention, no biases, interleaved partial rotary embeddings."""

    def __init__(self, config: GPTJConfig, *, rngs: nnx.Rngs):
        dtype, D = jnp.dtype(config.dtype), config.hidden_size
        self.num_heads = config.num_heads
        self.rotary_dim = config.rotary_dim or D // config.num_heads
        self.q_proj = layers.linear(D, D, bias=False, dtype=dtype, rngs=rngs)
        self.k_proj = layers.linear(D, D, bias=False, dtype=dtype, rngs=rngs)
        self.v_proj = layers.linear(D, D, bias=False, dtype=dtype, rngs=rngs)
        self.out_proj = layers.linear(D, D, bias=False, dtype=dtype, rngs=rngs)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """Attend over the row (or the cache) under `mask`; returns ([B, T, D], the updated cache)."""
        B, T, D = x_BxTxD.shape
        H, K = self.num_heads, D // self.num_heads
        inv_freq_R = layers.rotary_inv_freq(self.rotary_dim, ROPE_THETA)
        q_BxTxHxK = self.q_proj(x_BxTxD).reshape(B, T, H, K)
        k_BxTxHxK = self.k_proj(x_BxTxD).reshape(B, T, H, K)
        q_BxTxHxK = layers.apply_rotary(q_BxTxHxK, positions_BxT, inv_freq_R, interleaved=True)
        k_BxTxHxK = layers.apply_rotary(k_BxTxHxK, positions_BxT, inv_freq_R, interleaved=True)
        v_BxTxHxK = self.v_proj(x_BxTxD).reshape(B, T, H, K)
        k_BxSxHxK, v_BxSxHxK, cache = layers.cache_kv(cache, k_BxTxHxK, v_BxTxHxK, positions_BxT)
        out_BxTxHxK = layers.attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS, scale=K**-0.5)
        return self.out_proj(out_BxTxHxK.reshape(B, T, D)), cache


class GPTJBlock(nnx.Module):
    """x + attn(ln_1(x)) + mlp(ln_1(x)): attention and MLP read the same normed input."""

    def __init__(self, config: GPTJConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        self.ln_1 = layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = GPTJAttention(config, rngs=rngs)
        self.mlp = layers.DenseMLP(
            config.hidden_size, config.intermediate_size, names=("fc_in", "fc_out"), activation=config.activation,
            dtype=dtype, rngs=rngs,
        )

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """One parallel residual block; returns ([B, T, D], the updated cache)."""
        normed_BxTxD = self.ln_1(x_BxTxD)
        attn_BxTxD, cache = self.attn(normed_BxTxD, positions_BxT, mask_Bx1xTxS, cache)
        return x_BxTxD + attn_BxTxD + self.mlp(normed_BxTxD), cache


class GPTJ(Decoder):
    """GPT-J decoder: parallel LayerNorm blocks, an untied output head with a bias."""

    NAMES = DecoderNames(embed="wte", blocks="h", final_norm="ln_f", head="lm_head")
    HEAD_BIAS = True

    def make_block(self, config: GPTJConfig, index: int, rngs: nnx.Rngs) -> GPTJBlock:
        """A parallel residual block."""
        return GPTJBlock(config, rngs=rngs)

    def make_norm(self, config: GPTJConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
        """ln_f."""
        dtype = jnp.dtype(config.dtype)
        return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    def tied(self) -> bool:
        """Never: GPT-J's head has its own weights and bias."""
        return False


FAMILY = Family(
    name="gptj",
    config_class=GPTJConfig,
    model_class=GPTJ,
    hf=HFLayout(
        model_type="gptj",
        architecture="GPTJForCausalLM",
        config_class="GPTJConfig",
        prefix="transformer.",
        fields=(
            ("vocab_size", "vocab_size"), ("hidden_size", "n_embd"), ("num_layers", "n_layer"),
            ("num_heads", "n_head"), ("rotary_dim", "rotary_dim"), ("intermediate_size", "n_inner"),
            ("max_position_embeddings", "n_positions"), ("layer_norm_eps", "layer_norm_epsilon"),
            ("activation", "activation_function"),
        ),
        extras_from_hf=lambda hf: hf_unsupported(hf, tie_word_embeddings=False),  # the head has its own bias
        extras_to_hf=lambda config: {"tie_word_embeddings": False},
        ignored=(r".*\.attn\.(masked_)?bias$",),  # causal-mask buffers in the original checkpoints
    ),
)
