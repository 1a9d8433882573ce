"""`--config.dry_run=True`: what one device of the configured mesh holds, without allocating the model.

Params, optimizer state, gradients and π_ref come exactly from `jax.eval_shape` and the partition rules (each
leaf's shard shape on the mesh). Activations are an estimate for the configured batch and length: the saved
activations of a decoder layer per Korthikanti et al. (2022, eq. 2, no dropout masks) scaled to the compute dtype
and remat mode, plus one chunk of float32 logits. When this machine has the mesh's devices, the compiled step's
own memory analysis is printed beside it. The mesh may be larger than this machine: give its sizes explicitly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from dpo_jax import build, data, lora, losses, models, sharding
from dpo_jax.optimizer import make_optimizer
from dpo_jax.step import TrainState

GIB = 1024**3


def _size(num_bytes: int) -> str:
    return f"{num_bytes / GIB:9.2f} GiB" if num_bytes >= GIB / 10 else f"{num_bytes / 1024**2:9.2f} MiB"


def _mesh(config: ml_collections.ConfigDict) -> AbstractMesh:
    """The configured mesh's shape, as an AbstractMesh (no devices needed); -1 takes this machine's device count."""
    sizes = [config.mesh[axis] for axis in sharding.MESH_AXES]
    num_devices = jax.device_count() if -1 in sizes else math.prod(sizes)
    return AbstractMesh(sharding.mesh_shape(config.mesh, num_devices), sharding.MESH_AXES)


def bytes_per_device(tree: Any, family: str, mesh: AbstractMesh) -> int:
    """Bytes of `tree`'s largest shards on one device of `mesh` by the partition rules."""
    specs = sharding.partition_specs(tree, family)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        fitted = sharding.fit_spec(spec, leaf.shape, mesh)
        shard = list(leaf.shape)
        for dim, axes in enumerate(fitted):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            shard[dim] //= math.prod(mesh.shape[name] for name in names)
        total += math.prod(shard) * _bits(leaf.dtype) // 8
    return total


def _bits(dtype: Any) -> int:
    """Bits of one element (4 for the NF4 codes of a QLoRA base, packed two a byte on accelerators)."""
    dtype = jnp.dtype(dtype)
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else dtype.itemsize * 8


def activation_bytes(model_config: Any, config: ml_collections.ConfigDict, mesh: AbstractMesh) -> int:
    """Estimated activations one device keeps for the backward pass of one micro-batch (chosen and rejected rows)."""
    rows = 2 * config.train.batch_size // config.train.grad_accum_steps // sharding.batch_rows(mesh)
    s, b, t = config.data.max_length, max(rows, 1), mesh.shape["tensor"]
    h, layers, heads = model_config.hidden_size, model_config.num_layers, model_config.num_heads
    scale = jnp.dtype(model_config.dtype).itemsize / 2  # the formula counts 16-bit activations
    per_layer = s * b * h * (10 + 24 / t + 5 * heads * s / (h * t)) * scale
    ffn = getattr(model_config, "intermediate_size", 4 * h)
    if model_config.remat == "full":  # each block's input, plus one block's activations during its recomputation
        kept = layers * 2 * s * b * h * scale + per_layer
    elif model_config.remat == "block":  # the weight matmuls' outputs
        kept = layers * s * b * (4 * h + 3 * ffn) / t * 2 * scale + per_layer
    else:
        kept = layers * per_layer
    logits = b * min(config.train.logprob_chunk_size, s) * model_config.vocab_size * 4 * 3  # logits, softmax, grad
    return int(kept + logits)


def longest_batch(config: ml_collections.ConfigDict, stage: str) -> data.Batch:
    """A batch of the config's layout whose every row is as long as the data settings allow: prompts of
    max_prompt_length, completions of the rest (the pipeline's own collate builds it; cached π_ref log-probs
    with ref.cache)."""
    P, C = config.data.max_prompt_length, config.data.max_length - config.data.max_prompt_length
    B, prompt = config.train.batch_size, np.ones(P, np.int32)
    examples = [{"prompt": prompt, "chosen": np.ones(C, np.int32), "rejected": np.full(C, 2, np.int32)}] * B
    if not losses.takes(build.stage_loss(config, stage), True):
        examples = [{"prompt": prompt, "completion": np.ones(C, np.int32), "label": True}] * B
    elif config.ref.cache:  # π_ref's log-probs come with the batch
        examples = data.with_reference_logps(examples, np.zeros(B), np.zeros(B))
    return data.collate(examples, build.buckets_of(config), 0, layout=build.layout_of(config))


