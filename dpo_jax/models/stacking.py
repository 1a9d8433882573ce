"""The blocks' params in their two forms, and the conversions between them.

Unrolled, block i's params live at `<blocks>/i/...` (Hugging Face's names: `layers/3/self_attn/q_proj/kernel`);
stacked (`scan_layers`), all blocks' at `<blocks>/...` with a leading layer axis (`layers/self_attn/q_proj/kernel`
[L, D, H·K]), slice i being block i. `hf.py` names each slice as its layer's tensor, `sharding.py` keeps the layer
axis unsharded, and `checkpoint.py` restores a checkpoint written in either form into the other.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax.models.registry import MODEL_FAMILIES, abstract_model, family_of, param_path


def blocks_name(family: str) -> str:
    """The name under which `family`'s blocks live in its params ('layers', or GPT-2's and GPT-J's 'h')."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {sorted(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family].model_class.NAMES.blocks


def is_stacked_path(path: str, family: str) -> bool:
    """Whether a '/'-joined leaf path (params, or an optimizer slot shaped like one) holds stacked blocks: it passes
    through `family`'s blocks with no layer index after them ('params/layers/mlp/...', not 'params/layers/0/...')."""
    return re.search(rf"(?:^|/){re.escape(blocks_name(family))}/(?!\d+(?:/|$))", path) is not None


def layer_paths(path: tuple, config: Any) -> list[tuple]:
    """The unrolled paths of a param path: [path] for one outside the blocks or already per layer, else the L
    per-layer paths of a stacked one ('layers', 'mlp', ...) -> [('layers', 0, 'mlp', ...), ...]."""
    blocks = family_of(config).model_class.NAMES.blocks
    if len(path) < 2 or path[0] != blocks or isinstance(path[1], int):
        return [path]
    return [(path[0], index, *path[1:]) for index in range(config.num_layers)]


def to_form(params: nnx.State, config: Any, scan_layers: bool) -> tuple[nnx.State, Any]:
    """(params, config) of the same weights with the blocks unrolled (scan_layers False) or stacked (True): the
    same model in the other form, e.g. to compare them or to load a stacked run's weights into an unrolled one."""
    config = dataclasses.replace(config, scan_layers=scan_layers)
    by_path = {param_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    blocks = family_of(config).model_class.NAMES.blocks

    def leaf(keypath, _):
        path = param_path(keypath)
        if path in by_path:
            return by_path[path]
        if isinstance(path[1], int):  # per layer here, stacked in `params`: the layer's slice
            return by_path[(blocks, *path[2:])][path[1]]
        return jnp.stack([by_path[p] for p in layer_paths(path, config)])

    return jax.tree_util.tree_map_with_path(leaf, abstract_model(config)[1]), config


class FormChange(NamedTuple):
    """How to read a checkpoint whose blocks are in the other form: restore `stored_target` (flat, in the stored
    form), then `convert` the restored flat tree into the expected one."""

    stored_target: dict[tuple, Any]
    convert: Callable[[Mapping[tuple, Any]], dict[tuple, Any]]


def form_change(stored: Mapping[tuple, Any], expected: Mapping[tuple, Any]) -> FormChange | None:
    """The FormChange from a checkpoint's flat tree `stored` (leaves with `.shape`, keys string tuples as Orbax's
    `to_flat_dict` gives them) to the flat restore target `expected`, when they differ by the form of the blocks:
    `expected` stacked ('layers', 'mlp', ...) [L, ...] where `stored` has ('layers', '0', 'mlp', ...) ... ('layers',
    'L−1', ...), or the reverse. None unless that accounts for every stored leaf (same form, or another model)."""
    sources: dict[tuple, Any] = {}  # expected path -> the stored paths of its slices, or (stored stack, layer)
    for path in expected.keys() - stored.keys():
        shape = tuple(getattr(expected[path], "shape", ()))
        for cut in range(1, len(path)):
            slices = [(*path[:cut], str(i), *path[cut:]) for i in range(shape[0])] if shape else []
            if slices and all(s in stored for s in slices):
                sources[path] = slices
                break
            key, rest = path[cut], (*path[:cut], *path[cut + 1:])
            if str(key).isdigit() and rest in stored and int(key) < stored[rest].shape[0]:
                sources[path] = (rest, int(key))
                break
    stored_target = {path: leaf for path, leaf in expected.items() if path not in sources}
    for path, source in sources.items():
        leaf = expected[path]
        if isinstance(source, list):
            for stored_path in source:
                stored_target[stored_path] = _layer_struct(leaf, stored[stored_path].shape, stacked=False)
        else:
            stored_target[source[0]] = _layer_struct(leaf, stored[source[0]].shape, stacked=True)
    if not sources or stored_target.keys() != stored.keys():  # the same form, or another model
        return None

    def convert(restored: Mapping[tuple, Any]) -> dict[tuple, Any]:
        out = {}
        for path, leaf in expected.items():
            source = sources.get(path)
            if source is None:
                out[path] = restored[path]
                continue
            if isinstance(source, list):  # the stack of the stored layers
                value = jnp.stack([restored[p] for p in source])
            else:  # one layer of the stored stack
                value = restored[source[0]][source[1]]
            sharding = getattr(leaf, "sharding", None)
            out[path] = value if sharding is None else jax.device_put(value, sharding)
        return out

    return FormChange(stored_target, convert)


def _layer_struct(leaf: Any, shape: tuple, stacked: bool) -> jax.ShapeDtypeStruct:
    """The restore target of a stored leaf of `shape` standing for one layer's slice of `leaf` (stacked=False) or
    for the stack of which `leaf` is one layer: its dtype, and its sharding without (or with) the layer axis."""
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)
        spec = (None, *spec) if stacked else spec[1:]
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec))
    return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=sharding)
