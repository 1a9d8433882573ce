"""LoRA and QLoRA on any family: low-rank adapters (flax's `nnx.LoRA`) on the dense layers whose module path matches
`model.lora.targets`, π_ref = the same base weights with the adapters off, the frozen base optionally stored
quantised (int8, or QLoRA's NF4) and dequantised in the matmul ([LoRA](../docs/lora.md)).

The adapted model is an ordinary (graphdef, params) pair: each targeted `nnx.Linear` becomes an `AdaptedLinear`
(same kernel and bias at the same paths, plus `lora/lora_a` [in, r] and `lora/lora_b` [r, out], `nnx.LoRAParam`s),
so the functional core (`models.apply_model`, the sampler, scanned blocks) runs it unchanged. Its params split in
two pytrees: `base` (frozen; the train step's `ref_params` argument, the only copy) and `adapters` (the train
state's params: gradients, optimizer state and checkpoints hold these alone). `wrap_loss_fn` turns a loss function
of full params into one of adapters: policy = base + scale·A·B, π_ref = base with B = 0 (x·A·0 adds exactly 0, so
the first step's policy equals π_ref bitwise and the DPO loss is exactly log 2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dpo_jax import models, reference_cache

QUANTIZATIONS = ("none", "int8", "nf4")
# QLoRA's NormalFloat-4 levels (Dettmers et al., 2023, App. E; bitsandbytes' table): quantiles of N(0, 1), in [-1, 1].
NF4_LEVELS = np.asarray([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
NF4_BLOCK = 64  # weights sharing one absmax scale, along the input axis (QLoRA's block size)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """`model.lora`: rank r, alpha (the update is alpha/r·A·B), `targets` (a regex searched in each dense layer's
    module path, e.g. 'layers/3/self_attn/q_proj'; '' = every dense layer in the blocks) and the base's storage."""

    rank: int
    alpha: float
    targets: str = ""
    base_quantization: str = "none"

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict) -> "LoraSettings | None":
        """The settings of `config.model.lora`, None when it is disabled."""
        if not section.enabled:
            return None
        return cls(rank=section.rank, alpha=float(section.alpha), targets=section.targets,
                   base_quantization=section.base_quantization)

    @property
    def scale(self) -> float:
        """alpha / rank, the factor of the adapters' update."""
        return self.alpha / self.rank


def nf4_block(in_features: int) -> int:
    """The NF4 block length for an input width: 64, or the largest power of two dividing it."""
    block = NF4_BLOCK
    while in_features % block:
        block //= 2
    return block


