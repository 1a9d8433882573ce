"""Shared Flax NNX decoder pieces: the one attention function, rotary embeddings, norms, MLPs, output logits.

Shape suffixes: B batch, T query positions, S key positions, D model width, H query heads, G key/value heads,
K head width, R rotary frequencies, F MLP width, V vocabulary. Params are float32 when initialised here;
`dtype` is the compute dtype. Numerics follow Hugging Face's eager implementations (norms and softmax in float32).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import flax.struct
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type
INIT = nnx.initializers.normal(stddev=0.02)

# Hugging Face activation names (ACT2FN) -> functions. gelu_new / gelu_pytorch_tanh / gelu_fast are the tanh form.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def linear(in_features: int, out_features: int, *, bias: bool, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A float32-param dense layer computing in `dtype`; kernel [in, out]."""
    return nnx.Linear(
        in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=INIT, rngs=rngs,
    )


def embedding(num_embeddings: int, features: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """A float32 lookup table [num, features]; an out-of-range id yields NaN (jnp.take's fill), never a wrong row."""
    return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=jnp.float32, embedding_init=INIT, rngs=rngs)


def layer_norm(features: int, *, eps: float, dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with scale and bias, statistics in float32 with the exact (two-pass) variance, as torch."""
    return nnx.LayerNorm(
        features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 (Llama's RMSNorm); returns the input's dtype."""

    def __init__(self, features: int, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Normalise over the last axis."""
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        inv_rms_BxTx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + self.eps)
        return (x32_BxTxD * inv_rms_BxTx1).astype(x_BxTxD.dtype) * self.scale[...].astype(x_BxTxD.dtype)


class GemmaRMSNorm(nnx.Module):
    """x / rms(x) * (1 + w) in float32, cast back to the input's dtype (Gemma 2/3's RMSNorm: the stored weight w is
    an offset from 1, initialised at 0)."""

    def __init__(self, features: int, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Normalise over the last axis."""
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        inv_rms_BxTx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + self.eps)
        return (x32_BxTxD * inv_rms_BxTx1 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x_BxTxD.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap) (Gemma 2's soft-capping of attention scores and final logits); x itself when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


ROPE_TYPES = ("linear", "llama3", "yarn")
# The rope_parameters keys each scaling type reads (and writes back to config.json).
ROPE_TYPE_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rescaled rotary frequencies, with Hugging Face's `rope_parameters` names: "linear", Llama-3's "llama3", or
    YaRN's "yarn" (Qwen3's long-context setting: frequencies blended between interpolated and original by a ramp
    over [beta_fast, beta_slow] rotations, and cos/sin scaled by `attention_factor`, default 0.1·ln(factor) + 1)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if not self.factor > 0 or not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"rope_scaling.attention_factor must be None or > 0, got {self.attention_factor!r}")


def rotary_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor on cos and sin (so on each rotated q and k) of a rope scaling: YaRN's attention_factor (default
    0.1·ln(factor) + 1, transformers' yarn_get_mscale), 1.0 for every other kind."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def rotary_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies theta^(−2i/rotary_dim), i < rotary_dim/2, float32, rescaled as HF's rope init functions do."""
    inv_freq_R = (1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))).astype(np.float32)
    if scaling is None:
        return inv_freq_R
    if scaling.rope_type == "linear":
        return (inv_freq_R / scaling.factor).astype(np.float32)
    if scaling.rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, theta, scaling)
    # llama3: keep short wavelengths, divide long ones by `factor`, interpolate smoothly in between.
    context = scaling.original_max_position_embeddings
    wavelength_R = 2 * math.pi / inv_freq_R
    divided_R = np.where(wavelength_R > context / scaling.low_freq_factor, inv_freq_R / scaling.factor, inv_freq_R)
    smooth_R = (context / wavelength_R - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed_R = (1 - smooth_R) * divided_R / scaling.factor + smooth_R * divided_R
    medium_R = (wavelength_R >= context / scaling.high_freq_factor) & (wavelength_R <= context / scaling.low_freq_factor)
    return np.where(medium_R, smoothed_R, divided_R).astype(np.float32)


def _yarn_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """YaRN's inverse frequencies, as transformers' `_compute_yarn_parameters` (float32): extrapolated (original)
    for dims rotating more than beta_fast times over the original context, interpolated (÷ factor) below beta_slow
    rotations, a linear ramp between."""
    context = scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return rotary_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs_R = (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)).astype(np.float32)
    ramp_R = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_R = (1 - ramp_R).astype(np.float32)
    inv_freq_R = (1.0 / (scaling.factor * pos_freqs_R)) * (1 - extrapolation_R) + (1.0 / pos_freqs_R) * extrapolation_R
    return inv_freq_R.astype(np.float32)


def per_layer_inv_freq(rotary_dim: int, ropes: list[tuple[float, RopeScaling | None]]) -> np.ndarray:
    """float32 [L, R]: layer i's inverse frequencies from its (theta, scaling), e.g. Gemma 3's local base on sliding
    layers and its global base (and scaling) on full ones. A scanned stack takes row i as block i's rotary."""
    return np.stack([rotary_inv_freq(rotary_dim, theta, scaling) for theta, scaling in ropes])


