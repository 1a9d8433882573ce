"""The optimizer of a stage: global-norm clipping, then RMSprop (the paper, torch defaults) or AdamW, on a linear
warmup followed by a constant (the paper) or cosine schedule."""

from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(
    learning_rate: float, warmup_steps: int, num_steps: int, schedule: str
) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant (the paper) or cosine decay to 0."""
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, max(num_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid: constant, cosine")
    if warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    optimizer: ml_collections.ConfigDict, stage: ml_collections.ConfigDict
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clipping, then RMSprop (torch defaults, as the paper) or AdamW, on the stage's schedule."""
    schedule = learning_rate_schedule(
        stage.learning_rate, stage.warmup_steps, stage.num_steps, optimizer.schedule
    )
    if optimizer.name == "rmsprop":
        # torch.optim.RMSprop defaults: alpha=0.99, eps=1e-8 added outside the square root.
        base = optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    elif optimizer.name == "adamw":
        base = optax.adamw(schedule, weight_decay=optimizer.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer.name!r}; valid: rmsprop, adamw")
    return optax.chain(optax.clip_by_global_norm(optimizer.max_grad_norm), base), schedule
