"""Gemma 2 and Gemma 3 (text): the Llama skeleton with Gemma's differences, as transformers' modeling code has them.

- embeddings scaled by √hidden_size (in the compute dtype); RMSNorm computing x·(1 + w) in float32 (`GemmaRMSNorm`);
- four norms per block: `input_layernorm`, `post_attention_layernorm` (on the attention output, before the residual
  add), `pre_feedforward_layernorm`, `post_feedforward_layernorm`; a GeGLU MLP (`gelu_pytorch_tanh`);
- attention scale `query_pre_attn_scalar ** -0.5`; per-layer `layer_types`: "sliding_attention" layers see the
  latest `sliding_window` positions, "full_attention" layers everything;
- Gemma 2: tanh soft-capping of the attention scores (`attn_logit_softcap`) and of the final logits
  (`final_logit_softcap`, applied in `logits`, i.e. per chunk of the chunked log-prob code, never on [B, T, V]);
- Gemma 3: no attention soft-cap, q/k RMSNorms over each head before rotary, and two rotary bases: `rope_theta`
  (and `rope_scaling`) on full layers, `sliding_rope_theta` (`sliding_rope_scaling`) on sliding ones. Each block
  takes its inverse frequencies as an input (`layer_inputs`), so a scan of stacked blocks gets its layer's row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import layers
from dpo_jax.models.decoder import Decoder, DecoderNames
from dpo_jax.models.family import (
    Family, HFLayout, check_choice, check_config, resolve_scan_layers, rope_from_hf, rope_from_params, rope_to_hf,
)

LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture of a Gemma 2 / Gemma 3 text decoder; `dtype` names the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    query_pre_attn_scalar: float = 256.0  # attention scale is its inverse square root
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" / "full_attention" per layer; None: all full
    sliding_window: int | None = None  # the window of the sliding layers
    rope_theta: float = 10000.0  # full-attention layers' rotary base
    rope_scaling: layers.RopeScaling | None = None
    sliding_rope_theta: float | None = None  # sliding layers' base (Gemma 3's rope_local_base_freq); None: rope_theta
    sliding_rope_scaling: layers.RopeScaling | None = None
    attn_logit_softcap: float | None = None  # Gemma 2: 50.0
    final_logit_softcap: float | None = None  # Gemma 2: 30.0
    qk_norm: bool = False  # Gemma 3: RMSNorm (1 + w) over each head of q and k before rotary
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192  # recorded for export; rotary positions are not capped
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool | None = None

    def __post_init__(self):
        for field in ("rope_scaling", "sliding_rope_scaling"):
            if isinstance(getattr(self, field), dict):
                object.__setattr__(self, field, layers.RopeScaling(**getattr(self, field)))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        check_config(
            self,
            positive_ints=("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                           "intermediate_size", "max_position_embeddings"),
            positive_numbers=("rope_theta", "rms_norm_eps", "query_pre_attn_scalar"),
            bools=("tie_embeddings", "qk_norm", "attention_bias"),
        )
        name = type(self).__name__
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        check_choice(self, "activation", layers.ACTIVATIONS)
        for field in ("attn_logit_softcap", "final_logit_softcap", "sliding_rope_theta"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name}.{field} must be None or a positive number, got {value!r}")
        for field in ("rope_scaling", "sliding_rope_scaling"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, layers.RopeScaling):
                raise ValueError(f"{name}.{field} must be None or a RopeScaling / dict, got {value!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
                self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"{name}.sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers or any(
                kind not in LAYER_TYPES for kind in self.layer_types)):
            raise ValueError(f"{name}.layer_types must be None or {self.num_layers} of {LAYER_TYPES}, "
                             f"got {self.layer_types!r}")
        resolve_scan_layers(self)

    def layer_type(self, index: int) -> str:
        """Layer `index`'s type: "sliding_attention" or "full_attention"."""
        return "full_attention" if self.layer_types is None else self.layer_types[index]

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer `index`, or None for full causal attention."""
        return self.sliding_window if self.layer_type(index) == "sliding_attention" else None

    def layer_rope(self, index: int) -> tuple[float, layers.RopeScaling | None]:
        """(rotary base, scaling) of layer `index`: the sliding ones' on sliding layers, else the global ones."""
        if self.layer_type(index) == "sliding_attention" and self.sliding_rope_theta is not None:
            return self.sliding_rope_theta, self.sliding_rope_scaling
        return self.rope_theta, self.rope_scaling