def per_layer_rotary(rotary_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, np.ndarray]:
    """(inverse frequencies [R], attention factor float32 scalar) of one layer's rotary: what a block takes as its
    layer inputs when layers rotate differently (Gemma 3), stacked over layers by a scan."""
    return rotary_inv_freq(rotary_dim, theta, scaling), np.float32(rotary_attention_factor(scaling))


def apply_rotary(
    x_BxTxHxK: jax.Array, positions_BxT: jax.Array, inv_freq_R: np.ndarray, *, interleaved: bool = False,
    scale: float | jax.Array = 1.0,
) -> jax.Array:
    """Rotate the first 2R dims of each head by position · inv_freq, in float32; the other K − 2R pass through.
    `scale` multiplies cos and sin (YaRN's attention factor, `rotary_attention_factor`).

    Pair i is (i, i + R) in the half-split layout of Llama and GPT-NeoX ("rotate_half"), (2i, 2i + 1) in GPT-J's
    interleaved one ("rotate_every_two").
    """
    rotary_dim = 2 * len(inv_freq_R)
    angles_BxTx1xR = (positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_R))[:, :, None, :]
    sin, cos = jnp.sin(angles_BxTx1xR), jnp.cos(angles_BxTx1xR)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        sin, cos = sin * scale, cos * scale
    rot_BxTxHx2R = x_BxTxHxK[..., :rotary_dim].astype(jnp.float32)
    if interleaved:
        x1_BxTxHxR, x2_BxTxHxR = rot_BxTxHx2R[..., 0::2], rot_BxTxHx2R[..., 1::2]
    else:
        x1_BxTxHxR, x2_BxTxHxR = rot_BxTxHx2R[..., : rotary_dim // 2], rot_BxTxHx2R[..., rotary_dim // 2 :]
    out1_BxTxHxR = x1_BxTxHxR * cos - x2_BxTxHxR * sin
    out2_BxTxHxR = x2_BxTxHxR * cos + x1_BxTxHxR * sin
    if interleaved:
        rotated_BxTxHx2R = jnp.stack([out1_BxTxHxR, out2_BxTxHxR], axis=-1).reshape(rot_BxTxHx2R.shape)
    else:
        rotated_BxTxHx2R = jnp.concatenate([out1_BxTxHxR, out2_BxTxHxR], axis=-1)
    return jnp.concatenate([rotated_BxTxHx2R.astype(x_BxTxHxK.dtype), x_BxTxHxK[..., rotary_dim:]], axis=-1)


def positions_and_segments(
    tokens_BxT: jax.Array, positions_BxT: jax.Array | None, segment_ids_BxT: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """The explicit positions and segment ids, or the defaults: 0..T−1 and one segment per row."""
    B, T = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.zeros((B, T), jnp.int32)
    return positions_BxT, segment_ids_BxT


def attention_mask(
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array,
    sliding_window: int | None = None,
    branch_ids_BxT: jax.Array | None = None,
    cache_slots: int | None = None,
) -> jax.Array:
    """bool [B, 1, T, T]: query t sees key s iff s ≤ t, both are in the same segment, and (with a sliding window
    W) pos[t] − pos[s] < W, i.e. the W latest positions including its own, as Hugging Face's Mistral.

    Several sequences can share a row: give each a segment id and positions that restart at 0. Branches let
    several sequences share a prefix: within a segment, a key of branch 0 (the trunk) is seen by every branch,
    any other only by its own, so `[prompt | chosen | rejected]` with branches 0, 1, 2 scores both completions
    after one prompt (the rejected positions continuing from the prompt's end).

    With a KV cache of `cache_slots` slots (slot = position, one sequence per row): bool [B, 1, T, cache_slots],
    query t sees slot s iff s ≤ pos[t] (and pos[t] − s < W); segments and branches do not apply.
    """
    if cache_slots is not None:
        offsets_BxTxS = positions_BxT[:, :, None] - jnp.arange(cache_slots)[None, None, :]
        mask_BxTxS = offsets_BxTxS >= 0
        if sliding_window is not None:
            mask_BxTxS &= offsets_BxTxS < sliding_window
        return mask_BxTxS[:, None]
    T = positions_BxT.shape[1]
    mask_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])
    if branch_ids_BxT is not None:
        mask_BxTxT &= (branch_ids_BxT[:, None, :] == 0) | (branch_ids_BxT[:, :, None] == branch_ids_BxT[:, None, :])
    if sliding_window is not None:
        mask_BxTxT &= (positions_BxT[:, :, None] - positions_BxT[:, None, :]) < sliding_window
    return mask_BxTxT[:, None]


