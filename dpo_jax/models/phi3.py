"""Phi-3: the Llama decoder whose checkpoints fuse q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`
(rows [q | k | v] and [gate | up]): we keep the parts as Llama's separate layers, so `hf.py` splits the fused
tensors on load and fuses them again on export. A sliding window (config.json's `sliding_window`) applies to every
layer, as Mistral's; `longrope` rotary scaling (Phi-3 128k, Phi-3.5) is refused at load, naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpo_jax.models.family import Family, HFLayout, hf_unsupported
from dpo_jax.models.llama import LLAMA_FIELDS, LLAMA_IGNORED, Llama, LlamaConfig, llama_rope_from_hf, llama_rope_to_hf


@dataclasses.dataclass(frozen=True)
class Phi3Config(LlamaConfig):
    """LlamaConfig as Phi-3 checkpoints state it: no biases, one window (or none) for every layer."""

    rms_norm_eps: float = 1e-5


def _extras_to_hf(config: Phi3Config) -> dict[str, Any]:
    if config.qkv_bias or config.o_bias or config.mlp_bias or config.qk_norm or config.sliding_window_layers is not None:
        raise ValueError(f"{config} has no Phi-3 checkpoint form: no biases, no q/k norms, one window for every layer")
    return dict(llama_rope_to_hf(config), sliding_window=config.sliding_window,
                original_max_position_embeddings=config.max_position_embeddings)


FAMILY = Family(
    name="phi3",
    config_class=Phi3Config,
    model_class=Llama,
    hf=HFLayout(
        model_type="phi3",
        architecture="Phi3ForCausalLM",
        config_class="Phi3Config",
        prefix="model.",
        fields=LLAMA_FIELDS,
        extras_from_hf=lambda hf: dict(
            llama_rope_from_hf(hf), sliding_window=hf.sliding_window, **hf_unsupported(hf, attention_bias=False)),
        extras_to_hf=_extras_to_hf,
        ignored=LLAMA_IGNORED,
        fused=(("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))),
    ),
)
