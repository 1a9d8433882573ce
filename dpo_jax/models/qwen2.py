"""Qwen2: the Llama decoder with biases on q_proj, k_proj and v_proj (not o_proj), and optionally a sliding
window on the layers config.json's `layer_types` marks "sliding_attention" (none, in the published checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpo_jax.models.family import Family, HFLayout
from dpo_jax.models.llama import (
    LLAMA_FIELDS, LLAMA_IGNORED, Llama, LlamaConfig, llama_rope_from_hf, llama_rope_to_hf,
)


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """LlamaConfig with Qwen2's defaults: q/k/v biases, and Qwen2's rope_theta."""

    rope_theta: float = 1000000.0
    qkv_bias: bool = True


def sliding_layers_from_hf(hf: Any) -> dict[str, Any]:
    """sliding_window and sliding_window_layers from config.json's `layer_types` (Qwen2, Qwen3)."""
    sliding_layers = tuple(i for i, kind in enumerate(hf.layer_types or ()) if kind == "sliding_attention")
    return dict(sliding_window=hf.sliding_window if sliding_layers else None, sliding_window_layers=sliding_layers or None)


def sliding_layers_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """The config.json form of `sliding_layers_from_hf`'s fields."""
    windowed = [config.layer_window(i) is not None for i in range(config.num_layers)]
    return dict(
        use_sliding_window=any(windowed),
        sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if w else "full_attention" for w in windowed],
    )


def _extras_from_hf(hf: Any) -> dict[str, Any]:
    return dict(llama_rope_from_hf(hf), **sliding_layers_from_hf(hf))


def _extras_to_hf(config: Qwen2Config) -> dict[str, Any]:
    if not config.qkv_bias or config.o_bias or config.mlp_bias or config.qk_norm:
        raise ValueError(f"{config} has no Qwen2 checkpoint form: Qwen2 has biases on q, k, v only")
    return dict(llama_rope_to_hf(config), **sliding_layers_to_hf(config))


FAMILY = Family(
    name="qwen2",
    config_class=Qwen2Config,
    model_class=Llama,
    hf=HFLayout(
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        config_class="Qwen2Config",
        prefix="model.",
        fields=LLAMA_FIELDS,
        extras_from_hf=_extras_from_hf,
        extras_to_hf=_extras_to_hf,
        ignored=LLAMA_IGNORED,
    ),
)
