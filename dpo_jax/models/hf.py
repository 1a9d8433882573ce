"""Hugging Face checkpoints in and out: `load_hf` reads config.json and safetensors straight into our params
pytree, one tensor at a time; `save_hf` writes them back under the same names, shapes and layout.

A parameter path maps to its tensor name by rule (see `hf_tensor_name`), so nothing here is per family
beyond the `HFLayout` each family declares. Stacked blocks (`scan_layers`) read and write each layer's slice under
that layer's name, so a checkpoint is the same in either form. Every mismatch (unsupported model_type, a missing, unexpected or
mis-shaped tensor, a missing shard file) is an error naming it: nothing is left at its random initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from dpo_jax.models.family import HFLayout, config_from_hf, config_to_hf
from dpo_jax.models.gguf import GGUF_SUFFIX, gguf_file, gguf_tensors, read_gguf_config
from dpo_jax.models.registry import MODEL_FAMILIES, abstract_model, family_of, param_path
from dpo_jax.models.stacking import layer_paths

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
# Our leaf names -> Hugging Face's: Linear kernel, Embed table and norm scale are all called "weight".
_LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# What a checkpoint directory needs; snapshot_download fetches only these.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]

ShardingFn = Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]


def is_local_path(path: str) -> bool:
    """Whether `path` names a local directory or GGUF file (existing or not) rather than a Hub repo id ("org/name" or
    "name")."""
    return os.path.isdir(path) or path.endswith(GGUF_SUFFIX) or path.startswith((".", "/", "~")) or path.count("/") > 1


def resolve_checkpoint_dir(path: str, config_only: bool = False) -> str:
    """A local checkpoint directory for `path`: itself if it is a directory, else a Hugging Face repo id fetched
    (or found in the local cache) with huggingface_hub, which respects HF_HUB_OFFLINE and HF_HOME; `config_only`
    fetches config.json alone."""
    if is_local_path(path):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model path {path!r}: no such directory")
        return path
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id=path, allow_patterns=[CONFIG_FILE] if config_only else _HUB_PATTERNS)
    except Exception as error:  # offline without a cached copy, unknown repo, no network, bad id
        raise FileNotFoundError(
            f"model path {path!r} is not a local directory, and the Hugging Face Hub gave no copy of it "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {type(error).__name__}: {error}"
        ) from error


def read_hf_config(path: str, dtype: str = "float32") -> Any:
    """Our family config from `path`'s config.json (local directory or repo id; no weights needed; or a .json file
    itself), or from the metadata of the GGUF file `path` names (models/gguf.py), with compute dtype `dtype`."""
    if (gguf_path := gguf_file(path)) is not None:
        hf_config = read_gguf_config(gguf_path)
        family = next(f for f in MODEL_FAMILIES.values() if f.hf.model_type == hf_config.model_type)
        return config_from_hf(family, hf_config, dtype)
    if path.endswith(".json") and os.path.isfile(path):  # a config.json alone: the architecture, no checkpoint
        directory, config_path = "", path
    else:
        directory = resolve_checkpoint_dir(path, config_only=True)
        config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: missing; a Hugging Face checkpoint directory needs its config.json")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    family = next((f for f in MODEL_FAMILIES.values() if model_type in (f.hf.model_type, *f.hf.text_of)), None)
    if family is None:
        supported = sorted(t for f in MODEL_FAMILIES.values() for t in (f.hf.model_type, *f.hf.text_of))
        raise ValueError(f"{config_path}: model_type {model_type!r} is not supported; supported: {', '.join(supported)}")
    import transformers

    if directory:
        hf_config = transformers.AutoConfig.from_pretrained(directory)
    else:
        with open(config_path) as f:
            hf_config = transformers.AutoConfig.for_model(**json.load(f))
    try:
        return config_from_hf(family, hf_config, dtype)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error


def hf_tensor_name(path: tuple, layout: HFLayout) -> tuple[str, bool]:
    """(checkpoint tensor name, whether it is stored transposed) of our parameter at `path`.

    ('layers', 0, 'self_attn', 'q_proj', 'kernel') -> ('model.layers.0.self_attn.q_proj.weight', True): a prefix
    for the body, none for the output head; nn.Linear stores [out, in] where our kernels are [in, out].
    """
    *modules, leaf = path
    is_head = modules[0] == layout.head
    name = ("" if is_head else layout.prefix) + ".".join(map(str, modules)) + "." + _LEAF_NAMES[leaf]
    return name, leaf == "kernel" and (is_head or not layout.conv1d)


def _tensor_files(directory: str) -> dict[str, str]:
    """{tensor name: safetensors file} from the index of a sharded checkpoint, or the single file's header."""
    from safetensors import safe_open

    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: expected a non-empty 'weight_map' of tensor name -> file")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(directory, file)):
                names = sorted(name for name, f in weight_map.items() if f == file)
                raise FileNotFoundError(
                    f"{os.path.join(directory, file)}: missing safetensors shard named by {INDEX_FILE} "
                    f"for {len(names)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                )
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    single_path = os.path.join(directory, SINGLE_FILE)
    if not os.path.isfile(single_path):
        found = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".safetensors", ".h5")))
        raise FileNotFoundError(
            f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (found: {found or 'no weight files'}); "
            "only safetensors checkpoints are read"
        )
    with safe_open(single_path, framework="numpy") as f:
        return {name: single_path for name in f.keys()}