@dataclasses.dataclass(frozen=True)
class Gemma2Config(GemmaConfig):
    """GemmaConfig with Gemma 2's defaults: both soft-caps."""

    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0


@dataclasses.dataclass(frozen=True)
class Gemma3Config(GemmaConfig):
    """GemmaConfig with Gemma 3's defaults: q/k norms, a local base of 10,000 and a global one of 1,000,000."""

    rope_theta: float = 1000000.0
    sliding_rope_theta: float | None = 10000.0
    qk_norm: bool = True


class GemmaAttention(nnx.Module):
    """Grouped-query attention with optional q/k norms, a per-layer rotary (its inverse frequencies an input) and
    optional soft-capped scores."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtype, D, K, bias = jnp.dtype(config.dtype), config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = layers.linear(D, config.num_heads * K, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = layers.linear(D, config.num_kv_heads * K, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = layers.linear(D, config.num_kv_heads * K, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = layers.linear(config.num_heads * K, D, bias=bias, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = layers.GemmaRMSNorm(K, eps=config.rms_norm_eps)
            self.k_norm = layers.GemmaRMSNorm(K, eps=config.rms_norm_eps)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None,
        inv_freq_R: jax.Array, rotary_scale: jax.Array,
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """Attend over the row (or the cache) under `mask`, rotating by this layer's `inv_freq_R` and cos/sin factor
        `rotary_scale`; returns ([B, T, D], the updated cache)."""
        config = self.config
        B, T, _ = x_BxTxD.shape
        H, G, K = config.num_heads, config.num_kv_heads, config.head_dim
        q_BxTxHxK, k_BxTxGxK = self.q_proj(x_BxTxD).reshape(B, T, H, K), self.k_proj(x_BxTxD).reshape(B, T, G, K)
        if config.qk_norm:
            q_BxTxHxK, k_BxTxGxK = self.q_norm(q_BxTxHxK), self.k_norm(k_BxTxGxK)
        q_BxTxHxK = layers.apply_rotary(q_BxTxHxK, positions_BxT, inv_freq_R, scale=rotary_scale)
        k_BxTxGxK = layers.apply_rotary(k_BxTxGxK, positions_BxT, inv_freq_R, scale=rotary_scale)
        v_BxTxGxK = self.v_proj(x_BxTxD).reshape(B, T, G, K)
        k_BxSxGxK, v_BxSxGxK, cache = layers.cache_kv(cache, k_BxTxGxK, v_BxTxGxK, positions_BxT)
        out_BxTxHxK = layers.attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS,
                                    scale=config.query_pre_attn_scalar**-0.5, softcap=config.attn_logit_softcap)
        return self.o_proj(out_BxTxHxK.reshape(B, T, H * K)), cache


class GemmaDecoderLayer(nnx.Module):
    """x + post_attn_norm(attn(input_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = layers.GemmaRMSNorm(D, eps=eps)
        self.self_attn = GemmaAttention(config, rngs=rngs)
        self.post_attention_layernorm = layers.GemmaRMSNorm(D, eps=eps)
        self.pre_feedforward_layernorm = layers.GemmaRMSNorm(D, eps=eps)
        self.mlp = layers.SwiGLUMLP(D, config.intermediate_size, activation=config.activation,
                                    dtype=jnp.dtype(config.dtype), rngs=rngs)
        self.post_feedforward_layernorm = layers.GemmaRMSNorm(D, eps=eps)

    def __call__(
        self, x_BxTxD: jax.Array, positions_BxT: jax.Array, mask_Bx1xTxS: jax.Array, cache: layers.LayerCache | None,
        inv_freq_R: jax.Array, rotary_scale: jax.Array,
    ) -> tuple[jax.Array, layers.LayerCache | None]:
        """One sandwich-norm residual block; returns ([B, T, D], the updated cache)."""
        attn_BxTxD, cache = self.self_attn(self.input_layernorm(x_BxTxD), positions_BxT, mask_Bx1xTxS, cache,
                                           inv_freq_R, rotary_scale)
        x_BxTxD = x_BxTxD + self.post_attention_layernorm(attn_BxTxD)
        return x_BxTxD + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BxTxD))), cache


