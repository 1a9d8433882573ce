"""What each model family provides to the registry: its config dataclass, its module, and its Hugging Face layout.

A family module (llama.py, gpt2.py, ...) ends with `FAMILY = Family(...)`; `registry.py` collects them.
Our submodule names mirror Hugging Face's, so a parameter path maps to its checkpoint tensor name by rule
(`hf.py`): prefix + path, with our leaf names `kernel`/`embedding`/`scale` written as `weight`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from dpo_jax.models.layers import REMAT_MODES, ROPE_TYPE_FIELDS, ROPE_TYPES, RopeScaling

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCAN_LAYERS_FROM = 8  # scan_layers=None (auto) stacks the blocks into one scan from this many layers on


def _no_extras(_: Any) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """How a family's weights and config are written in a Hugging Face checkpoint."""

    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures[0], e.g. "LlamaForCausalLM"
    config_class: str  # the transformers config class, e.g. "LlamaConfig"
    prefix: str  # body tensors' name prefix ("model."); published checkpoints may omit it
    fields: tuple[tuple[str, str], ...]  # (our config field, transformers config attribute), copied both ways
    extras_from_hf: Callable[[Any], dict] = _no_extras  # transformers config -> our fields that need more than a copy
    extras_to_hf: Callable[[Any], dict] = _no_extras  # our config -> their attributes (ValueError if inexpressible)
    head: str = "lm_head"  # our untied output layer; its tensors carry no prefix
    conv1d: bool = False  # body kernels stored [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in]
    ignored: tuple[str, ...] = ()  # regexes of non-parameter buffers older checkpoints carry (masks, inv_freq)
    aliases: tuple[tuple[str, str], ...] = ()  # (other name, our name) pairs accepted when loading
    # (fused module, its parts): one checkpoint tensor whose rows are our parts' outputs in order (Phi-3's
    # ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))): split on load, fused on export
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # model_types of image-text checkpoints whose text part this family loads (their config's `text_config`; the
    # body tensors under one of `prefix_aliases`, the other towers in `ignored`): Gemma 3's "gemma3"
    text_of: tuple[str, ...] = ()
    prefix_aliases: tuple[str, ...] = ()  # other prefixes the body tensors may carry


@dataclasses.dataclass(frozen=True)
class Family:
    """A registered model family."""

    name: str
    config_class: type
    model_class: type[nnx.Module]
    hf: HFLayout


def config_from_hf(family: Family, hf_config: Any, dtype: str) -> Any:
    """Our config of `family` from a transformers config (an image-text one's text part), with compute dtype `dtype`."""
    if hf_config.model_type in family.hf.text_of:
        hf_config = hf_config.text_config
    fields = {ours: getattr(hf_config, theirs) for ours, theirs in family.hf.fields}
    return family.config_class(**fields, **family.hf.extras_from_hf(hf_config), dtype=dtype)


def config_to_hf(family: Family, config: Any, **token_ids: Any) -> Any:
    """The transformers config (what config.json holds) of our `config`, with bos/eos/pad `token_ids`."""
    import transformers

    fields = {theirs: getattr(config, ours) for ours, theirs in family.hf.fields}
    return getattr(transformers, family.hf.config_class)(**token_ids, **fields, **family.hf.extras_to_hf(config))


def check_config(
    config: Any,
    *,
    positive_ints: tuple[str, ...] = (),
    positive_numbers: tuple[str, ...] = (),
    bools: tuple[str, ...] = (),
) -> None:
    """ValueError naming `Class.field` for the first field that is not of its kind, or an unknown compute dtype."""
    name = type(config).__name__
    for field in positive_ints:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    for field in positive_numbers:
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name}.{field} must be a positive finite number, got {value!r}")
    for field in bools:
        if not isinstance(getattr(config, field), bool):
            raise ValueError(f"{name}.{field} must be True or False, got {getattr(config, field)!r}")
    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{name}.dtype must be one of {COMPUTE_DTYPES}, got {config.dtype!r}")
    check_choice(config, "remat", REMAT_MODES)


