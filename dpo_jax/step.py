"""The pure core of training: TrainState, the loss function and the jit-compiled train/eval steps.

The step is `(state, ref_params, batch) -> (state, metrics)`: reference params are a separate frozen
pytree (`None` for losses that need no reference), never in the optimizer state, never updated. The loop
that drives it (stages, resume, logging, preemption) is run.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from dpo_jax import data, losses
from dpo_jax.logprobs import gathered_logprobs, sequence_logprobs, slot_sums
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
    """Everything an optimizer step changes: the step count, the policy params, the optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_sequence_logps(graphdef: Any, chunk_size: int) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`sequence_logps(params, rows, num_slots=1, scope="policy") -> (Σ log-probs [B, K], lengths [B, K])` of the K
    completions in each of `rows` (a data.Rows), from one forward: scored at every position (`loss_mask_BxT`) or at
    the completion-only block's positions alone."""

    def sequence_logps(params, rows: data.Rows, num_slots: int = 1, scope: str = "policy"):
        with jax.named_scope(scope):
            hidden, logits_fn = apply_model(graphdef, params, rows.tokens_BxT, rows.positions_BxT, None,
                                            rows.branch_ids_BxT)
            if rows.completion_only:  # the LM head at the scored positions alone
                logps_BxN = gathered_logprobs(hidden, logits_fn, rows.sources_BxN, rows.targets_BxN, chunk_size)
                return slot_sums(logps_BxN, rows.slots_BxN, num_slots)
            sums_B, lengths_B = sequence_logprobs(hidden, logits_fn, rows.tokens_BxT, rows.loss_mask_BxT, chunk_size)
            return sums_B[:, None], lengths_B[:, None]

    return sequence_logps


def make_pair_logps(graphdef: Any, chunk_size: int) -> Callable[..., tuple[list, list]]:
    """`pair_logps(params, batch, scope="policy") -> ([Σ log-probs chosen, rejected] [B], [their lengths] [B])` of a
    paired batch from one forward: its chosen and rejected rows stacked (PairedBatch), or its shared-prompt rows
    scoring both completions (SharedPromptBatch)."""
    sequence_logps = make_sequence_logps(graphdef, chunk_size)

    def pair_logps(params, batch: data.PairedBatch | data.SharedPromptBatch, scope: str = "policy"):
        if isinstance(batch, data.SharedPromptBatch):
            sums_Bx2, lengths_Bx2 = sequence_logps(params, batch.rows, 2, scope)
            return [sums_Bx2[:, 0], sums_Bx2[:, 1]], [lengths_Bx2[:, 0], lengths_Bx2[:, 1]]
        if not isinstance(batch, data.PairedBatch):
            raise TypeError(f"pair_logps takes a data.PairedBatch or data.SharedPromptBatch, got "
                            f"{type(batch).__name__}")
        rows = jax.tree.map(lambda chosen, rejected: jnp.concatenate([chosen, rejected]), batch.chosen, batch.rejected)
        sums_2Bx1, lengths_2Bx1 = sequence_logps(params, rows, 1, scope)
        return jnp.split(sums_2Bx1[:, 0], 2), jnp.split(lengths_2Bx1[:, 0], 2)

    return pair_logps