class Gemma(Decoder):
    """Gemma 2 / 3 text decoder: scaled embeddings, sandwich norms, per-layer windows and rotary, soft-capped logits."""

    NAMES = DecoderNames(embed="embed_tokens", blocks="layers", final_norm="norm", head="lm_head")

    def make_block(self, config: GemmaConfig, index: int, rngs: nnx.Rngs) -> GemmaDecoderLayer:
        """A block (its window comes with its mask, its rotary frequencies with `layer_inputs`)."""
        return GemmaDecoderLayer(config, rngs=rngs)

    def make_norm(self, config: GemmaConfig, rngs: nnx.Rngs) -> layers.GemmaRMSNorm:
        """The final norm `norm`."""
        return layers.GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed(self, tokens_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """The token embedding times √hidden_size, the factor rounded to the compute dtype (as transformers does)."""
        x_BxTxD = getattr(self, self.NAMES.embed)(tokens_BxT)
        return x_BxTxD * jnp.asarray(math.sqrt(self.config.hidden_size), x_BxTxD.dtype)

    def layer_window(self, index: int) -> int | None:
        """The config's window of layer `index`."""
        return self.config.layer_window(index)

    def layer_inputs(self, index: int) -> tuple[np.ndarray, ...]:
        """(inverse rotary frequencies [head_dim / 2], cos/sin factor) of layer `index`'s type."""
        return layers.per_layer_rotary(self.config.head_dim, *self.config.layer_rope(index))

    def kv_heads(self) -> tuple[int, int]:
        """(num_kv_heads, head_dim)."""
        return self.config.num_kv_heads, self.config.head_dim

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits, soft-capped by `final_logit_softcap` if set: callers (logprobs.py, sampling) apply this to
        chunks of positions, so the cap never needs a [B, T, V] tensor."""
        return layers.soft_cap(super().logits(hidden_BxTxD), self.config.final_logit_softcap)


# The config.json fields both Gemma versions state the same way.
GEMMA_FIELDS = (
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
    ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"), ("head_dim", "head_dim"),
    ("intermediate_size", "intermediate_size"), ("rms_norm_eps", "rms_norm_eps"),
    ("tie_embeddings", "tie_word_embeddings"), ("activation", "hidden_activation"),
    ("max_position_embeddings", "max_position_embeddings"), ("query_pre_attn_scalar", "query_pre_attn_scalar"),
    ("sliding_window", "sliding_window"), ("attention_bias", "attention_bias"),
    ("final_logit_softcap", "final_logit_softcapping"),
)
GEMMA_IGNORED = (r".*\.rotary_emb\..*inv_freq$",)


def _check_rope(hf: Any, rope: tuple[float, Any, float], kind: str = "") -> tuple[float, Any]:
    theta, scaling, partial_rotary_factor = rope
    if partial_rotary_factor != 1.0:
        raise ValueError(f"config.json: {hf.model_type} with {kind}partial_rotary_factor={partial_rotary_factor} "
                         "is not supported")
    return theta, scaling


def _common_from_hf(hf: Any) -> dict[str, Any]:
    if getattr(hf, "use_bidirectional_attention", None):
        raise ValueError(f"config.json: {hf.model_type} with use_bidirectional_attention=True is not supported "
                         "(only causal attention)")
    return dict(layer_types=tuple(hf.layer_types) if hf.layer_types is not None else None)


def _gemma2_from_hf(hf: Any) -> dict[str, Any]:
    theta, scaling = _check_rope(hf, rope_from_hf(hf))
    return dict(_common_from_hf(hf), rope_theta=theta, rope_scaling=scaling, sliding_rope_theta=None,
                attn_logit_softcap=hf.attn_logit_softcapping, qk_norm=False)


def _gemma2_to_hf(config: GemmaConfig) -> dict[str, Any]:
    if config.qk_norm or config.sliding_rope_theta not in (None, config.rope_theta) or (
            config.sliding_rope_theta is not None and config.sliding_rope_scaling != config.rope_scaling):
        raise ValueError(f"{config} has no Gemma 2 checkpoint form: no q/k norms, one rotary for every layer "
                         "(use the gemma3 family)")
    return dict(_layer_types_to_hf(config), rope_parameters=rope_to_hf(config.rope_theta, config.rope_scaling),
                attn_logit_softcapping=config.attn_logit_softcap)


def _gemma3_from_hf(hf: Any) -> dict[str, Any]:
    if hf.attn_logit_softcapping is not None:  # transformers' Gemma 3 attention ignores it: refuse, not guess
        raise ValueError(f"config.json: {hf.model_type} with attn_logit_softcapping={hf.attn_logit_softcapping!r} "
                         "is not supported (only None: Gemma 3 has no attention soft-cap)")
    params = hf.rope_parameters or {}
    ropes = {}
    for kind in LAYER_TYPES:
        if not isinstance(params.get(kind), dict):
            raise ValueError(f"config.json: {hf.model_type} needs rope_parameters[{kind!r}], got {params!r}")
        ropes[kind] = _check_rope(hf, rope_from_params(params[kind], hf.max_position_embeddings), f"{kind} ")
    return dict(_common_from_hf(hf), rope_theta=ropes["full_attention"][0], rope_scaling=ropes["full_attention"][1],
                sliding_rope_theta=ropes["sliding_attention"][0], sliding_rope_scaling=ropes["sliding_attention"][1],
                attn_logit_softcap=None, qk_norm=True)


def _gemma3_to_hf(config: GemmaConfig) -> dict[str, Any]:
    if not config.qk_norm or config.attn_logit_softcap is not None:
        raise ValueError(f"{config} has no Gemma 3 checkpoint form: q/k norms, no attention soft-cap "
                         "(use the gemma2 family)")
    sliding = (config.rope_theta, config.rope_scaling) if config.sliding_rope_theta is None else (
        config.sliding_rope_theta, config.sliding_rope_scaling)
    return dict(_layer_types_to_hf(config), rope_parameters={
        "full_attention": rope_to_hf(config.rope_theta, config.rope_scaling),
        "sliding_attention": rope_to_hf(*sliding),
    })


def _layer_types_to_hf(config: GemmaConfig) -> dict[str, Any]:
    return dict(layer_types=[config.layer_type(i) for i in range(config.num_layers)])


GEMMA2_FAMILY = Family(
    name="gemma2",
    config_class=Gemma2Config,
    model_class=Gemma,
    hf=HFLayout(
        model_type="gemma2",
        architecture="Gemma2ForCausalLM",
        config_class="Gemma2Config",
        prefix="model.",
        fields=GEMMA_FIELDS,
        extras_from_hf=_gemma2_from_hf,
        extras_to_hf=_gemma2_to_hf,
        ignored=GEMMA_IGNORED,
    ),
)

GEMMA3_FAMILY = Family(
    name="gemma3",
    config_class=Gemma3Config,
    model_class=Gemma,
    hf=HFLayout(
        model_type="gemma3_text",
        architecture="Gemma3ForCausalLM",
        config_class="Gemma3TextConfig",
        prefix="model.",
        fields=GEMMA_FIELDS,
        extras_from_hf=_gemma3_from_hf,
        extras_to_hf=_gemma3_to_hf,
        # Gemma3ForConditionalGeneration's checkpoints (model_type gemma3): the language model under its published
        # names (language_model.model.*) or transformers 5's (model.language_model.*); the image tower is not loaded,
        # and export writes the text model alone (Gemma3ForCausalLM).
        text_of=("gemma3",),
        prefix_aliases=("language_model.model.", "model.language_model."),
        ignored=GEMMA_IGNORED + (r"(model\.)?(vision_tower|multi_modal_projector)\..*",),
    ),
)