def resolve_scan_layers(config: Any, unsupported_with: str | None = None) -> None:
    """Set `config.scan_layers` (frozen) from None, "auto", to whether the model has ≥ SCAN_LAYERS_FROM layers, so a
    config (and the checkpoint metadata recording it) says which form its blocks take. `unsupported_with` names a
    setting under which the blocks cannot be stacked: auto then means unrolled, True is a ValueError."""
    name, value = type(config).__name__, config.scan_layers
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name}.scan_layers must be None (auto: from {SCAN_LAYERS_FROM} layers on), True or False, "
                         f"got {value!r}")
    if value and unsupported_with:
        raise ValueError(f"{name}.scan_layers=True is not supported with {unsupported_with}: its blocks differ by "
                         "layer; set scan_layers=False (or None)")
    if value is None:
        value = config.num_layers >= SCAN_LAYERS_FROM and not unsupported_with
    object.__setattr__(config, "scan_layers", value)


def check_choice(config: Any, field: str, allowed) -> None:
    """ValueError naming `Class.field` unless its value is one of `allowed`."""
    value = getattr(config, field)
    if value not in allowed:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {sorted(allowed)}, got {value!r}")


def hf_unsupported(hf_config: Any, **supported: Any) -> dict[str, Any]:
    """ValueError naming a config.json setting whose value we do not implement (instead of silently ignoring it);
    {} when every setting has its `supported` value."""
    for key, value in supported.items():
        if getattr(hf_config, key, value) != value:
            raise ValueError(
                f"config.json: {hf_config.model_type} with {key}={getattr(hf_config, key)!r} is not supported "
                f"(only {value!r})"
            )
    return {}


def rope_from_hf(hf_config: Any) -> tuple[float, Any, float]:
    """(rope_theta, RopeScaling or None, partial_rotary_factor) from a transformers config's `rope_parameters`.

    transformers (>= 5) fills `rope_parameters` from either form of config.json: `rope_parameters`, or the
    older `rope_theta` + `rope_scaling` (and GPT-NeoX's `rotary_emb_base` / `rotary_pct`).
    """
    return rope_from_params(hf_config.rope_parameters, hf_config.max_position_embeddings)


def rope_from_params(rope_parameters: dict | None, max_position_embeddings: int) -> tuple[float, Any, float]:
    """`rope_from_hf` of one `rope_parameters` dict (Gemma 3 has one per layer type); ValueError naming an
    unsupported rope_type."""
    params = dict(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = None
    if rope_type in ROPE_TYPES:
        original = int(params.get("original_max_position_embeddings") or max_position_embeddings)
        if rope_type == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
            raise ValueError(f"config.json: yarn with mscale={params.get('mscale')!r}, mscale_all_dim="
                             f"{params.get('mscale_all_dim')!r} is not supported (only attention_factor)")
        attention_factor = params.get("attention_factor")
        scaling = RopeScaling(
            rope_type,
            factor=float(params["factor"] if params.get("factor") is not None else max_position_embeddings / original),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=None if attention_factor is None else float(attention_factor),
            truncate=bool(params.get("truncate", True)),
        )
    elif rope_type != "default":
        raise ValueError(
            f"config.json: rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_TYPES)}"
        )
    return float(params["rope_theta"]), scaling, float(params.get("partial_rotary_factor", 1.0))


def rope_to_hf(theta: float, scaling: Any, partial_rotary_factor: float | None = None) -> dict:
    """The `rope_parameters` dict of config.json (transformers 5's form) for our rotary settings."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:  # the keys its type reads (transformers warns about others)
        fields = dataclasses.asdict(scaling)
        params.update({"rope_type": scaling.rope_type, **{key: fields[key] for key in ROPE_TYPE_FIELDS[
            scaling.rope_type] if fields[key] is not None}})
    if partial_rotary_factor is not None:
        params["partial_rotary_factor"] = partial_rotary_factor
    return params
