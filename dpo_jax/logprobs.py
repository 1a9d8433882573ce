"""Sequence log-probs over completion tokens only, in float32, from a decoder's hidden states.

Two ways to score, with the same result:
- every position (`sequence_logprobs`): `loss_mask_BxT[b, t] = 1` iff `tokens_BxT[b, t]` is a completion token
  (EOS included), scored from the logits at t − 1; the LM head runs at every position, prompt included.
- completion-only (`gathered_logprobs` + `slot_sums`): the data pipeline lists each row's scored tokens in a
  fixed-size block of N entries (target token, the position whose hidden state predicts it, and the sequence it
  belongs to); the LM head runs at those N positions only. It is the only way to score a shared-prompt row
  `[prompt | chosen | rejected]`, where rejected's first token is predicted from the prompt's last position.
Logits are computed chunk by chunk (and recomputed in the backward pass), so no [B, T, V] array ever exists.
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


def _target_logprobs(logits_fn: LogitsFn) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(hidden_BxCxD, targets_BxC) -> log-softmax of the logits at the targets, float32 [B, C]."""

    def chunk_logprobs(hidden_BxCxD, targets_BxC):
        logprobs_BxCxV = jax.nn.log_softmax(logits_fn(hidden_BxCxD).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logprobs_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]

    return chunk_logprobs


def token_logprobs(
    hidden_BxTxD: jax.Array, logits_fn: LogitsFn, tokens_BxT: jax.Array, chunk_size: int = 128
) -> jax.Array:
    """log π(tokens[t] | tokens[<t]) for t ≥ 1, float32 [B, T−1], computed `chunk_size` positions at a time."""
    return map_over_chunks(_target_logprobs(logits_fn), (hidden_BxTxD[:, :-1], tokens_BxT[:, 1:]), chunk_size)


def gathered_logprobs(
    hidden_BxTxD: jax.Array, logits_fn: LogitsFn, sources_BxN: jax.Array, targets_BxN: jax.Array,
    chunk_size: int = 128,
) -> jax.Array:
    """log π(targets[b, n] | the row up to position sources[b, n]), float32 [B, N]: the LM head and log-softmax
    run at the N gathered positions only, `chunk_size` at a time (prompt positions are never projected)."""
    hidden_BxNxD = jnp.take_along_axis(hidden_BxTxD, sources_BxN[..., None], axis=1)
    return map_over_chunks(_target_logprobs(logits_fn), (hidden_BxNxD, targets_BxN), chunk_size)


def _tail_weights(member_BxNxK: jax.Array, prefix_lengths_BxK: jax.Array | None, tail_weight: float) -> jax.Array:
    """1 for each sequence's first `prefix_lengths` tokens (in block order), `tail_weight` past them."""
    if prefix_lengths_BxK is None:
        return jnp.ones(member_BxNxK.shape, jnp.float32)
    index_BxNxK = jnp.cumsum(member_BxNxK, axis=1) - 1
    return jnp.where(index_BxNxK < prefix_lengths_BxK[:, None, :], 1.0, tail_weight)


def slot_sums(
    logprobs_BxN: jax.Array, slots_BxN: jax.Array, num_slots: int, prefix_lengths_BxK: jax.Array | None = None,
    tail_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(Σ log-probs of each sequence [B, K], its token count [B, K]) for a block whose entry n belongs to sequence
    slots[b, n] of its row (0 ≤ slot < K; −1 marks the block's padding, which counts nowhere). With
    `prefix_lengths_BxK`, a sequence's tokens past its prefix length weigh `tail_weight` in the sum (LD-DPO)."""
    member_BxNxK = slots_BxN[..., None] == jnp.arange(num_slots)
    weights_BxNxK = _tail_weights(member_BxNxK, prefix_lengths_BxK, tail_weight)
    sums_BxK = jnp.where(member_BxNxK, weights_BxNxK * logprobs_BxN[..., None], 0.0).sum(axis=1)
    return sums_BxK, member_BxNxK.sum(axis=1).astype(jnp.float32)


def sequence_sums(
    logprobs_BxN: jax.Array, slots_BxN: jax.Array, num_sequences: int, prefix_lengths_S: jax.Array | None = None,
    tail_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(Σ log-probs of each sequence [S], its token count [S]) for blocks whose entry n of row b belongs to sequence
    slots[b, n] of the whole batch (0 ≤ slot < S, −1 none), each sequence's entries contiguous in one row: packed
    rows. Linear in the block (segment sums), however many sequences share a row. With `prefix_lengths_S`, a
    sequence's tokens past its prefix length weigh `tail_weight` (LD-DPO)."""
    slots_M = slots_BxN.reshape(-1)
    valid_M = slots_M >= 0
    ids_M = jnp.where(valid_M, slots_M, num_sequences)  # the block's padding goes to a bucket that is dropped
    segments = num_sequences + 1
    counts_S = jax.ops.segment_sum(valid_M.astype(jnp.float32), ids_M, segments)[:num_sequences]
    contributions_M = jnp.where(valid_M, logprobs_BxN.reshape(-1), 0.0)
    if prefix_lengths_S is not None:
        entry_M = jnp.arange(slots_M.shape[0])
        first_S = jax.ops.segment_min(jnp.where(valid_M, entry_M, slots_M.shape[0]), ids_M, segments)
        index_M = entry_M - first_S[ids_M]
        prefix_M = jnp.concatenate([prefix_lengths_S, jnp.zeros((1,), prefix_lengths_S.dtype)])[ids_M]
        contributions_M = contributions_M * jnp.where(index_M < prefix_M, 1.0, tail_weight)
    sums_S = jax.ops.segment_sum(contributions_M, ids_M, segments)[:num_sequences]
    return sums_S, counts_S


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
    prefix_lengths_B: jax.Array | None = None,
    tail_weight: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(Σ completion-token log-probs [B] in float32, completion lengths [B]); prompt and padding ignored. With
    `prefix_lengths_B`, completion tokens past the prefix length weigh `tail_weight` in the sum (LD-DPO)."""
    mask_BxS = loss_mask_BxT[:, 1:].astype(jnp.float32)
    logprobs_BxS = token_logprobs(hidden_BxTxD, logits_fn, tokens_BxT, chunk_size)
    prefix_BxK = None if prefix_lengths_B is None else prefix_lengths_B[:, None]
    weights_BxS = _tail_weights(mask_BxS[..., None] > 0, prefix_BxK, tail_weight)[..., 0]
    return (logprobs_BxS * weights_BxS * mask_BxS).sum(axis=-1), mask_BxS.sum(axis=-1)
