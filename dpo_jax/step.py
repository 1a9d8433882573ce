"""The pure core of training: TrainState, the loss function and the jit-compiled train/eval steps.

The step is `(state, ref_params, batch) -> (state, metrics)`: reference params are a separate frozen
pytree (`None` for losses that need no reference), never in the optimizer state, never updated; with TR-DPO's
reference updates (`ReferenceSync`) the moving π_ref is instead part of the train state, mixed towards the policy
inside the step. A loss that keeps a running statistic (BCO) keeps it in the train state too. The loop that drives
the step (stages, resume, logging, preemption) is run.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dpo_jax import data, losses
from dpo_jax.logprobs import gathered_logprobs, sequence_logprobs, sequence_sums, slot_sums
from dpo_jax.models import apply_model

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's inputs and outputs live (sharding.py builds them): the train state's and the reference
    params' NamedSharding trees, the batch's (one NamedSharding for every leaf of a data.Batch, each [B, ...]), and
    the replicated one of scalars and metrics."""

    state: Any
    ref_params: Any  # None when the loss uses no reference
    batch: Any
    replicated: Any


class TrainState(flax.struct.PyTreeNode):
    """Everything an optimizer step changes: the step count, the policy params, the optimizer state, the loss's
    running statistics (None for a loss without them) and TR-DPO's moving π_ref (None: π_ref is frozen)."""

    step: jax.Array
    params: Any
    opt_state: Any
    loss_state: Any = None
    reference: Any = None

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, loss_state: Any = None,
               reference: Any = None) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), loss_state=loss_state,
                   reference=reference)


@dataclasses.dataclass(frozen=True)
class ReferenceSync:
    """TR-DPO (Gorbatovski et al., 2024, "Learn Your Reference Model for Real Good Alignment"): every `every` steps
    π_ref ← α·π_θ + (1 − α)·π_ref, α = `mixup_alpha` (1: a hard copy), as TRL's SyncRefModelCallback."""

    every: int
    mixup_alpha: float

    def __call__(self, reference: Any, params: Any, step: jax.Array) -> Any:
        """`reference` after optimizer step `step` (counted from 1): mixed towards `params` when the step is due."""

        def mixed():
            return jax.tree.map(
                lambda r, p: (self.mixup_alpha * p.astype(jnp.float32)
                              + (1 - self.mixup_alpha) * r.astype(jnp.float32)).astype(r.dtype),
                reference, params)

        return jax.lax.cond(step % self.every == 0, mixed, lambda: reference)


def _completion_lengths(rows: data.Rows, num_slots: int) -> jax.Array:
    """Tokens scored in each of the K completions of each row [B, K], from the batch alone (before any forward);
    packed rows number the K completions across the batch: [1, K]."""
    if rows.segment_ids_BxT is not None:
        return sequence_sums(jnp.zeros(rows.slots_BxN.shape), rows.slots_BxN, num_slots)[1][None]
    if rows.completion_only:
        return (rows.slots_BxN[..., None] == jnp.arange(num_slots)).sum(axis=1)
    return rows.loss_mask_BxT[:, 1:].sum(axis=-1)[:, None]


