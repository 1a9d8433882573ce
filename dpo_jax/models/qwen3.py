"""Qwen3: the Qwen2 decoder without q/k/v biases, plus an RMSNorm over each head of q and k (`q_norm`, `k_norm`,
weights [head_dim]) before rotary; optionally a sliding window on the layers config.json's `layer_types` marks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpo_jax.models.family import Family, HFLayout
from dpo_jax.models.llama import LLAMA_FIELDS, LLAMA_IGNORED, Llama, LlamaConfig, llama_rope_from_hf, llama_rope_to_hf
from dpo_jax.models.qwen2 import sliding_layers_from_hf, sliding_layers_to_hf


@dataclasses.dataclass(frozen=True)
class Qwen3Config(LlamaConfig):
    """LlamaConfig with Qwen3's defaults: q/k norms, no biases, Qwen3's rope_theta."""

    rope_theta: float = 1000000.0
    qk_norm: bool = True


def _extras_to_hf(config: Qwen3Config) -> dict[str, Any]:
    if config.qkv_bias != config.o_bias or config.mlp_bias or not config.qk_norm:
        raise ValueError(f"{config} has no Qwen3 checkpoint form: Qwen3 has q/k norms, one attention_bias for q, k, "
                         "v and o, and no MLP bias")
    return dict(llama_rope_to_hf(config), attention_bias=config.qkv_bias, **sliding_layers_to_hf(config))


FAMILY = Family(
    name="qwen3",
    config_class=Qwen3Config,
    model_class=Llama,
    hf=HFLayout(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        config_class="Qwen3Config",
        prefix="model.",
        fields=LLAMA_FIELDS,
        extras_from_hf=lambda hf: dict(
            llama_rope_from_hf(hf), **sliding_layers_from_hf(hf), qkv_bias=hf.attention_bias,
            o_bias=hf.attention_bias, qk_norm=True,
        ),
        extras_to_hf=_extras_to_hf,
        ignored=LLAMA_IGNORED,
    ),
)
