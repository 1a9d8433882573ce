"""Evaluation on samples: the ground-truth reward of generated completions and their KL to π_ref.

The KL of a sample y ~ π is Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over its completion tokens,
computed over the full vocabulary at each position (exact along the sampled prefix; its mean
over samples from π estimates the sequence-level KL(π ‖ π_ref)).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.logprobs import token_kl
from dpo_jax.models import apply_model
from dpo_jax.sampling import generate


@functools.lru_cache(maxsize=8)  # One compile per model structure, however often it is evaluated.
def make_sequence_kl_fn(graphdef: Any, chunk_size: int) -> Callable:
    """Jitted `(params, ref_params, tokens_BxT, completion_mask_BxT) -> KL [B]` summed over completion tokens."""

    def sequence_kl(params, ref_params, tokens_BxT, completion_mask_BxT):
        hidden, logits_fn = apply_model(graphdef, params, tokens_BxT)
        ref_hidden, ref_logits_fn = apply_model(graphdef, ref_params, tokens_BxT)
        kl_BxS = token_kl(hidden, logits_fn, ref_hidden, ref_logits_fn, chunk_size)
        return (kl_BxS * completion_mask_BxT[:, 1:]).sum(axis=-1)

    return jax.jit(sequence_kl)


def sample_metrics(
    graphdef: Any,
    params: Any,
    ref_params: Any,
    prompt_tokens_NxP: np.ndarray,
    prompt_lengths_N: np.ndarray,
    *,
    tokenizer,
    reward_fn: Callable[[str], float] | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    rng: jax.Array,
    chunk_size: int = 128,
    num_examples: int = 3,
) -> dict[str, Any]:
    """Sample completions for the prompts; mean ground-truth reward (if the task has one), mean KL, length."""
    tokens, completion_mask = generate(
        graphdef,
        params,
        jnp.asarray(prompt_tokens_NxP),
        jnp.asarray(prompt_lengths_N),
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        rng=rng,
        temperature=temperature,
        top_p=top_p,
    )
    kl = make_sequence_kl_fn(graphdef, chunk_size)(params, ref_params, tokens, completion_mask)
    tokens, completion_mask, kl = jax.device_get((tokens, completion_mask, kl))
    completions = [tokenizer.decode(row[m > 0].tolist()) for row, m in zip(tokens, completion_mask)]
    prompts = [tokenizer.decode(row[:n].tolist()) for row, n in zip(prompt_tokens_NxP, prompt_lengths_N)]
    metrics: dict[str, Any] = {
        "kl": float(np.mean(kl)),
        "completion_length": float(completion_mask.sum(axis=-1).mean()),
        "examples": [{"prompt": p, "completion": c} for p, c in list(zip(prompts, completions))[:num_examples]],
    }
    if reward_fn is not None:
        metrics["ground_truth_reward"] = float(np.mean([reward_fn(c) for c in completions]))
    return metrics
