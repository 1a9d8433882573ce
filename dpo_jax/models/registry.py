"""The model families by name, and config ↔ model constructors: what callers reach as `models.X`.

A family (one small file: its config dataclass, blocks and `FAMILY = Family(...)`) is registered here by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx

from dpo_jax.models import gemma, gpt2, gpt_neox, gptj, llama, mistral, phi3, qwen2, qwen3
from dpo_jax.models.family import Family

MODEL_FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (gpt2.FAMILY, gptj.FAMILY, gpt_neox.FAMILY, llama.FAMILY, qwen2.FAMILY, mistral.FAMILY,
                   qwen3.FAMILY, gemma.GEMMA2_FAMILY, gemma.GEMMA3_FAMILY, phi3.FAMILY)
}


def family_names() -> list[str]:
    """Names of the registered model families, sorted (for config validation messages)."""
    return sorted(MODEL_FAMILIES)


def family_of(config: Any) -> Family:
    """The registered family whose config class `config` is (exactly: Qwen2Config is not LlamaConfig)."""
    for family in MODEL_FAMILIES.values():
        if type(config) is family.config_class:
            return family
    raise ValueError(f"{type(config).__name__} is not the config class of a registered model family")


def make_config(family: str, **fields: Any):
    """`family`'s config dataclass from keyword fields; unknown family or field, or a bad value, raise ValueError."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {family_names()}")
    config_cls = MODEL_FAMILIES[family].config_class
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


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready {"family": name, **fields}: what checkpoints record, and `config_from_dict` reads back."""
    return {"family": family_of(config).name, **dataclasses.asdict(config)}


def config_from_dict(fields: Mapping[str, Any]) -> Any:
    """The config recorded by `config_to_dict` (or a config section: family + fields)."""
    fields = dict(fields)
    return make_config(fields.pop("family"), **fields)


def config_from_section(section: Any, vocab_size: int) -> Any:
    """The random-model config that a config file's `model` section (family, sizes, no path) describes."""
    fields = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    fields.pop("path", None)
    fields.pop("config_path", None)  # a config.json the dry run sizes instead (build.model_config_of)
    fields.pop("reference_dtype", None)  # how π_ref is stored, not the architecture
    fields.pop("lora", None)  # adapters on the model (dpo_jax/lora.py), not its architecture
    return config_from_dict({**fields, "vocab_size": vocab_size})


def create_model(family: str, rngs: nnx.Rngs, **fields: Any) -> nnx.Module:
    """Build `family`'s config from keyword fields and initialise the model; bad names raise ValueError."""
    return model_from_config(make_config(family, **fields), rngs)


def model_from_config(config: Any, rngs: nnx.Rngs) -> nnx.Module:
    """A randomly initialised model of `config`'s family (params float32, N(0, 0.02²) weights)."""
    return family_of(config).model_class(config, rngs=rngs)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params): the static structure and the pure Param pytree (errors if other state exists)."""
    return nnx.split(model, nnx.Param)


def abstract_model(config: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params of jax.ShapeDtypeStruct): the model's structure without allocating or initialising it."""
    return split_params(nnx.eval_shape(lambda: model_from_config(config, nnx.Rngs(0))))


def param_path(keypath: tuple) -> tuple[str | int, ...]:
    """('layers', 0, 'self_attn', 'q_proj', 'kernel') from a jax key path into a params pytree."""
    return tuple(getattr(key, "key", getattr(key, "idx", None)) for key in keypath if not (
        isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"))
