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

from dpo_jax import losses
from dpo_jax.logprobs import gathered_logprobs, sequence_logprobs, slot_sums
from dpo_jax.models import apply_model

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's inputs and outputs live (sharding.py builds them): the train state's and the reference
    params' NamedSharding trees, the batch's, and the replicated one of scalars and metrics."""

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


def make_sequence_logps(graphdef: Any, chunk_size: int) -> Callable[..., tuple[list, list]]:
    """`sequence_logps(params, batch, keys, scope="policy") -> ([Σ log-probs [B] per key], [lengths [B] per key])`
    for keys ("chosen", "rejected"), ("completion",) or ("kl",), from one forward of their rows in any layout of
    data/pipeline.py (a row per completion or shared-prompt rows; scored at every position or completion-only)."""

    def sequence_logps(params, batch, keys, scope="policy"):
        shared = tuple(keys) == ("chosen", "rejected") and "pair_tokens" in batch
        rows = ("pair",) if shared else keys

        def stacked(name):
            return jnp.concatenate([batch[f"{row}_{name}"] for row in rows]) if f"{rows[0]}_{name}" in batch else None

        tokens = stacked("tokens")
        with jax.named_scope(scope):
            hidden, logits_fn = apply_model(graphdef, params, tokens, stacked("positions"), None, stacked("branch_ids"))
            if f"{rows[0]}_targets" in batch:  # completion-only: the LM head at the scored positions alone
                logps = gathered_logprobs(hidden, logits_fn, stacked("sources"), stacked("targets"), chunk_size)
                sums, counts = slot_sums(logps, stacked("slots"), num_slots=2 if shared else 1)
            else:
                sums, counts = (x[:, None] for x in sequence_logprobs(
                    hidden, logits_fn, tokens, stacked("loss_mask"), chunk_size))
        if shared:
            return [sums[:, 0], sums[:, 1]], [counts[:, 0], counts[:, 1]]
        return jnp.split(sums[:, 0], len(keys)), jnp.split(counts[:, 0], len(keys))

    return sequence_logps


def make_loss_fn(
    graphdef: Any, loss_name: str, loss_params: losses.LossParams, chunk_size: int
) -> Callable[[Any, Any, Batch], tuple[jax.Array, Metrics]]:
    """`loss_fn(params, ref_params, batch) -> (loss, metrics)` for a paired batch (chosen and rejected in one
    forward) or an unpaired one (completions; for KTO also the mismatched kl rows, forwarded without gradient).

    π_ref's log-probs come from the batch when it carries them (`reference_chosen` / `reference_rejected`, from a
    reference cache: no reference forward, `ref_params` may be None), else from a forward of `ref_params`.
    """
    use_reference = losses.uses_reference(loss_name, loss_params)
    needs_kl = losses.get_loss(loss_name).data == "unpaired"
    sequence_logps = make_sequence_logps(graphdef, chunk_size)

    def reference_logps(ref_params, batch, keys, like):
        if not use_reference:
            return [jnp.zeros_like(like)] * len(keys)
        if all(f"reference_{key}" in batch for key in keys):  # cached: no reference forward
            return [batch[f"reference_{key}"] for key in keys]
        if ref_params is None:
            raise ValueError(f"loss {loss_name!r} needs π_ref: pass ref_params, or a batch with cached reference "
                             f"log-probs ({', '.join(f'reference_{key}' for key in keys)})")
        return sequence_logps(jax.lax.stop_gradient(ref_params), batch, keys, "reference")[0]

    def loss_fn(params, ref_params, batch):
        if "chosen_tokens" in batch or "pair_tokens" in batch:
            (policy_chosen, policy_rejected), (chosen_lengths, rejected_lengths) = sequence_logps(
                params, batch, ("chosen", "rejected"), "policy"
            )
            reference_chosen, reference_rejected = reference_logps(
                ref_params, batch, ("chosen", "rejected"), policy_chosen
            )
            logps = losses.PairLogps(
                policy_chosen, policy_rejected, reference_chosen, reference_rejected, chosen_lengths, rejected_lengths
            )
        else:
            (policy,), (lengths,) = sequence_logps(params, batch, ("completion",), "policy")
            (reference,) = reference_logps(ref_params, batch, ("completion",), policy)
            kl_policy = kl_reference = jnp.zeros_like(policy)
            if needs_kl:
                (kl_policy,), _ = sequence_logps(jax.lax.stop_gradient(params), batch, ("kl",), "policy_kl")
                (kl_reference,) = reference_logps(ref_params, batch, ("kl",), policy)
            logps = losses.UnpairedLogps(policy, reference, kl_policy, kl_reference, lengths, batch["label"])
        return losses.loss_and_metrics(loss_name, logps, loss_params, batch.get("weight"))

    return loss_fn


def _split_micro_batches(batch: Batch, num_micro_batches: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i + k, ...: each device's block of rows feeds every
    micro-batch, so a batch sharded over devices needs no resharding to be scanned."""
    return jax.tree.map(lambda x: x.reshape(-1, num_micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    shardings: StepShardings | None = None,
) -> Callable[[TrainState, Any, Batch], tuple[TrainState, Metrics]]:
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

    def train_step(state: TrainState, ref_params: Any, batch: Batch):
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
) -> Callable[[Any, Any, Batch], tuple[Metrics, jax.Array]]:
    """Jit-compiled `(params, ref_params, batch) -> (weighted-mean metrics, weight sum)`, for `shardings` if given
    (params sharded as the train state's)."""

    def eval_step(params, ref_params, batch):
        _, metrics = loss_fn(params, ref_params, batch)
        return metrics, batch["weight"].sum()

    if shardings is None:
        return jax.jit(eval_step)
    s = shardings
    return jax.jit(eval_step, in_shardings=(s.state.params, s.ref_params, s.batch), out_shardings=s.replicated)