def quantize(kernel: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a kernel [..., in, out]: int8 with one absmax scale per output column [..., out], or NF4
    codes (uint4) with one absmax scale per block of `nf4_block(in)` inputs [..., in/block, out]."""
    kernel = kernel.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(kernel), axis=-2) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.round(kernel / scale[..., None, :]).astype(jnp.int8), scale
    if kind == "nf4":
        *lead, n_in, n_out = kernel.shape
        block = nf4_block(n_in)
        blocks = kernel.reshape(*lead, n_in // block, block, n_out)
        absmax = jnp.max(jnp.abs(blocks), axis=-2)
        absmax = jnp.where(absmax > 0, absmax, 1.0)
        midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
        codes = jnp.searchsorted(midpoints, blocks / absmax[..., None, :])
        return codes.reshape(kernel.shape).astype(jnp.uint4), absmax
    raise ValueError(f"quantize: kind must be 'int8' or 'nf4', got {kind!r}")


def dequantize(codes: jax.Array, scale: jax.Array, kind: str) -> jax.Array:
    """The float32 kernel [..., in, out] that `quantize` stored as (codes, scale)."""
    if kind == "int8":
        return codes.astype(jnp.float32) * scale[..., None, :]
    *lead, n_in, n_out = codes.shape
    block = n_in // scale.shape[-2]
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)].reshape(*lead, n_in // block, block, n_out)
    return (values * scale[..., None, :]).reshape(codes.shape)


class AdaptedLinear(nnx.Linear):
    """An `nnx.Linear` whose kernel may be stored quantised (`quantization`: 'none', 'int8', 'nf4'; `kernel_scale`
    beside it) and which may carry a LoRA adapter (`lora`, flax's nnx.LoRA, added times `lora_scale`)."""

    lora: nnx.LoRA | None
    lora_scale: float
    quantization: str

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """x·W + b (W dequantised first when stored quantised) + lora_scale·x·A·B."""
        if self.quantization == "none":
            y = super().__call__(inputs, out_sharding)
        else:
            kernel = dequantize(self.kernel[...], self.kernel_scale[...], self.quantization)
            bias = self.bias[...] if self.bias is not None else None
            inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
            y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            if bias is not None:
                y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.lora is not None:
            y = y + (self.lora_scale * self.lora(inputs)).astype(y.dtype)
        return y


def _module_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def dense_layers(model: nnx.Module) -> dict[str, nnx.Linear]:
    """Every dense layer inside the model's blocks, by module path ('layers/0/self_attn/q_proj'; stacked blocks:
    'layers/self_attn/q_proj'). The embedding and the output head are not among them."""
    blocks = models.blocks_name(models.family_of(model.config).name)
    return {_module_path(path): module for path, module in nnx.iter_modules(model)
            if isinstance(module, nnx.Linear) and path and path[0] == blocks}


def targeted_paths(model: nnx.Module, targets: str) -> list[str]:
    """The dense layers `targets` selects (all of them for ''); a ValueError naming model.lora.targets if none."""
    paths = list(dense_layers(model))
    if not targets:
        return paths
    try:
        pattern = re.compile(targets)
    except re.error as error:
        raise ValueError(f"config.model.lora.targets = {targets!r} is not a regular expression: {error}") from error
    chosen = [path for path in paths if pattern.search(path)]
    if not chosen:
        examples = ", ".join(sorted({re.sub(r"/\d+/", "/N/", p) for p in paths})[:8])
        raise ValueError(f"config.model.lora.targets = {targets!r} matches no dense layer of this model; its dense "
                         f"layers' paths look like: {examples}")
    return chosen


def check_targets(model_config: Any, targets: str) -> None:
    """Raise the ValueError of `targeted_paths` if `targets` selects no dense layer of `model_config`'s model."""
    targeted_paths(nnx.eval_shape(lambda: models.model_from_config(model_config, nnx.Rngs(0))), targets)


def _adapt(module: nnx.Linear, settings: LoraSettings, adapter: bool, key: jax.Array) -> None:
    """Turn `module` into an AdaptedLinear in place: its kernel quantised as asked, an adapter if `adapter`."""
    module.__class__ = AdaptedLinear
    module.quantization = settings.base_quantization
    module.lora_scale = settings.scale
    module.lora = nnx.data(None)
    kernel = module.kernel[...]
    if settings.base_quantization != "none":
        codes, scale = quantize(kernel, settings.base_quantization)
        module.kernel = nnx.Param(codes)
        module.kernel_scale = nnx.Param(scale)
    if not adapter:
        return
    lead = kernel.shape[:-2]  # stacked blocks: a leading layer axis
    n_in, n_out = module.in_features, module.out_features
    lora = nnx.LoRA(n_in, settings.rank, n_out, dtype=module.dtype, rngs=nnx.Rngs(key))
    if lead:
        init = nnx.initializers.he_uniform()  # nnx.LoRA's default, per layer
        keys = jax.random.split(key, int(np.prod(lead)))
        lora.lora_a = nnx.LoRAParam(jnp.stack([init(k, (n_in, settings.rank)) for k in keys]).reshape(
            *lead, n_in, settings.rank))
        lora.lora_b = nnx.LoRAParam(jnp.zeros((*lead, settings.rank, n_out), jnp.float32))
    module.lora = nnx.data(lora)


def attach(graphdef: nnx.GraphDef, params: nnx.State, settings: LoraSettings, seed: int
           ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(adapted graphdef, base, adapters) of a model: adapters on the targeted dense layers (A random from `seed`,
    B zero), every dense layer of the blocks stored as `settings.base_quantization` says. Works on abstract params
    (jax.ShapeDtypeStruct leaves) too, for the dry run and restore targets."""
    if settings.rank <= 0:
        raise ValueError(f"config.model.lora.rank = {settings.rank} is invalid: expected a positive integer")
    if settings.base_quantization not in QUANTIZATIONS:
        raise ValueError(f"config.model.lora.base_quantization = {settings.base_quantization!r} is invalid: "
                         f"expected one of {QUANTIZATIONS}")
    abstract = isinstance(jax.tree.leaves(params)[0], jax.ShapeDtypeStruct)
    out = {}

    def build(p):
        model = nnx.merge(graphdef, p)
        chosen = set(targeted_paths(model, settings.targets))
        keys = iter(jax.random.split(jax.random.key(seed), len(dense_layers(model))))
        for path, module in dense_layers(model).items():
            _adapt(module, settings, path in chosen, next(keys))
        out["graphdef"], adapters, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
        return base, adapters

    base, adapters = jax.eval_shape(build, params) if abstract else build(params)
    return out["graphdef"], base, adapters


def combine(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The adapted model's full params: the base with the adapters at their paths."""
    return nnx.merge_state(base, adapters)


def adapters_off(adapters: nnx.State) -> nnx.State:
    """The adapters with B = 0 (and A = 0): the adapted model then computes exactly the base's function."""
    return jax.tree.map(jnp.zeros_like, adapters)


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of the adapted model's full params."""
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    return adapters, base


def reference_params(params: nnx.State) -> nnx.State:
    """π_ref of the adapted model's full params: the same base, the adapters off."""
    adapters, base = split(params)
    return combine(base, adapters_off(adapters))


def wrap_loss_fn(loss_fn: Callable) -> Callable:
    """`loss_fn(params, ref_params, batch, ...)` of full params → the same of (adapters, base, batch, ...): the
    policy is base + adapters, π_ref the base with the adapters off, in the same forward code (one base in memory).
    A batch with cached reference log-probs skips π_ref's forward as before (its params go unused)."""

    def adapter_loss_fn(adapters, base, batch, *args, **kwargs):
        base = jax.lax.stop_gradient(base)
        return loss_fn(combine(base, adapters), combine(base, adapters_off(adapters)), batch, *args, **kwargs)

    return adapter_loss_fn


def base_fingerprint(plain_params: nnx.State, settings: LoraSettings) -> str:
    """What a LoRA run's π_ref and checkpoints belong to: the unadapted float params' fingerprint (the same as a full
    fine-tuning run's π_ref of that model), with the base's quantisation when it is stored quantised."""
    fingerprint = reference_cache.params_fingerprint(plain_params)
    return fingerprint if settings.base_quantization == "none" else f"{fingerprint}+{settings.base_quantization}"


def merged_params(base: nnx.State, adapters: nnx.State, graphdef: nnx.GraphDef, plain_abstract: nnx.State
                  ) -> nnx.State:
    """The plain (unadapted) model's float32 params equal to base + scale·A·B: each adapted kernel dequantised and
    merged, for export as an ordinary checkpoint. `plain_abstract` is the plain model's param structure."""
    model = nnx.merge(graphdef, combine(base, adapters))
    merged = {}
    for path, module in dense_layers(model).items():
        if not isinstance(module, AdaptedLinear):
            continue
        kernel = module.kernel[...]
        if module.quantization != "none":
            kernel = dequantize(kernel, module.kernel_scale[...], module.quantization)
        if module.lora is not None:
            kernel = kernel + module.lora_scale * jnp.matmul(module.lora.lora_a[...], module.lora.lora_b[...])
        merged[path + "/kernel"] = kernel.astype(jnp.float32)
    flat = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(combine(base, adapters))[0]:
        flat[_module_path(models.param_path(keypath))] = leaf
    flat.update(merged)

    def value(keypath, like):
        return jnp.asarray(flat[_module_path(models.param_path(keypath))], like.dtype)

    return jax.tree_util.tree_map_with_path(value, plain_abstract)


def peft_tensors(adapters: nnx.State, model_config: Any) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names, per layer: 'base_model.model.<HF module>.lora_A.weight' [r, in] and
    '.lora_B.weight' [out, r]. A module that Hugging Face fuses (Phi-3's qkv_proj) has no PEFT form: ValueError."""
    layout = models.family_of(model_config).hf
    fused_parts = {part for _, parts in layout.fused for part in parts}
    tensors = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        path = models.param_path(keypath)  # (..., 'q_proj', 'lora', 'lora_a')
        for index, layer_path in enumerate(models.layer_paths(path[:-2], model_config)):
            module = ".".join(map(str, layer_path))
            if ".".join(map(str, layer_path[-2:])) in fused_parts:
                raise ValueError(f"LoRA adapter on {module}: Hugging Face fuses this layer ({layout.fused}), so "
                                 "PEFT cannot hold a separate adapter for it; export the merged model instead")
            value = np.asarray(jax.device_get(leaf if layer_path == path[:-2] else leaf[index]), np.float32)
            factor = "lora_A" if path[-1] == "lora_a" else "lora_B"
            tensors[f"base_model.model.{layout.prefix}{module}.{factor}.weight"] = np.ascontiguousarray(value.T)
    return tensors


def save_peft(adapters: nnx.State, model_config: Any, settings: LoraSettings, out_dir: str, base_path: str) -> None:
    """Write a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that `peft` loads onto the
    base at `base_path`; target_modules is a regex of exactly the adapted modules."""
    tensors = peft_tensors(adapters, model_config)
    modules = sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in tensors})
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": settings.rank,
        "lora_alpha": settings.alpha, "lora_dropout": 0.0, "bias": "none", "inference_mode": True,
        "fan_in_fan_out": models.family_of(model_config).hf.conv1d, "init_lora_weights": True,
        "target_modules": "^(" + "|".join(re.escape(m) for m in modules) + ")$", "modules_to_save": None,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
