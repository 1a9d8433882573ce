"""The pure (graphdef, params) forms of a model's calls, as the trainer, the scorer and the sampler use them."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from dpo_jax.models.decoder import Cache


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
    graphdef: nnx.GraphDef, params: nnx.State, tokens_BxT: jax.Array, positions_BxT: jax.Array, cache: Cache,
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array], Cache]:
    """`apply_model` for decoding: (hidden_BxTxD, logits_fn, cache) with these tokens' keys and values written into
    `cache` (from `empty_cache`) at `positions_BxT`, each token attending to the cache's slots up to its position."""
    model = nnx.merge(graphdef, params)
    hidden_BxTxD, cache = model(tokens_BxT, positions_BxT, cache=cache)
    return hidden_BxTxD, model.logits, cache


def empty_cache(graphdef: nnx.GraphDef, params: nnx.State, batch: int, slots: int) -> Cache:
    """The model's zeroed KV cache for `batch` rows of `slots` positions: a `layers.KVCache` per layer, or one
    stacked over layers when the blocks are (`Decoder.empty_cache`)."""
    return nnx.merge(graphdef, params).empty_cache(batch, slots)