def compiled_temporaries(config, stage, graphdef, family, mesh_shape, params, ref_params) -> int | None:
    """Temporary bytes per device of the compiled train step from XLA's memory analysis, when this machine has the
    mesh's devices (compiled from shapes alone; nothing is allocated); None otherwise."""
    if math.prod(mesh_shape) != jax.device_count():
        return None
    mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    create_state, _, train_step, _ = build.stage_steps(config, stage, graphdef, family, mesh, params, ref_params)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), longest_batch(config, stage))
    state = jax.eval_shape(create_state, params, ref_params if build.reference_sync(config, stage) else None)
    analysis = train_step.lower(state, ref_params, batch).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def report(config: ml_collections.ConfigDict) -> str:
    """The per-device memory table of the config's run on its mesh, and whether it fits `mesh.device_memory_gb`."""
    mesh = _mesh(config)
    if config.model.path or config.model.config_path:
        vocab_size = 1  # the checkpoint's config.json gives the vocabulary (no tokenizer needed)
    else:
        vocab_size = data.get_tokenizer(config.data.tokenizer).vocab_size
    model_config = build.model_config_of(config, vocab_size)
    family = models.family_of(model_config).name
    graphdef, params = models.abstract_model(model_config)
    stage = "sft" if config.mode == "sft" else "dpo"  # the stage whose step the run ends with
    tx, _ = make_optimizer(config.optimizer, config[stage])
    state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    loss_name = build.stage_loss(config, stage)
    # With ref.cache the DPO stage holds no π_ref: its log-probs ride in the batches.
    uses_reference = losses.uses_reference(loss_name, build.loss_params(config)) and not config.ref.cache
    ref_dtype = jnp.dtype(config.model.reference_dtype)
    ref_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype), params) if uses_reference else None
    if config.model.lora.enabled:  # the adapters train; the base, stored once, is also π_ref
        settings = lora.LoraSettings.from_config(config.model.lora)
        graphdef, ref_params, params = lora.attach(graphdef, params, settings, config.seed)
        state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
        rows = {
            f"base params ({settings.base_quantization if settings.base_quantization != 'none' else 'float32'}; "
            "also π_ref)": bytes_per_device(ref_params, family, mesh),
            f"LoRA adapters (rank {settings.rank}, float32)": bytes_per_device(params, family, mesh),
            "optimizer state (adapters)": bytes_per_device(state.opt_state, family, mesh),
            "gradients (adapters, float32)": bytes_per_device(params, family, mesh),
            f"activations (estimate, remat={model_config.remat})": activation_bytes(model_config, config, mesh),
        }
    else:
        rows = {
            "params (float32)": bytes_per_device(params, family, mesh),
            "optimizer state": bytes_per_device(state.opt_state, family, mesh),
            "gradients (float32)": bytes_per_device(params, family, mesh),
            f"reference params ({'ref.cache: none' if config.ref.cache else ref_dtype.name})": bytes_per_device(ref_params, family, mesh) if uses_reference else 0,
            f"activations (estimate, remat={model_config.remat})": activation_bytes(model_config, config, mesh),
        }
    if build.reference_sync(config, stage) is not None and uses_reference:  # the train state's moving copy
        rows[f"TR-DPO's moving π_ref ({ref_dtype.name})"] = bytes_per_device(ref_params, family, mesh)
    total = sum(rows.values())
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if config.model.lora.enabled:
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.abstract_model(model_config)[1]))
    lines = [
        f"dry run: {type(model_config).__name__} with {num_params:,} parameters, {config.train.batch_size} "
        f"{'pairs' if loss_name != 'sft' else 'rows'} × {config.data.max_length} tokens a step "
        f"(grad_accum_steps={config.train.grad_accum_steps}), compute {model_config.dtype}",
        f"mesh: {dict(mesh.shape)} = {mesh.size} devices; per device:",
    ]
    if config.model.lora.enabled:
        trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        lines.insert(1, f"LoRA: {trainable:,} trainable parameters ({100 * trainable / num_params:.2f}%)")
    lines += [f"  {name:46s}{_size(value)}" for name, value in rows.items()]
    lines.append(f"  {'total':46s}{_size(total)}")
    temporaries = compiled_temporaries(config, stage, graphdef, family, tuple(mesh.shape.values()), params, ref_params)
    if temporaries is not None:
        lines.append(f"  {'compiled step temporaries (XLA, this machine)':46s}{_size(temporaries)}")
    if config.mesh.device_memory_gb:
        fits = total <= config.mesh.device_memory_gb * GIB
        lines.append(f"fits {config.mesh.device_memory_gb:g} GiB per device: {'yes' if fits else 'NO'} "
                     f"({total / GIB:.2f} of {config.mesh.device_memory_gb:g} GiB)")
    return "\n".join(lines)