def make_loss_fn(
    graphdef: Any, loss_name: str, loss_params: losses.LossParams, chunk_size: int
) -> Callable[[Any, Any, data.Batch], tuple[jax.Array, Metrics]]:
    """`loss_fn(params, ref_params, batch) -> (loss, metrics)` for a paired batch (chosen and rejected in one
    forward) or an unpaired one (completions; for KTO also the mismatched kl rows, forwarded without gradient).

    π_ref's log-probs come from the batch when it carries them (`reference_chosen` / `reference_rejected`, from a
    reference cache: no reference forward, `ref_params` may be None), else from a forward of `ref_params`.
    """
    use_reference = losses.uses_reference(loss_name, loss_params)
    needs_kl = losses.get_loss(loss_name).data == "unpaired"
    sequence_logps = make_sequence_logps(graphdef, chunk_size)
    pair_logps = make_pair_logps(graphdef, chunk_size)

    def frozen_reference(ref_params, batch):
        if ref_params is None:
            cached = ("or a batch with cached reference log-probs (reference_chosen, reference_rejected)"
                      if isinstance(batch, data.PAIRED_BATCHES) else "(unpaired batches carry no cached log-probs)")
            raise ValueError(f"loss {loss_name!r} needs π_ref: pass ref_params, {cached}")
        return jax.lax.stop_gradient(ref_params)

    def paired_logps(params, ref_params, batch):
        (policy_chosen, policy_rejected), (chosen_lengths, rejected_lengths) = pair_logps(params, batch, "policy")
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

    def loss_fn(params, ref_params, batch):
        if isinstance(batch, data.PAIRED_BATCHES):
            logps = paired_logps(params, ref_params, batch)
        elif isinstance(batch, data.UnpairedBatch):
            logps = unpaired_logps(params, ref_params, batch)
        else:
            raise TypeError(f"loss_fn takes a data.PairedBatch, data.SharedPromptBatch or data.UnpairedBatch, got "
                            f"{type(batch).__name__}")
        return losses.loss_and_metrics(loss_name, logps, loss_params, batch.weight)

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
) -> Callable[[TrainState, Any, data.Batch], tuple[TrainState, Metrics]]:
    """The jit-compiled, state-donating step; `grad_accum_steps` micro-batches average to the full-batch gradient.
    With `shardings`, compiled for them: state and reference params as the partition rules say, the batch split
    over the data axes, metrics replicated.

    A step whose loss, gradient or update is not finite changes neither params nor optimizer state
    (metrics["skipped"] = 1).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, ref_params, batch):
        if grad_accum_steps == 1:
            (_, metrics), grads = grad_fn(params, ref_params, batch)
            return grads, metrics

        def accumulate(carry, micro_batch):
            (_, metrics), grads = grad_fn(params, ref_params, micro_batch)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        micro_batches = _split_micro_batches(batch, grad_accum_steps)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        (_, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, ref_params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
        totals, _ = jax.lax.scan(accumulate, zeros, micro_batches)
        return jax.tree.map(lambda x: x / grad_accum_steps, totals)

    def train_step(state: TrainState, ref_params: Any, batch: data.Batch):
        grads, metrics = gradients(state.params, ref_params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss, gradient or update leaves params and optimizer state as they were; the step (the
        # data position) still advances, and `skipped` tells the loop, which counts and limits such steps.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (optax.apply_updates(state.params, updates), opt_state),
            (state.params, state.opt_state),
        )
        metrics = {
            **metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
            "skipped": jnp.logical_not(finite).astype(jnp.float32),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    s = shardings
    return jax.jit(train_step, donate_argnums=0, in_shardings=(s.state, s.ref_params, s.batch),
                   out_shardings=(s.state, s.replicated))


def make_eval_step(
    loss_fn: Callable, shardings: StepShardings | None = None
) -> Callable[[Any, Any, data.Batch], tuple[Metrics, jax.Array]]:
    """Jit-compiled `(params, ref_params, batch) -> (weighted-mean metrics, weight sum)`, for `shardings` if given
    (params sharded as the train state's)."""

    def eval_step(params, ref_params, batch):
        _, metrics = loss_fn(params, ref_params, batch)
        if batch.weight is None:
            raise ValueError("eval_step takes a batch with `weight` (data.eval_batches gives one)")
        return metrics, batch.weight.sum()

    if shardings is None:
        return jax.jit(eval_step)
    s = shardings
    return jax.jit(eval_step, in_shardings=(s.state.params, s.ref_params, s.batch), out_shardings=s.replicated)


