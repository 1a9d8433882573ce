"""Model families by name, plus the pure (graphdef, params) helpers the trainer and sampler use.

Each family is a frozen config dataclass and an `nnx.Module` holding only `nnx.Param` state, with
`__call__(tokens_BxT) -> hidden_BxTxD` and `logits(hidden_BxTxD) -> logits_BxTxV` (float32).
Other families (GPT-2, GPT-J, GPT-NeoX, Qwen2, Mistral) and Hugging Face weight import (a `params.py`
per family mapping HF tensor names to our param paths) come in a later issue, one small file per family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from dpo_jax.models.llama import Llama, LlamaConfig

MODEL_FAMILIES: dict[str, tuple[type, type[nnx.Module]]] = {
    "llama": (LlamaConfig, Llama),
}


def family_names() -> list[str]:
    """Names of the registered model families, sorted (for config validation messages)."""
    return sorted(MODEL_FAMILIES)


def make_config(family: str, **fields: Any):
    """`family`'s config dataclass from keyword fields; unknown family or field, or a bad value, raise ValueError."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {family_names()}")
    config_cls, _ = MODEL_FAMILIES[family]
    all_fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(fields) - set(all_fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for model family {family!r}; its fields: {all_fields}")
    required = [
        f.name for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in fields]
    if missing:
        raise ValueError(f"missing field(s) {missing} for model family {family!r}; its fields: {all_fields}")
    return config_cls(**fields)


def create_model(family: str, rngs: nnx.Rngs, **fields: Any) -> nnx.Module:
    """Build `family`'s config from keyword fields and initialise the model; bad names raise ValueError."""
    config = make_config(family, **fields)
    return MODEL_FAMILIES[family][1](config, rngs=rngs)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static structure and the pure Param pytree (errors if other state exists)."""
    return nnx.split(model, nnx.Param)


def apply_model(
    graphdef: nnx.GraphDef, params: nnx.State, tokens_BxT: jax.Array
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Run the model purely: (hidden_BxTxD, logits_fn), where logits_fn(hidden chunk) gives float32 logits.

    Returning `logits_fn` instead of logits lets callers compute [B, T, V] logits chunk by chunk.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens_BxT), model.logits
