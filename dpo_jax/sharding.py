"""Where every array lives: the Mesh from config, the partition rules (parameter-path patterns → PartitionSpec,
written as data per model family), the batch's sharding, and multi-host start-up. The one place for these rules.

Mesh axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism with params, gradients and
optimizer state sharded), `tensor` (Megatron-style: attention heads and MLP columns split). The batch is split over
data × fsdp. Kernels are [in, out]: column-parallel layers (q/k/v, up/gate, the head) put `in` on fsdp and `out` on
tensor; row-parallel ones (attention output, down projection) the reverse; embeddings [V, D] put the vocabulary on
tensor. A dimension its axis does not divide (GPT-2's 50257 words on 8 devices) stays unsharded on that axis, and
the run logs which: never an error, never a different result.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpo_jax import models

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

COLUMN = P("fsdp", "tensor")  # [in, out] kernel whose outputs are split: q/k/v, up/gate, the output head
ROW = P("tensor", "fsdp")  # [in, out] kernel whose inputs are split: attention output, down projection
EMBEDDING = P("tensor", "fsdp")  # [vocabulary, hidden]
SPLIT = P("tensor")  # the bias of a column-parallel layer
REPLICATED = P()  # norms, biases of row-parallel layers


class Rule(NamedTuple):
    """Parameters whose path ends with `pattern` (a regex over 'a/b/c' paths, matched at a '/' boundary) are
    sharded as `spec`. An `optional` rule covers a parameter some configs lack (an untied head, biases)."""

    pattern: str
    spec: P
    optional: bool = False


_LLAMA = (  # also Qwen2 (q/k/v biases) and Mistral
    Rule("embed_tokens/embedding", EMBEDDING),
    Rule("self_attn/[qkv]_proj/kernel", COLUMN),
    Rule("self_attn/[qkv]_proj/bias", SPLIT, optional=True),
    Rule("self_attn/o_proj/kernel", ROW),
    Rule("self_attn/o_proj/bias", REPLICATED, optional=True),
    Rule("mlp/(gate|up)_proj/kernel", COLUMN),
    Rule("mlp/(gate|up)_proj/bias", SPLIT, optional=True),
    Rule("mlp/down_proj/kernel", ROW),
    Rule("mlp/down_proj/bias", REPLICATED, optional=True),
    Rule("lm_head/kernel", COLUMN, optional=True),
    Rule("(norm|input_layernorm|post_attention_layernorm)/scale", REPLICATED),
)

_QK_NORMS = Rule("self_attn/(q_norm|k_norm)/scale", REPLICATED)  # [head_dim]: Qwen3's and Gemma 3's q/k norms
_GEMMA = (  # Gemma 2 and 3: Llama's layers, four norms a block, q/k norms on Gemma 3
    *_LLAMA[:-1],
    Rule("(norm|input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)/scale",
         REPLICATED),
    _QK_NORMS._replace(optional=True),
)

PARTITION_RULES: dict[str, tuple[Rule, ...]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "qwen3": (*_LLAMA, _QK_NORMS),
    "phi3": _LLAMA,  # its fused qkv_proj / gate_up_proj are split into Llama's layers on load
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gpt2": (
        Rule("wte/embedding", EMBEDDING),
        Rule("wpe/embedding", P(None, "fsdp")),
        Rule("(c_attn|c_fc)/kernel", COLUMN),
        Rule("(c_attn|c_fc)/bias", SPLIT),
        Rule("c_proj/kernel", ROW),
        Rule("c_proj/bias", REPLICATED),
        Rule("lm_head/kernel", COLUMN, optional=True),
        Rule("(ln_1|ln_2|ln_f)/(scale|bias)", REPLICATED),
    ),
    "gptj": (
        Rule("wte/embedding", EMBEDDING),
        Rule("attn/[qkv]_proj/kernel", COLUMN),
        Rule("attn/out_proj/kernel", ROW),
        Rule("mlp/fc_in/kernel", COLUMN),
        Rule("mlp/fc_in/bias", SPLIT),
        Rule("mlp/fc_out/kernel", ROW),
        Rule("mlp/fc_out/bias", REPLICATED),
        Rule("lm_head/kernel", COLUMN),
        Rule("lm_head/bias", SPLIT),
        Rule("(ln_1|ln_f)/(scale|bias)", REPLICATED),
    ),
    "gpt_neox": (
        Rule("embed_in/embedding", EMBEDDING),
        Rule("embed_out/kernel", COLUMN, optional=True),
        Rule("(query_key_value|dense_h_to_4h)/kernel", COLUMN),
        Rule("(query_key_value|dense_h_to_4h)/bias", SPLIT),
        Rule("(attention/dense|dense_4h_to_h)/kernel", ROW),
        Rule("(attention/dense|dense_4h_to_h)/bias", REPLICATED),
        Rule("(input_layernorm|post_attention_layernorm|final_layer_norm)/(scale|bias)", REPLICATED),
    ),
}


def check_mesh_sizes(mesh_config: Any) -> None:
    """ValueError naming `config.mesh.<axis>` unless each axis is a positive size or -1 ("the rest of the devices"),
    and -1 is used at most once."""
    for axis in MESH_AXES:
        size = mesh_config[axis]
        if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ValueError(f"config.mesh.{axis} = {size!r} is invalid: expected a positive number of devices, or -1 "
                             "for the rest")
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"config.mesh = {sizes} is invalid: expected at most one axis of -1")


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from `config.mesh`; one of them may be -1, "the rest of the devices"."""
    check_mesh_sizes(mesh_config)
    sizes = [mesh_config[axis] for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh = {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible "
                             f"by the fixed axes' {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh = {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are "
                         f"{num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) Mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def path_string(keypath: tuple) -> str:
    """'opt_state/1/nu/layers/0/mlp/up_proj/kernel' from a jax key path (an nnx Variable's '.value' left out)."""
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                names.append(key.name)
        else:
            names.append(str(getattr(key, "key", getattr(key, "idx", key))))
    return "/".join(names)


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(rf"(?:^|/)(?:{pattern})$")


def _spec_of(path: str, rules: Sequence[Rule]) -> tuple[int, P] | None:
    for index, rule in enumerate(rules):
        if _compiled(rule.pattern).search(path):
            return index, rule.spec
    return None


ADAPTER_LEAF = re.compile(r"/(lora/lora_a|lora/lora_b|kernel_scale)$")  # dpo_jax/lora.py's leaves beside a kernel


def _adapter_spec(leaf: str, kernel: P, ndim: int) -> P:
    """The spec of one layer's leaf of rank `ndim` beside a kernel sharded as `kernel`: a LoRA factor takes the
    kernel's sharding on the dimension they share (A [in, r] the input's, B [r, out] the output's), the rank
    replicated; int8 scales [out] the output's, NF4 scales [in/block, out] the kernel's."""
    inputs, outputs = (tuple(kernel) + (None, None))[:2]
    return {"lora/lora_a": P(inputs, None), "lora/lora_b": P(None, outputs)}.get(
        leaf, P(inputs, outputs) if ndim >= 2 else P(outputs))


def partition_specs(tree: Any, family: str) -> Any:
    """The PartitionSpec of every leaf of `tree` (params, a TrainState, or their abstract forms) by `family`'s rules.

    Leaves are matched by the end of their path, so optimizer slots shaped like a parameter get its spec; scalars
    (step counts) are replicated; stacked blocks (`scan_layers`) keep their leading layer axis unsharded. A leaf
    of rank ≥ 1 that no rule matches, or a rule (not optional) that matches no leaf, is a ValueError naming it: a
    new parameter must get its rule here, not fall back silently.
    """
    if family not in PARTITION_RULES:
        raise ValueError(f"no partition rules for model family {family!r}; families: {sorted(PARTITION_RULES)}")
    rules = PARTITION_RULES[family]
    used, unmatched, adapted = set(), [], []

    def spec(keypath, leaf):
        if np.ndim(leaf) == 0:
            return REPLICATED
        path = path_string(keypath)
        found = _spec_of(path, rules)
        adapter = ADAPTER_LEAF.search(path)
        if adapter:  # a LoRA factor or a quantised kernel's scales: from its kernel's rule
            found, kernel = None, _spec_of(path[: adapter.start()] + "/kernel", rules)
            if kernel is not None:
                adapted.append(path)
                layer_ndim = np.ndim(leaf) - models.is_stacked_path(path, family)
                found = kernel[0], _adapter_spec(adapter.group(1), kernel[1], layer_ndim)
        if found is None:
            unmatched.append(path)
            return REPLICATED
        used.add(found[0])
        return P(None, *found[1]) if models.is_stacked_path(path, family) else found[1]

    specs = jax.tree_util.tree_map_with_path(spec, tree)
    if unmatched:
        raise ValueError(f"sharding: no partition rule of family {family!r} matches {', '.join(unmatched[:5])}"
                         f"{' ...' if len(unmatched) > 5 else ''}; add one to PARTITION_RULES in sharding.py")
    unused = [rule.pattern for i, rule in enumerate(rules) if i not in used and not rule.optional]
    if unused and jax.tree.leaves(tree) and not adapted:  # LoRA's adapters alone hold no embedding, no norm
        raise ValueError(f"sharding: the partition rule(s) {unused} of family {family!r} match no parameter; "
                         "fix the pattern in PARTITION_RULES in sharding.py")
    return specs


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with each axis its dimension's size is not divisible by dropped (that dimension stays unsharded)."""
    fitted = []
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append(axes if names and shape[dim] % size == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def tree_shardings(tree: Any, family: str, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of `tree` by `family`'s rules, fitted to its shape (see `fit_spec`); the
    dimensions left unsharded because their axis does not divide them are logged once."""
    specs = partition_specs(tree, family)
    dropped = []

    def sharding(keypath, leaf, spec):
        fitted = fit_spec(spec, np.shape(leaf), mesh)
        if fitted != spec and tuple(fitted) != tuple(spec)[: len(fitted)]:
            dropped.append(f"{path_string(keypath)} {tuple(np.shape(leaf))}")
        return NamedSharding(mesh, fitted)

    shardings = jax.tree_util.tree_map_with_path(sharding, tree, specs)
    if dropped:
        logging.info("sharding: %d arrays keep a dimension unsharded because its mesh axis does not divide it: %s",
                     len(dropped), ", ".join(dropped[:4]) + (" ..." if len(dropped) > 4 else ""))
    return shardings


def abstract_params(abstract: Any, family: str, mesh: Mesh) -> Any:
    """Shapes and dtypes of a params pytree with the partition rules' shardings: a restore or load target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        tree_shardings(abstract, family, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch over data × fsdp; the other dimensions whole. Every array leaf of a data.Batch has the batch
    axis first, so this one sharding is a prefix of any batch's pytree."""
    return NamedSharding(mesh, P(BATCH_AXES))


def kv_cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A decoding KV cache [batch, slots, kv heads, head dim]: rows as the batch, kv heads over tensor (as the
    column-parallel k/v projections that fill it), fitted to `shape`."""
    return NamedSharding(mesh, fit_spec(P(BATCH_AXES, None, "tensor"), shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (metrics, step counts)."""
    return NamedSharding(mesh, REPLICATED)


def batch_rows(mesh: Mesh) -> int:
    """How many ways the batch dimension is split: a batch's rows must be a multiple of it."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of a batch (any pytree of [B, ...] arrays, e.g. a data.Batch), assembled with every other
    process's into global arrays sharded over the batch axes (one process: the whole batch, split over its devices)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value), local_batch)


def whole_batch(batch: Any, mesh: Mesh) -> Any:
    """A batch every process holds whole (evaluation; any pytree of [B, ...] arrays), as global arrays sharded over
    the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda value: jax.make_array_from_callback(value.shape, sharding, lambda index: value[index]), batch)


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes metrics, TensorBoard, plots, reports and the progress bar."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Wait until every process gets here (e.g. until process 0 has written a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(mode: str) -> bool:
    """Start jax.distributed when `mode` asks for it: 'on' always (JAX detects Cloud TPU pods, SLURM and Open MPI
    itself), 'auto' when the environment names a coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID), 'off' never. Returns whether jax.distributed is running. Call before any other JAX use."""
    if jax.distributed.is_initialized():
        return True
    if mode == "off" or (mode == "auto" and not os.environ.get(DISTRIBUTED_ENV[0])):
        return False
    env = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None,
        process_id=int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None,
    )
    logging.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