@flax.struct.dataclass
class KVCache:
    """One layer's keys and values for slots 0..S−1 of each row, slot = position: decoding writes each new token's
    k/v at its position and attends over the slots up to it (`attention_mask(..., cache_slots=S)`)."""

    k_BxSxGxK: jax.Array
    v_BxSxGxK: jax.Array


@flax.struct.dataclass
class StackedKVCache:
    """Every layer's KVCache stacked on a leading layer axis, the cache of blocks run in a scan (`scan_layers`)."""

    k_LxBxSxGxK: jax.Array
    v_LxBxSxGxK: jax.Array


@flax.struct.dataclass
class LayerOfStack:
    """Layer `layer` of a StackedKVCache, as a scanned block sees its cache: decoding writes the new keys and values
    straight into the stack (in place, nothing copied back per layer) and attends over that layer's slots."""

    stack: StackedKVCache
    layer: jax.Array  # int32 scalar


LayerCache = KVCache | LayerOfStack  # what one block reads and writes while decoding


def empty_cache(
    num_layers: int, batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype: Dtype, *, stacked: bool = False
) -> list[KVCache] | StackedKVCache:
    """A zeroed KVCache per layer, [batch, slots, num_kv_heads, head_dim] each in `dtype` (the compute dtype); or,
    `stacked`, one StackedKVCache of [num_layers, batch, ...] for blocks run in a scan."""
    if stacked:
        zeros = jnp.zeros((num_layers, batch, slots, num_kv_heads, head_dim), dtype)
        return StackedKVCache(zeros, zeros)
    zeros = jnp.zeros((batch, slots, num_kv_heads, head_dim), dtype)
    return [KVCache(zeros, zeros) for _ in range(num_layers)]


def cache_kv(
    cache: LayerCache | None, k_BxTxGxK: jax.Array, v_BxTxGxK: jax.Array, positions_BxT: jax.Array
) -> tuple[jax.Array, jax.Array, LayerCache | None]:
    """(keys, values, cache) to attend over: the new k/v themselves without a cache; else the cache with the new
    k/v written at their positions, and all its slots (of its layer, in a stack)."""
    if cache is None:
        return k_BxTxGxK, v_BxTxGxK, None
    rows_Bx1 = jnp.arange(positions_BxT.shape[0])[:, None]
    if isinstance(cache, LayerOfStack):
        layer, stack = cache.layer, cache.stack
        stack = StackedKVCache(
            stack.k_LxBxSxGxK.at[layer, rows_Bx1, positions_BxT].set(k_BxTxGxK.astype(stack.k_LxBxSxGxK.dtype)),
            stack.v_LxBxSxGxK.at[layer, rows_Bx1, positions_BxT].set(v_BxTxGxK.astype(stack.v_LxBxSxGxK.dtype)),
        )
        return stack.k_LxBxSxGxK[layer], stack.v_LxBxSxGxK[layer], LayerOfStack(stack, layer)
    cache = KVCache(
        cache.k_BxSxGxK.at[rows_Bx1, positions_BxT].set(k_BxTxGxK.astype(cache.k_BxSxGxK.dtype)),
        cache.v_BxSxGxK.at[rows_Bx1, positions_BxT].set(v_BxTxGxK.astype(cache.v_BxSxGxK.dtype)),
    )
    return cache.k_BxSxGxK, cache.v_BxSxGxK, cache