def make_sequence_logps(graphdef: Any, chunk_size: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`sequence_logps(params, rows, num_slots=1, scope="policy", prefix_lengths_BxK=None, tail_weight=1.0) ->
    (Σ log-probs [B, K], lengths [B, K])` of the K completions in each of `rows` (a data.Rows), from one forward:
    scored at every position (`loss_mask_BxT`) or at the completion-only block's positions alone. Packed rows
    (with segment ids) number the K completions across the batch: [1, K]. Tokens past `prefix_lengths_BxK` weigh
    `tail_weight` in the sums (LD-DPO)."""

    def sequence_logps(params, rows: data.Rows, num_slots: int = 1, scope: str = "policy",
                       prefix_lengths_BxK=None, tail_weight: float = 1.0):
        with jax.named_scope(scope):
            hidden, logits_fn = apply_model(graphdef, params, rows.tokens_BxT, rows.positions_BxT,
                                            rows.segment_ids_BxT, rows.branch_ids_BxT)
            if rows.completion_only:  # the LM head at the scored positions alone
                logps_BxN = gathered_logprobs(hidden, logits_fn, rows.sources_BxN, rows.targets_BxN, chunk_size)
                if rows.segment_ids_BxT is not None:  # packed rows: the slots number the batch's sequences
                    prefix_K = None if prefix_lengths_BxK is None else prefix_lengths_BxK[0]
                    sums_K, lengths_K = sequence_sums(logps_BxN, rows.slots_BxN, num_slots, prefix_K, tail_weight)
                    return sums_K[None], lengths_K[None]
                return slot_sums(logps_BxN, rows.slots_BxN, num_slots, prefix_lengths_BxK, tail_weight)
            prefix_B = None if prefix_lengths_BxK is None else prefix_lengths_BxK[:, 0]
            sums_B, lengths_B = sequence_logprobs(hidden, logits_fn, rows.tokens_BxT, rows.loss_mask_BxT, chunk_size,
                                                  prefix_B, tail_weight)
            return sums_B[:, None], lengths_B[:, None]

    return sequence_logps


def make_pair_logps(graphdef: Any, chunk_size: int) -> Callable[..., tuple[list, list]]:
    """`pair_logps(params, batch, scope="policy", ld_alpha=1.0) -> ([Σ log-probs chosen, rejected] [B], [their
    lengths] [B])` of a paired batch from one forward: its chosen and rejected rows stacked (PairedBatch), its
    shared-prompt rows scoring both completions (SharedPromptBatch), or its rows of packed pairs (PackedBatch).
    With `ld_alpha` ≠ 1, each completion's tokens past the pair's shared length (losses.ld_shared_lengths) weigh
    `ld_alpha` (LD-DPO)."""
    sequence_logps = make_sequence_logps(graphdef, chunk_size)

    def pair_logps(params, batch: data.PairedBatch | data.SharedPromptBatch | data.PackedBatch,
                   scope: str = "policy", ld_alpha: float = 1.0):
        if isinstance(batch, data.PackedBatch):  # slot p: pair p's chosen, P + p its rejected, in whichever row
            P, rows = batch.pair_ids.shape[0], batch.rows
            prefix_1x2P = None
            if ld_alpha != 1.0:
                lengths_1x2P = _completion_lengths(rows, 2 * P)
                shared_1xP = losses.ld_shared_lengths(lengths_1x2P[:, :P], lengths_1x2P[:, P:])
                prefix_1x2P = jnp.concatenate([shared_1xP, shared_1xP], axis=1)
            sums_1x2P, lengths_1x2P = sequence_logps(params, rows, 2 * P, scope, prefix_1x2P, ld_alpha)
            return [sums_1x2P[0, :P], sums_1x2P[0, P:]], [lengths_1x2P[0, :P], lengths_1x2P[0, P:]]
        if isinstance(batch, data.SharedPromptBatch):
            prefix_Bx2 = None
            if ld_alpha != 1.0:
                lengths_Bx2 = _completion_lengths(batch.rows, 2)
                shared_B = losses.ld_shared_lengths(lengths_Bx2[:, 0], lengths_Bx2[:, 1])
                prefix_Bx2 = jnp.stack([shared_B, shared_B], axis=1)
            sums_Bx2, lengths_Bx2 = sequence_logps(params, batch.rows, 2, scope, prefix_Bx2, ld_alpha)
            return [sums_Bx2[:, 0], sums_Bx2[:, 1]], [lengths_Bx2[:, 0], lengths_Bx2[:, 1]]
        if not isinstance(batch, data.PairedBatch):
            raise TypeError(f"pair_logps takes a data.PairedBatch, data.SharedPromptBatch or data.PackedBatch, got "
                            f"{type(batch).__name__}")
        prefix_2Bx1 = None
        if ld_alpha != 1.0:
            shared_B = losses.ld_shared_lengths(_completion_lengths(batch.chosen, 1)[:, 0],
                                                _completion_lengths(batch.rejected, 1)[:, 0])
            prefix_2Bx1 = jnp.concatenate([shared_B, shared_B])[:, None]
        rows = jax.tree.map(lambda chosen, rejected: jnp.concatenate([chosen, rejected]), batch.chosen, batch.rejected)
        sums_2Bx1, lengths_2Bx1 = sequence_logps(params, rows, 1, scope, prefix_2Bx1, ld_alpha)
        return jnp.split(sums_2Bx1[:, 0], 2), jnp.split(lengths_2Bx1[:, 0], 2)

    return pair_logps


def make_loss_fn(
    graphdef: Any, loss_name: str, loss_params: losses.LossParams, chunk_size: int
) -> Callable[..., tuple[jax.Array, tuple[Metrics, Any]]]:
    """`loss_fn(params, ref_params, batch, loss_state=None, train=True) -> (loss, (metrics, loss_state))` for a
    paired batch (chosen and rejected in one forward) or an unpaired one (completions; for KTO also the mismatched
    kl rows, forwarded without gradient). `loss_state` holds the loss's running means (losses.init_loss_state);
    in training they take in this batch, in evaluation (`train=False`) they are used as they are.

    π_ref's log-probs come from the batch when it carries them (`reference_chosen` / `reference_rejected`, from a
    reference cache: no reference forward, `ref_params` may be None), else from a forward of `ref_params`.
    """
    use_reference = losses.uses_reference(loss_name, loss_params)
    needs_kl = losses.get_loss(loss_name).kl_rows
    sequence_logps = make_sequence_logps(graphdef, chunk_size)
    pair_logps = make_pair_logps(graphdef, chunk_size)

    def frozen_reference(ref_params, batch):
        if ref_params is None:
            cached = ("or a batch with cached reference log-probs (reference_chosen, reference_rejected)"
                      if isinstance(batch, data.PAIRED_BATCHES) else "(unpaired batches carry no cached log-probs)")
            raise ValueError(f"loss {loss_name!r} needs π_ref: pass ref_params, {cached}")
        return jax.lax.stop_gradient(ref_params)

    def paired_logps(params, ref_params, batch):
        (policy_chosen, policy_rejected), (chosen_lengths, rejected_lengths) = pair_logps(
            params, batch, "policy", loss_params.ld_alpha)
        if not use_reference:
            reference_chosen = reference_rejected = jnp.zeros_like(policy_chosen)
        elif batch.reference_chosen is not None and batch.reference_rejected is not None:  # cached: no forward
            reference_chosen, reference_rejected = batch.reference_chosen, batch.reference_rejected
        else:
            reference = frozen_reference(ref_params, batch)
            (reference_chosen, reference_rejected), _ = pair_logps(reference, batch, "reference")
        return losses.PairLogps(
            policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths
        )

    def unpaired_logps(params, ref_params, batch):
        def reference(rows, like):
            if not use_reference:
                return jnp.zeros_like(like)
            return sequence_logps(frozen_reference(ref_params, batch), rows, 1, "reference")[0][:, 0]

        policy_Bx1, lengths_Bx1 = sequence_logps(params, batch.completion, 1, "policy")
        policy = policy_Bx1[:, 0]
        reference_logps = reference(batch.completion, policy)
        kl_policy = kl_reference = jnp.zeros_like(policy)
        if needs_kl:
            kl_policy = sequence_logps(jax.lax.stop_gradient(params), batch.kl, 1, "policy_kl")[0][:, 0]
            kl_reference = reference(batch.kl, policy)
        return losses.UnpairedLogps(policy, reference_logps, kl_policy, kl_reference, lengths_Bx1[:, 0], batch.label)

    def loss_fn(params, ref_params, batch, loss_state=None, train=True):
        if isinstance(batch, data.PAIRED_BATCHES):
            logps = paired_logps(params, ref_params, batch)
        elif isinstance(batch, data.UnpairedBatch):
            logps = unpaired_logps(params, ref_params, batch)
        else:
            raise TypeError(f"loss_fn takes a data.PairedBatch, data.SharedPromptBatch or data.UnpairedBatch, got "
                            f"{type(batch).__name__}")
        if train:
            loss_state = losses.update_loss_state(loss_name, loss_state, logps, loss_params)
        loss, metrics = losses.loss_and_metrics(loss_name, logps, loss_params, batch.weight, loss_state)
        return loss, (metrics, loss_state)

    return loss_fn


def _split_micro_batches(batch: data.Batch, num_micro_batches: int) -> data.Batch:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i + k, ...: each device's block of rows feeds every
    micro-batch, so a batch sharded over devices needs no resharding to be scanned."""
    return jax.tree.map(lambda x: x.reshape(-1, num_micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    shardings: StepShardings | None = None,
    reference_sync: ReferenceSync | None = None,
) -> Callable[[TrainState, Any, data.Batch], tuple[TrainState, Metrics]]:
    """The jit-compiled, state-donating step; `grad_accum_steps` micro-batches average to the full-batch gradient
    (a running mean takes in each micro-batch in turn). With `shardings`, compiled for them: state and reference
    params as the partition rules say, the batch split over the data axes, metrics replicated. With
    `reference_sync` (TR-DPO), π_ref is the state's `reference` (the `ref_params` argument is unused) and moves.

    A step whose loss, gradient or update is not finite changes neither params, optimizer state nor running means
    (metrics["skipped"] = 1).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, ref_params, batch, loss_state):
        if grad_accum_steps == 1:
            (_, (metrics, loss_state)), grads = grad_fn(params, ref_params, batch, loss_state)
            return grads, metrics, loss_state

        def accumulate(carry, micro_batch):
            totals, running = carry
            (_, (metrics, running)), grads = grad_fn(params, ref_params, micro_batch, running)
            return (jax.tree.map(jnp.add, totals, (grads, metrics)), running), None

        if isinstance(batch, data.PackedBatch):
            raise ValueError("grad_accum_steps > 1 cannot split a data.PackedBatch (a row holds pairs of several "
                             "micro-batches); use shared-prompt rows")
        micro_batches = _split_micro_batches(batch, grad_accum_steps)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        (_, (metrics_shape, _)), grads_shape = jax.eval_shape(grad_fn, params, ref_params, first, loss_state)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
        (totals, loss_state), _ = jax.lax.scan(accumulate, (zeros, loss_state), micro_batches)
        grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, totals)
        return grads, metrics, loss_state

    def train_step(state: TrainState, ref_params: Any, batch: data.Batch):
        reference = ref_params if reference_sync is None else state.reference
        grads, metrics, loss_state = gradients(state.params, reference, batch, state.loss_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss, gradient or update leaves params, optimizer state and running means as they were; the
        # step (the data position) still advances, and `skipped` tells the loop, which counts and limits such steps.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        params, opt_state, loss_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (optax.apply_updates(state.params, updates), opt_state, loss_state),
            (state.params, state.opt_state, state.loss_state),
        )
        metrics = {
            **metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
            "skipped": jnp.logical_not(finite).astype(jnp.float32), **losses.running_metrics(loss_state),
        }
        if reference_sync is not None:
            state = state.replace(reference=reference_sync(state.reference, params, state.step + 1))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_state=loss_state), metrics

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    s = shardings
    return jax.jit(train_step, donate_argnums=0, in_shardings=(s.state, s.ref_params, s.batch),
                   out_shardings=(s.state, s.replicated))


def make_eval_step(
    loss_fn: Callable, shardings: StepShardings | None = None
) -> Callable[..., tuple[Metrics, jax.Array]]:
    """Jit-compiled `(params, ref_params, batch, loss_state=None) -> (weighted-mean metrics, weight sum)`, for
    `shardings` if given (params sharded as the train state's); running means are read, never updated."""

    def eval_step(params, ref_params, batch, loss_state=None):
        if batch.weight is None:
            raise ValueError("eval_step takes a batch with `weight` (data.eval_batches gives one)")
        _, (metrics, _) = loss_fn(params, ref_params, batch, loss_state, train=False)
        return metrics, batch.weight.sum()

    if shardings is None:
        return jax.jit(eval_step)
    s = shardings
    return jax.jit(eval_step, in_shardings=(s.state.params, s.ref_params, s.batch, s.state.loss_state),
                   out_shardings=s.replicated)
