"""Sequence log-probs over completion tokens only, in float32, from a decoder's hidden states.

Convention (set by `dpo_jax.data.tokenize`): `loss_mask_BxT[b, t] = 1` iff `tokens_BxT[b, t]` is a
completion token (EOS included); its log-prob comes from the logits at position t − 1. Logits are
computed chunk by chunk over the sequence (and recomputed in the backward pass), so the full
[B, T, V] logits array never exists at once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]


def map_over_chunks(fn: Callable[..., jax.Array], arrays_BxS: tuple[jax.Array, ...], chunk_size: int) -> jax.Array:
    """`fn` applied to `chunk_size`-position slices of [B, S, ...] arrays, rematerialised in the backward pass.

    `fn` maps [B, C, ...] chunks to a [B, C] result; chunks run one after another (lax.map), so the
    per-chunk [B, C, V] logits inside `fn` are the largest thing alive at once.
    """
    batch, length = arrays_BxS[0].shape[:2]
    chunk_size = max(1, min(chunk_size, length))
    num_chunks = -(-length // chunk_size)
    pad = num_chunks * chunk_size - length

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    out_NxBxC = jax.lax.map(jax.checkpoint(lambda chunk: fn(*chunk)), tuple(map(to_chunks, arrays_BxS)))
    return out_NxBxC.swapaxes(0, 1).reshape(batch, -1)[:, :length]


def token_logprobs(
    hidden_BxTxD: jax.Array, logits_fn: LogitsFn, tokens_BxT: jax.Array, chunk_size: int = 128
) -> jax.Array:
    """log π(tokens[t] | tokens[<t]) for t ≥ 1, float32 [B, T−1], computed `chunk_size` positions at a time."""

    def chunk_logprobs(hidden_BxCxD, targets_BxC):
        logprobs_BxCxV = jax.nn.log_softmax(logits_fn(hidden_BxCxD).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logprobs_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]

    return map_over_chunks(chunk_logprobs, (hidden_BxTxD[:, :-1], tokens_BxT[:, 1:]), chunk_size)


def token_kl(
    hidden_BxTxD: jax.Array,
    logits_fn: LogitsFn,
    ref_hidden_BxTxD: jax.Array,
    ref_logits_fn: LogitsFn,
    chunk_size: int = 128,
) -> jax.Array:
    """KL(π(·|x_<t) ‖ π_ref(·|x_<t)) over the full vocabulary for the token at each t ≥ 1, float32 [B, T−1]."""

    def chunk_kl(hidden_BxCxD, ref_hidden_BxCxD):
        logp_BxCxV = jax.nn.log_softmax(logits_fn(hidden_BxCxD).astype(jnp.float32), axis=-1)
        logq_BxCxV = jax.nn.log_softmax(ref_logits_fn(ref_hidden_BxCxD).astype(jnp.float32), axis=-1)
        return (jnp.exp(logp_BxCxV) * (logp_BxCxV - logq_BxCxV)).sum(axis=-1)

    return map_over_chunks(chunk_kl, (hidden_BxTxD[:, :-1], ref_hidden_BxTxD[:, :-1]), chunk_size)


def sequence_logprobs(
    hidden_BxTxD: jax.Array,
    logits_fn: LogitsFn,
    tokens_BxT: jax.Array,
    loss_mask_BxT: jax.Array,
    chunk_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """(Σ completion-token log-probs [B] in float32, completion lengths [B]); prompt and padding ignored."""
    mask_BxS = loss_mask_BxT[:, 1:].astype(jnp.float32)
    logprobs_BxS = token_logprobs(hidden_BxTxD, logits_fn, tokens_BxT, chunk_size)
    return (logprobs_BxS * mask_BxS).sum(axis=-1), mask_BxS.sum(axis=-1)
