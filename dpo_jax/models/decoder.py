"""The one decoder skeleton every family shares: embed → blocks → final norm → head, written once.

A family subclasses `Decoder` and supplies its block (`make_block`), its norm (`make_norm`) and its submodule names
(`NAMES`, Hugging Face's, so a param path is a checkpoint tensor name by rule); GPT-2 adds its learned positions
(`make_extras`, `embed`), Llama-likes their per-layer sliding windows (`layer_window`), Llama its grouped KV heads
(`kv_heads`), Gemma its per-layer rotary frequencies (`layer_inputs`: arrays each block takes as extra arguments,
stacked over layers for a scan). Positions and segments, branch ids, masks, the KV cache and remat are handled here.

The blocks take one of two forms (`config.scan_layers`): unrolled, an `nnx.List` of L blocks traced one by one
(params `layers/0/...`, `layers/1/...`), or stacked, one block whose params carry a leading layer axis
(`layers/...` [L, ...]) run by `jax.lax.scan`, so compile time does not grow with depth. Both compute the same
function of the same weights; `stacking.py` converts params between the forms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import layers

Cache = list[layers.KVCache] | layers.StackedKVCache  # a KVCache per layer (unrolled), or all layers' stacked


@dataclasses.dataclass(frozen=True)
class DecoderNames:
    """A family's names for the decoder's parts (Hugging Face's), e.g. GPT-2's wte, h, ln_f, lm_head."""

    embed: str  # the token embedding
    blocks: str  # the list (or stack) of blocks
    final_norm: str
    head: str  # the untied output layer


def stack_modules(blocks: list[nnx.Module]) -> nnx.Module:
    """One module of the blocks' common structure whose every param is theirs stacked on a new leading axis:
    block i's weights are slice i, so the stacked form starts from exactly the unrolled form's initialisation."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(block)[1] for block in blocks[1:]]
    return nnx.merge(graphdef, jax.tree.map(lambda *slices: jnp.stack(slices), *states))


class Decoder(nnx.Module):
    """A causal decoder: `__call__` gives final-normed hidden states, `logits` maps them to float32 logits."""

    NAMES: ClassVar[DecoderNames]
    HEAD_BIAS: ClassVar[bool] = False  # whether the untied output layer has a bias (GPT-J's does)

    def __init__(self, config: Any, *, rngs: nnx.Rngs):
        self.config = config
        dtype, names = jnp.dtype(config.dtype), self.NAMES
        # Creation order is the order the params draw their random keys: embedding, extras, blocks, norm, head.
        setattr(self, names.embed, layers.embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs))
        for name, module in self.make_extras(config, rngs).items():
            setattr(self, name, module)
        blocks = [self.make_block(config, index, rngs) for index in range(config.num_layers)]
        setattr(self, names.blocks, stack_modules(blocks) if config.scan_layers else nnx.List(blocks))
        setattr(self, names.final_norm, self.make_norm(config, rngs))
        if not self.tied():
            setattr(self, names.head, layers.linear(
                config.hidden_size, config.vocab_size, bias=self.HEAD_BIAS, dtype=dtype, rngs=rngs))

    # What a family supplies.
    def make_block(self, config: Any, index: int, rngs: nnx.Rngs) -> nnx.Module:
        """Block `index`: `(x_BxTxD, positions_BxT, mask_Bx1xTxS, layer cache) -> (x_BxTxD, layer cache)`."""
        raise NotImplementedError

    def make_norm(self, config: Any, rngs: nnx.Rngs) -> nnx.Module:
        """The final norm (the kind the blocks use)."""
        raise NotImplementedError

    def make_extras(self, config: Any, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        """Submodules besides the usual parts, created after the token embedding (GPT-2's position table)."""
        return {}

    def embed(self, tokens_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """The blocks' input [B, T, D]: the token embedding (GPT-2 adds its learned positions)."""
        return getattr(self, self.NAMES.embed)(tokens_BxT)

    def layer_window(self, index: int) -> int | None:
        """Layer `index`'s sliding attention window (None: full causal attention)."""
        return None

    def layer_inputs(self, index: int) -> tuple[np.ndarray, ...]:
        """Arrays block `index` takes after its cache (same shapes for every layer, so a scan stacks them), e.g.
        Gemma 3's per-layer rotary frequencies; none by default."""
        return ()

    def kv_heads(self) -> tuple[int, int]:
        """(key/value heads, head width) of the KV cache: every head its own, of width hidden_size / num_heads."""
        return self.config.num_heads, self.config.hidden_size // self.config.num_heads

    def tied(self) -> bool:
        """Whether the output layer is the token embedding (transposed) rather than its own head."""
        return self.config.tie_embeddings

    # What is written once.
    def __call__(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
        branch_ids_BxT: jax.Array | None = None,
        cache: Cache | None = None,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Hidden states [B, T, D] after the final norm, in the compute dtype (positions default to 0..T−1); with a
        `cache` (`empty_cache`), also the cache with these tokens' keys and values written in."""
        positions_BxT, segment_ids_BxT = layers.positions_and_segments(tokens_BxT, positions_BxT, segment_ids_BxT)
        slots = layers.cache_slots(cache)
        windows = [self.layer_window(index) for index in range(self.config.num_layers)]
        distinct = list(dict.fromkeys(windows))  # one mask per distinct window, shared by its layers
        masks = [layers.attention_mask(positions_BxT, segment_ids_BxT, w, branch_ids_BxT, slots) for w in distinct]
        x_BxTxD = self.embed(tokens_BxT, positions_BxT)
        run = scan_blocks if self.config.scan_layers else run_blocks
        inputs = [self.layer_inputs(index) for index in range(self.config.num_layers)]
        x_BxTxD, cache_out = run(getattr(self, self.NAMES.blocks), self.config.remat, x_BxTxD, positions_BxT, masks,
                                 [distinct.index(window) for window in windows], cache, inputs)
        hidden_BxTxD = getattr(self, self.NAMES.final_norm)(x_BxTxD)
        return hidden_BxTxD if cache is None else (hidden_BxTxD, cache_out)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """float32 logits [B, T, V]: hidden · embeddingᵀ when tied, else the output layer (with its bias, if any)."""
        dtype = jnp.dtype(self.config.dtype)
        if self.tied():
            return layers.tied_logits(hidden_BxTxD, getattr(self, self.NAMES.embed), dtype)
        return layers.head_logits(hidden_BxTxD, getattr(self, self.NAMES.head), dtype)

    def empty_cache(self, batch: int, slots: int) -> Cache:
        """A zeroed KV cache of `slots` positions for `batch` rows, for decoding (`__call__(..., cache=)`): a KVCache
        per layer, or a StackedKVCache [L, B, S, G, K] when the blocks are stacked."""
        config = self.config
        return layers.empty_cache(config.num_layers, batch, slots, *self.kv_heads(), config.dtype,
                                  stacked=config.scan_layers)


def run_blocks(
    blocks: nnx.List, remat: str, x_BxTxD: jax.Array, positions_BxT: jax.Array, masks: list[jax.Array],
    mask_of_layer: list[int], cache: list[layers.KVCache] | None, inputs: list[tuple] | None = None,
) -> tuple[jax.Array, list[layers.KVCache] | None]:
    """Unrolled: apply each block in turn (`layers.call_block`), block i with masks[mask_of_layer[i]] and its extra
    `inputs[i]` (`Decoder.layer_inputs`); returns (x, the updated cache, or None without one)."""
    layer_caches = list(cache) if cache is not None else [None] * len(blocks)
    inputs = inputs or [()] * len(blocks)
    for index, block in enumerate(blocks):
        x_BxTxD, layer_caches[index] = layers.call_block(
            block, remat, x_BxTxD, positions_BxT, masks[mask_of_layer[index]], layer_caches[index], *inputs[index])
    return x_BxTxD, None if cache is None else layer_caches


def scan_blocks(
    blocks: nnx.Module, remat: str, x_BxTxD: jax.Array, positions_BxT: jax.Array, masks: list[jax.Array],
    mask_of_layer: list[int], cache: layers.StackedKVCache | None, inputs: list[tuple] | None = None,
) -> tuple[jax.Array, layers.StackedKVCache | None]:
    """Stacked: the same blocks in one `jax.lax.scan` over the layer axis of their params, each step one block with
    its mask, its extra inputs (`inputs[i]`, scanned as arrays stacked over layers) and remat policy; returns (x,
    the updated cache, or None). The cache rides in the carry, each block
    writing its new keys and values into its layer in place (`layers.LayerOfStack`): no second copy of the cache."""
    graphdef, params = nnx.split(blocks)
    mask_index_L = jnp.asarray(mask_of_layer, jnp.int32)
    # Layers of different windows pick their mask (of M distinct ones) by index.
    masks_MxBx1xTxS = jnp.stack(masks) if len(masks) > 1 else None
    # Each extra input stacked over layers, [L, ...]: a step gets its layer's row.
    stacked_inputs = tuple(jnp.stack([jnp.asarray(row[j]) for row in inputs]) for j in range(len(inputs[0]))) if (
        inputs) else ()

    def step(carry, layer):
        x_BxTxD, cache = carry
        layer_params, mask_index, index, layer_inputs = layer
        mask_Bx1xTxS = masks[0] if masks_MxBx1xTxS is None else masks_MxBx1xTxS[mask_index]
        block = nnx.merge(graphdef, layer_params)
        layer_cache = None if cache is None else layers.LayerOfStack(cache, index)
        x_BxTxD, layer_cache = layers.call_block(block, remat, x_BxTxD, positions_BxT, mask_Bx1xTxS, layer_cache,
                                                 *layer_inputs)
        return (x_BxTxD, None if cache is None else layer_cache.stack), None

    layer_index_L = jnp.arange(len(mask_of_layer), dtype=jnp.int32)
    (x_BxTxD, cache), _ = jax.lax.scan(step, (x_BxTxD, cache), (params, mask_index_L, layer_index_L, stacked_inputs))
    return x_BxTxD, cache
