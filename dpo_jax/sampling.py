"""Batched generation from right-padded prompts: greedy, or temperature + nucleus (top-p) sampling.

This is the foundation decoder: every step reruns the model over the whole fixed [B, T] buffer (causal
attention makes positions after a row's cursor irrelevant) and reads logits at each row's cursor only.
A KV-cache decoder with the same signature replaces it in the sampling issue.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import apply_model


def top_p_filter(logits_BxV: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Set to −inf every logit outside the smallest set of top tokens whose probability reaches top_p."""
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    num_keep_Bx1 = jnp.maximum(jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, num_keep_Bx1 - 1, axis=-1)
    return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)


def sample_tokens(
    logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float
) -> jax.Array:
    """argmax when temperature == 0, else a draw from softmax(logits / temperature) restricted to top_p."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    filtered_BxV = top_p_filter(logits_BxV.astype(jnp.float32) / safe_temperature, top_p)
    sampled_B = jax.random.categorical(rng, filtered_BxV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "eos_id", "pad_id"))
def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_tokens_BxP: jax.Array,
    prompt_lengths_B: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    rng: jax.Array,
    temperature: jax.Array | float = 0.0,
    top_p: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Extend each right-padded prompt (row i real on [0, prompt_lengths[i]), lengths >= 1) by <= max_new_tokens.

    Jitted; graphdef, max_new_tokens, eos_id and pad_id are static, temperature and top_p are traced (a sweep
    compiles once). Returns (tokens_BxT, completion_mask_BxT), T = P + max_new_tokens: each row is its prompt,
    then its generated tokens up to and including the first eos_id, then pad_id; the int32 mask is 1 exactly
    on generated tokens (EOS included).
    """
    B, P = prompt_tokens_BxP.shape
    T = P + max_new_tokens
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    rows_B = jnp.arange(B)
    in_prompt_BxP = jnp.arange(P) < prompt_lengths_B[:, None]
    tokens_BxT = jnp.full((B, T), pad_id, jnp.int32)
    tokens_BxT = tokens_BxT.at[:, :P].set(jnp.where(in_prompt_BxP, prompt_tokens_BxP, pad_id))
    mask_BxT = jnp.zeros((B, T), jnp.int32)

    def step(i, carry):
        tokens_BxT, mask_BxT, done_B = carry
        cursor_B = prompt_lengths_B - 1 + i  # last filled position; its logits predict the next token
        hidden_BxTxD, logits_fn = apply_model(graphdef, params, tokens_BxT)
        hidden_Bx1xD = hidden_BxTxD[rows_B, cursor_B][:, None]
        logits_BxV = logits_fn(hidden_Bx1xD)[:, 0]
        next_B = sample_tokens(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p)
        next_B = jnp.where(done_B, pad_id, next_B)
        tokens_BxT = tokens_BxT.at[rows_B, cursor_B + 1].set(next_B)
        mask_BxT = mask_BxT.at[rows_B, cursor_B + 1].set(jnp.where(done_B, 0, 1))
        return tokens_BxT, mask_BxT, done_B | (next_B == eos_id)

    tokens_BxT, mask_BxT, _ = jax.lax.fori_loop(
        0, max_new_tokens, step, (tokens_BxT, mask_BxT, jnp.zeros((B,), bool))
    )
    return tokens_BxT, mask_BxT
