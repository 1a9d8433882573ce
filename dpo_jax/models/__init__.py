"""Model families by name, the pure (graphdef, params) helpers the trainer and sampler use, and HF import/export.

Every family is a frozen config dataclass and an `nnx.Module` holding only `nnx.Param` state, with one interface:
`__call__(tokens_BxT, positions_BxT=None, segment_ids_BxT=None, branch_ids_BxT=None) -> hidden_BxTxD` and
`logits(hidden_BxTxD) -> logits_BxTxV` (float32). Positions and segment ids let several sequences share a row:
a token attends only to earlier tokens of its own segment; branch ids let sequences share a prefix (branch 0 is
seen by every branch of its segment, another branch only by itself: `layers.attention_mask`). For decoding,
`empty_cache(batch, slots)` and `__call__(tokens, positions, cache=cache) -> (hidden, cache)` keep each layer's keys
and values (`layers.KVCache`, slot = position). Families: gpt2, gptj, gpt_neox (Pythia), llama, qwen2, mistral —
one small file each on `layers.py`; `hf.py` reads and writes Hugging Face checkpoints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from flax import nnx

from dpo_jax.models import gpt2, gpt_neox, gptj, llama, mistral, qwen2
from dpo_jax.models.family import COMPUTE_DTYPES, Family
from dpo_jax.models.layers import REMAT_MODES

MODEL_FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (gpt2.FAMILY, gptj.FAMILY, gpt_neox.FAMILY, llama.FAMILY, qwen2.FAMILY, mistral.FAMILY)
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
    fields.pop("reference_dtype", None)  # how π_ref is stored, not the architecture
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


def apply_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens_BxT: jax.Array,
    positions_BxT: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    branch_ids_BxT: jax.Array | None = None,
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """Run the model purely: (hidden_BxTxD, logits_fn), where logits_fn(hidden chunk) gives float32 logits.

    Returning `logits_fn` instead of logits lets callers compute [B, T, V] logits chunk by chunk.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens_BxT, positions_BxT, segment_ids_BxT, branch_ids_BxT), model.logits


def apply_with_cache(
    graphdef: nnx.GraphDef, params: nnx.State, tokens_BxT: jax.Array, positions_BxT: jax.Array, cache: list,
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array], list]:
    """`apply_model` for decoding: (hidden_BxTxD, logits_fn, cache) with these tokens' keys and values written into
    `cache` (from `empty_cache`) at `positions_BxT`, each token attending to the cache's slots up to its position."""
    model = nnx.merge(graphdef, params)
    hidden_BxTxD, cache = model(tokens_BxT, positions_BxT, cache=cache)
    return hidden_BxTxD, model.logits, cache


def empty_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, slots: int) -> list:
    """The model's zeroed KV cache (a `layers.KVCache` per layer) for `batch` rows of `slots` positions."""
    return nnx.merge(graphdef, params).empty_cache(batch, slots)


from dpo_jax.models.hf import is_local_path, load_hf, read_hf_config, save_hf  # noqa: E402  (hf.py uses the above)

__all__ = [
    "COMPUTE_DTYPES", "MODEL_FAMILIES", "REMAT_MODES", "abstract_model", "apply_model", "apply_with_cache",
    "config_from_dict", "empty_cache", "config_from_section",
    "config_to_dict", "create_model", "family_names", "family_of", "is_local_path", "load_hf", "make_config",
    "model_from_config", "param_path", "read_hf_config", "save_hf", "split_params",
]