def cache_slots(cache: list[KVCache] | StackedKVCache | None) -> int | None:
    """The number of slots of a model's cache, per layer or stacked (None without one): the key length its attention
    masks need."""
    if cache is None:
        return None
    return cache[0].k_BxSxGxK.shape[1] if isinstance(cache, list) else cache.k_LxBxSxGxK.shape[2]


def attend(
    q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array, mask_Bx1xTxS: jax.Array, scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """The attention every family calls: softmax(q·kᵀ · scale, masked) · v, scores and softmax in float32; with
    `softcap`, the scaled scores are soft-capped (`soft_cap`) before the mask, as Gemma 2's eager attention does.

    Grouped-query: query head h uses key/value head h // (H / G), Hugging Face's repeat_kv order. Returns [B, T, H, K].
    """
    if softcap is None:
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask_Bx1xTxS, scale=scale)
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)  # R query heads share each key/value head
    scores_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
    scores_BxGxRxTxS = soft_cap(scores_BxGxRxTxS * scale, softcap)
    scores_BxGxRxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxGxRxTxS, jnp.finfo(jnp.float32).min)
    weights_BxGxRxTxS = jax.nn.softmax(scores_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
    out_BxTxGxRxK = jnp.einsum("bgrts,bsgk->btgrk", weights_BxGxRxTxS, v_BxSxGxK)
    return out_BxTxGxRxK.reshape(B, T, H, K)


class SwiGLUMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), the Llama feed-forward block (act is SiLU for every Llama-family checkpoint)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, activation: str = "silu", bias: bool = False,
        dtype: Dtype = jnp.float32, rngs: nnx.Rngs,
    ):
        self.activation = activation
        self.gate_proj = linear(hidden_size, intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = linear(hidden_size, intermediate_size, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = linear(intermediate_size, hidden_size, bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Apply the gated MLP; returns [B, T, D]."""
        h_BxTxF = ACTIVATIONS[self.activation](self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD)
        return self.down_proj(h_BxTxF)


class DenseMLP(nnx.Module):
    """down(act(up(x))) with biases, the GPT-2 / GPT-J / GPT-NeoX feed-forward block; its two layers carry the
    names the family's checkpoints give them, e.g. ("c_fc", "c_proj") for GPT-2."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, names: tuple[str, str], activation: str, dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.names, self.activation = names, activation
        setattr(self, names[0], linear(hidden_size, intermediate_size, bias=True, dtype=dtype, rngs=rngs))
        setattr(self, names[1], linear(intermediate_size, hidden_size, bias=True, dtype=dtype, rngs=rngs))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        """Apply the MLP; returns [B, T, D]."""
        up, down = (getattr(self, name) for name in self.names)
        return down(ACTIVATIONS[self.activation](up(x_BxTxD)))


def tied_logits(hidden_BxTxD: jax.Array, embedding: nnx.Embed, dtype: Dtype) -> jax.Array:
    """float32 logits [B, T, V] = hidden · embeddingᵀ (input and output embeddings shared)."""
    return jnp.einsum(
        "btd,vd->btv", hidden_BxTxD.astype(dtype), embedding.embedding[...].astype(dtype),
        preferred_element_type=jnp.float32,
    )


def head_logits(hidden_BxTxD: jax.Array, head: nnx.Linear, dtype: Dtype) -> jax.Array:
    """float32 logits [B, T, V] from a separate output layer (kernel [D, V], optional bias)."""
    logits_BxTxV = jnp.einsum(
        "btd,dv->btv", hidden_BxTxD.astype(dtype), head.kernel[...].astype(dtype), preferred_element_type=jnp.float32
    )
    if head.bias is not None:
        logits_BxTxV += head.bias[...].astype(jnp.float32)
    return logits_BxTxV


REMAT_MODES = ("none", "block", "full")
_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls' outputs
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}


def call_block(block: nnx.Module, remat: str, *args: jax.Array) -> jax.Array:
    """`block(*args)`, rematerialised in the backward pass unless `remat` is 'none': activation memory for
    recomputation (one block's activations live at a time instead of every block's)."""
    if remat == "none":
        return block(*args)
    graphdef, params = nnx.split(block)  # a pure function of the block's params: blocks hold nothing they update

    def pure(params, *inputs):
        return nnx.merge(graphdef, params)(*inputs)

    return jax.checkpoint(pure, policy=_REMAT_POLICIES[remat])(params, *args)
