"""Mistral: the Llama decoder with a sliding attention window on every layer (Mistral 7B v0.1: 4096 positions;
v0.2 and later set none, which is plain causal attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpo_jax.models.family import Family, HFLayout
from dpo_jax.models.llama import (
    LLAMA_FIELDS, LLAMA_IGNORED, Llama, LlamaConfig, llama_rope_from_hf, llama_rope_to_hf,
)


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """LlamaConfig as Mistral checkpoints state it: `sliding_window` applies to every layer."""


def _extras_to_hf(config: MistralConfig) -> dict[str, Any]:
    if config.qkv_bias or config.o_bias or config.mlp_bias or config.sliding_window_layers is not None or config.qk_norm:
        raise ValueError(f"{config} has no Mistral checkpoint form: no biases, one window for every layer")
    return dict(llama_rope_to_hf(config), sliding_window=config.sliding_window)


FAMILY = Family(
    name="mistral",
    config_class=MistralConfig,
    model_class=Llama,
    hf=HFLayout(
        model_type="mistral",
        architecture="MistralForCausalLM",
        config_class="MistralConfig",
        prefix="model.",
        fields=LLAMA_FIELDS,
        extras_from_hf=lambda hf: dict(llama_rope_from_hf(hf), sliding_window=hf.sliding_window),
        extras_to_hf=_extras_to_hf,
        ignored=LLAMA_IGNORED,
    ),
)