def _match_tensors(
    names: dict, files: dict[str, str], layout: HFLayout, directory: str, optional: frozenset = frozenset(),
    expected_extra: frozenset = frozenset(),
) -> dict:
    """{our path: checkpoint name actually present}; ValueError listing missing and unexpected tensors. Paths in
    `optional` may be absent; names in `expected_extra` are no surprise."""
    aliases = {ours: other for other, ours in layout.aliases}
    found, missing = {}, []
    for path, (name, _) in names.items():
        candidates = [name, name.removeprefix(layout.prefix), aliases.get(name)] + [
            alias + name.removeprefix(layout.prefix) for alias in layout.prefix_aliases if name.startswith(layout.prefix)]
        present = next((c for c in candidates if c in files), None)
        if present is not None:
            found[path] = present
        elif path not in optional:
            missing.append(name)
    used = set(found.values()) | expected_extra
    unexpected = sorted(
        name for name in files if name not in used and not any(re.fullmatch(p, name) for p in layout.ignored)
    )
    if missing or unexpected:
        raise ValueError(
            f"{directory}: the checkpoint does not match its config.json's {layout.architecture}: "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )
    return found


def load_hf(
    path: str, *, dtype: str = "float32", shardings: ShardingFn | None = None, scan_layers: bool | None = None
) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, params, model config) of the Hugging Face checkpoint at `path` (a directory or a repo id), or of
    the GGUF file it names (a .gguf file, or a directory holding one: models/gguf.py dequantises each tensor).

    Reads config.json and `model.safetensors` (or the shards of `model.safetensors.index.json`) tensor by tensor
    into params of `dtype`, which is also the model's compute dtype; at most one param (with stacked blocks, one
    param's layers) is ever held twice in host memory. `shardings(path, shape_dtype)` may place each param on its
    target sharding (default: one device). The blocks are stacked or unrolled as `scan_layers` says (None: auto,
    by the number of layers); each layer's tensors keep their names either way.
    """
    source = gguf_file(path) or resolve_checkpoint_dir(path)
    graphdef, params, config, _ = _load(source, dtype, shardings, scan_layers=scan_layers)
    return graphdef, params, config


def load_hf_body(
    path: str, head_tensors: Sequence[str], *, dtype: str = "float32"
) -> tuple[nnx.GraphDef, nnx.State, Any, dict[str, np.ndarray]]:
    """(graphdef, params, model config, {name: array}) of a checkpoint whose head is not the LM head, e.g. a
    `<Family>ForSequenceClassification` with `score.weight`: the body loads as `load_hf` loads it, the LM head
    (absent there) stays as jax.ShapeDtypeStruct leaves (use the model for hidden states only), and each of
    `head_tensors` comes back as stored, as a numpy array; ValueError naming any of them that is missing."""
    directory = resolve_checkpoint_dir(path)
    return _load(directory, dtype, None, tuple(head_tensors))


def _load(
    directory: str, dtype: str, shardings: ShardingFn | None, head_tensors: tuple[str, ...] | None = None,
    scan_layers: bool | None = None,
) -> tuple[nnx.GraphDef, nnx.State, Any, dict[str, np.ndarray]]:
    """`load_hf` (head_tensors None: every param, the LM head included) or `load_hf_body` (named head tensors)."""
    from safetensors import safe_open

    config = dataclasses.replace(read_hf_config(directory, dtype), scan_layers=scan_layers)
    layout = family_of(config).hf
    graphdef, abstract = abstract_model(config)
    flat_abstract = {param_path(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    per_layer = {p: layer_paths(p, config) for p in flat_abstract}  # [p], or a stacked param's layers' paths
    names = {layer_path: hf_tensor_name(layer_path, layout) for paths in per_layer.values() for layer_path in paths}
    is_gguf = directory.endswith(GGUF_SUFFIX)
    files = gguf_tensors(directory, config.num_heads, config.num_kv_heads) if is_gguf else _tensor_files(directory)
    if layout.fused:
        out_rows = {names[q][0]: flat_abstract[p].shape[-1] for p, paths in per_layer.items() for q in paths}
        files = split_fused(files, layout, out_rows)
    extra: dict[str, np.ndarray] = {}
    lm_head: frozenset = frozenset()
    if head_tensors is not None:
        absent = [name for name in head_tensors if name not in files]
        if absent:
            raise ValueError(f"{directory}: the checkpoint has no tensor(s) {absent}, which its head needs")
        for name in head_tensors:
            with safe_open(files[name], framework="numpy") as f:
                extra[name] = f.get_tensor(name)
        lm_head = frozenset(p for p in names if p[0] == layout.head)
    present = _match_tensors(names, files, layout, directory, lm_head, frozenset(extra))

    loaded: dict[tuple, jax.Array] = {}
    for p, layer_paths_of_p in per_layer.items():
        if layer_paths_of_p[0] not in present:  # the LM head load_hf_body leaves abstract
            continue
        target = jax.ShapeDtypeStruct(flat_abstract[p].shape, jnp.dtype(dtype))
        if layer_paths_of_p == [p]:
            array = _read_tensor(files, present[p], names[p][1], target.shape, layout).astype(target.dtype)
        else:  # stacked blocks: each layer's tensor converted straight into its slice
            array = np.empty(target.shape, target.dtype)
            for index, q in enumerate(layer_paths_of_p):
                array[index] = _read_tensor(files, present[q], names[q][1], target.shape[1:], layout)
        loaded[p] = _place(array, target, None if shardings is None else shardings(p, target))
        del array
    logging.info("loaded %d tensors of %s from %s", len(present), layout.architecture, directory)
    # Only load_hf_body leaves any param unloaded: the LM head its checkpoint lacks stays abstract.
    params = jax.tree_util.tree_map_with_path(lambda kp, leaf: loaded.get(param_path(kp), leaf), abstract)
    return graphdef, params, config, extra


@dataclasses.dataclass(frozen=True)
class FusedPart:
    """Rows [start, stop) of a fused checkpoint tensor (Phi-3's qkv_proj, gate_up_proj): one of our params, read
    when called. Prints as its file, for messages."""

    source: Any  # the fused tensor's safetensors file, or a GGUF tensor that reads itself
    name: str  # the fused tensor's name
    start: int
    stop: int

    def __call__(self) -> np.ndarray:
        if callable(self.source):
            array = self.source()
        else:
            from safetensors import safe_open

            with safe_open(self.source, framework="numpy") as f:
                array = f.get_tensor(self.name)
        if array.shape[0] < self.stop:
            raise ValueError(f"{self.source}: fused tensor {self.name!r} has {array.shape[0]} rows, expected at "
                             f"least {self.stop} for its parts")
        return array[self.start:self.stop]

    def __str__(self) -> str:
        return str(self.source)


def split_fused(files: dict[str, Any], layout: HFLayout, out_rows: dict[str, int]) -> dict[str, Any]:
    """`files` with each fused tensor (`layout.fused`) replaced by its parts, read as row slices of it: part names
    and their output sizes from `out_rows` {our tensor name: rows}. A fused tensor of the wrong total size is left
    whole, so the loader reports its parts missing and it unexpected."""
    files = dict(files)
    for fused, parts in layout.fused:
        suffix = f".{fused}.weight"
        for name in [n for n in files if n.endswith(suffix)]:
            stem = name[: -len(suffix)]
            part_names = [f"{stem}.{part}.weight" for part in parts]
            if not all(part in out_rows and part not in files for part in part_names):
                continue
            source, start = files.pop(name), 0
            for part in part_names:
                files[part] = FusedPart(source, name, start, start + out_rows[part])
                start += out_rows[part]
    return files


def _read_tensor(files: dict[str, Any], name: str, transposed: bool, shape: tuple, layout: HFLayout) -> np.ndarray:
    """Checkpoint tensor `name` in our layout (transposed back if stored transposed), checked to have `shape`;
    `files[name]` is its safetensors file, or a GGUF tensor that reads itself."""
    from safetensors import safe_open

    if callable(files[name]):
        array = files[name]()
    else:  # opened per tensor: closing unmaps the file, so its pages never pile up beside the params in RSS
        with safe_open(files[name], framework="numpy") as f:
            if name not in f.keys():
                raise ValueError(f"{files[name]}: has no tensor {name!r}, though {INDEX_FILE} maps it there")
            array = f.get_tensor(name)
    expected = tuple(shape)[::-1] if transposed else tuple(shape)
    if tuple(array.shape) != expected:
        raise ValueError(
            f"{files[name]}: tensor {name!r} has shape {list(array.shape)}, expected {list(expected)} "
            f"for {layout.architecture} as config.json describes it"
        )
    return array.T if transposed else array


def _place(array: np.ndarray, target: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(target.shape, sharding, lambda index: array[index])


def fuse_for_export(tensors: list, layout: HFLayout) -> list:
    """[((name, transposed), [(leaf, layer or None), ...])]: each checkpoint tensor with the params (or stacked
    params' layers) whose rows it concatenates: one, or a fused tensor's parts in order (`layout.fused`)."""
    by_name = {name: (transposed, leaf, layer) for (name, transposed), leaf, layer in tensors}
    out, used = [], set()
    for fused, parts in layout.fused:
        first = f".{parts[0]}.weight"
        for name in [n for n in by_name if n.endswith(first)]:
            stem = name[: -len(first)]
            part_names = [f"{stem}.{part}.weight" for part in parts]
            out.append(((f"{stem}.{fused}.weight", by_name[name][0]),
                        [by_name[part][1:] for part in part_names]))
            used.update(part_names)
    out += [((name, transposed), [(leaf, layer)]) for name, (transposed, leaf, layer) in by_name.items()
            if name not in used]
    return sorted(out, key=lambda entry: entry[0][0])


def save_hf(
    params: nnx.State,
    model_config: Any,
    out_dir: str,
    tokenizer: Any = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a checkpoint transformers (and so vLLM) loads unchanged: config.json, safetensors, the tokenizer.

    Tensors keep their Hugging Face names, shapes and layouts, in `dtype` (default: the params' own). Above
    `max_shard_bytes` they are split into `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`;
    one shard at a time is converted in host memory. The tokenizer (anything with `save_pretrained`) also sets
    config.json's bos/eos/pad token ids; without it they are left unset.
    """
    from safetensors.numpy import save_file

    family = family_of(model_config)
    layout = family.hf
    leaves = [(param_path(kp), leaf) for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    # (name, transposed), the param, and its layer when it is a stack of layers (sliced only when written)
    tensors = fuse_for_export(sorted(
        (hf_tensor_name(layer_path, layout), leaf, None if paths == [p] else index)
        for p, leaf in leaves for paths in [layer_paths(p, model_config)] for index, layer_path in enumerate(paths)
    ), layout)
    out_dtype = jnp.dtype(dtype) if dtype else None
    token_ids = {key: getattr(tokenizer, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf_config = config_to_hf(family, model_config, **token_ids)  # first: a config with no HF form writes nothing
    hf_config.architectures = [layout.architecture]
    hf_config.dtype = str(out_dtype or jnp.dtype(leaves[0][1].dtype))

    shards: list[list] = [[]]
    shard_bytes = 0
    for entry in tensors:
        nbytes = sum(leaf.size // (leaf.shape[0] if layer is not None else 1) * (out_dtype or leaf.dtype).itemsize
                     for leaf, layer in entry[1])
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes

    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # shards of an earlier export would mix with ours
        if stale.endswith(".safetensors") or stale == INDEX_FILE:
            os.remove(os.path.join(out_dir, stale))
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total_bytes = {}, 0
    for file, shard in zip(files, shards):
        arrays = {}
        for (name, transposed), sources in shard:
            parts = [np.asarray(jax.device_get(leaf if layer is None else leaf[layer])) for leaf, layer in sources]
            array = np.ascontiguousarray(np.concatenate([part.T if transposed else part for part in parts]))
            arrays[name] = array.astype(out_dtype) if out_dtype is not None else array
            weight_map[name] = file
            total_bytes += arrays[name].nbytes
        save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2, sort_keys=True)

    hf_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logging.info("saved %d tensors in %d file(s) to %s", len(tensors), len(files), out_dir)
