"""Batched generation with a KV cache, for every model family: greedy, temperature, top-k and top-p sampling.

`generate` (pure, jitted) prefills the right-padded prompts in one forward pass, writing each layer's keys and
values into a cache of P + max_new_tokens slots (slot = position; stacked over layers when the blocks are), then decodes one token per row per step in a
`while_loop` with fixed shapes, attending over the cache; it stops when every row has emitted EOS or a stop
sequence, or after max_new_tokens. `sample` is the host-side shell: fixed-size batches over any number of prompts,
sharded over the mesh's batch axes, decoded to text and cut at stop strings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import sharding
from dpo_jax.models import apply_with_cache, empty_cache
from dpo_jax.models.layers import KVCache, StackedKVCache


def filter_logits(logits_BxV: jax.Array, top_p: jax.Array | float, top_k: jax.Array | int = 0) -> jax.Array:
    """Set to −inf every logit outside the top_k largest (0: no limit), then outside the smallest set of the rest
    whose probability reaches top_p (Hugging Face's order). Ties with the cut-off logit are kept."""
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
    sorted_BxV = jnp.where((top_k <= 0) | (jnp.arange(V) < top_k), sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    in_nucleus_BxV = (mass_before_BxV < top_p) & jnp.isfinite(sorted_BxV)
    num_keep_Bx1 = jnp.maximum(jnp.sum(in_nucleus_BxV, axis=-1, keepdims=True), 1)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, num_keep_Bx1 - 1, axis=-1)
    return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)


def sample_tokens(
    logits_BxV: jax.Array, rng: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
) -> jax.Array:
    """argmax when temperature == 0, else a draw from softmax(logits / temperature) restricted by top_k and top_p.
    The settings may be traced (one compile serves a sweep); the vocabulary is sorted only when a filter is asked
    for (top_k > 0 or top_p < 1), a branch chosen at run time."""
    logits_BxV = logits_BxV.astype(jnp.float32)

    def draw():
        safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
        scaled_BxV = logits_BxV / safe_temperature
        filtered_BxV = jax.lax.cond((jnp.asarray(top_k) > 0) | (jnp.asarray(top_p) < 1.0),
                                    lambda x: filter_logits(x, top_p, top_k), lambda x: x, scaled_BxV)
        return jax.random.categorical(rng, filtered_BxV, axis=-1)

    return jax.lax.cond(jnp.asarray(temperature) > 0, draw, lambda: jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


def _cache_sharding(cache: list[KVCache] | StackedKVCache, mesh: jax.sharding.Mesh) -> NamedSharding:
    """Each layer's cache as `sharding.kv_cache_sharding`; a cache stacked over layers (`scan_layers`) keeps its
    leading layer axis whole."""
    if isinstance(cache, list):
        return sharding.kv_cache_sharding(mesh, cache[0].k_BxSxGxK.shape)
    layer_spec = sharding.kv_cache_sharding(mesh, cache.k_LxBxSxGxK.shape[1:]).spec
    return NamedSharding(mesh, PartitionSpec(None, *layer_spec))


class Generation(NamedTuple):
    """What `generate` returns, each [B, P + max_new_tokens]."""

    tokens: jax.Array  # int32: the prompt, the generated tokens up to and including EOS or a stop sequence, then pad
    completion_mask: jax.Array  # int32: 1 exactly on generated tokens
    logprobs: jax.Array  # float32: log π(token | prefix) of each generated token (untempered, unfiltered), else 0


def _ends_with_stop(tokens_BxS: jax.Array, cursor_B: jax.Array, lengths_B: jax.Array, stops: tuple) -> jax.Array:
    """Whether each row's completion ends, at `cursor`, with one of the `stops` token sequences."""
    hit_B = jnp.zeros(cursor_B.shape, bool)
    for stop in stops:
        offsets_L = jnp.arange(len(stop)) - len(stop) + 1
        slots_BxL = cursor_B[:, None] + offsets_L
        window_BxL = jnp.take_along_axis(tokens_BxS, jnp.maximum(slots_BxL, 0), axis=1)
        hit_B |= jnp.all(window_BxL == jnp.asarray(stop), axis=1) & (slots_BxL[:, 0] >= lengths_B)
    return hit_B


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "eos_id", "pad_id", "stop_sequences", "mesh")
)
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
    top_k: jax.Array | int = 0,
    stop_sequences: tuple[tuple[int, ...], ...] = (),
    mesh: jax.sharding.Mesh | None = None,
) -> Generation:
    """Extend each right-padded prompt (row i real on [0, prompt_lengths[i]), lengths ≥ 1) by ≤ max_new_tokens.

    Jitted: graphdef, max_new_tokens, eos_id, pad_id, stop_sequences (token-id tuples) and mesh are static;
    temperature, top_p and top_k are traced (a sweep compiles once). Token i of every row is drawn with
    `fold_in(rng, i)`. With a mesh, the KV cache is sharded as `sharding.kv_cache_sharding` and the outputs are
    replicated, so that every process can read them whole.
    """
    B, P = prompt_tokens_BxP.shape
    S = P + max_new_tokens
    lengths_B = prompt_lengths_B.astype(jnp.int32)
    rows_B = jnp.arange(B)
    prompt_BxP = jnp.where(jnp.arange(P) < lengths_B[:, None], prompt_tokens_BxP, pad_id).astype(jnp.int32)
    tokens_BxS = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompt_BxP)
    cache = empty_cache(graphdef, params, B, S)
    if mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, _cache_sharding(cache, mesh))

    # Prefill: the whole prompt buffer at once; a row's padding writes slots its own tokens overwrite later.
    hidden_BxPxD, logits_fn, cache = apply_with_cache(
        graphdef, params, prompt_BxP, jnp.broadcast_to(jnp.arange(P), (B, P)), cache)
    logits_BxV = logits_fn(hidden_BxPxD[rows_B, lengths_B - 1][:, None])[:, 0]

    def body(carry):
        i, tokens_BxS, mask_BxS, logprobs_BxS, done_B, logits_BxV, cache = carry
        cursor_B = lengths_B + i  # the slot of the token drawn now
        next_B = sample_tokens(logits_BxV, jax.random.fold_in(rng, i), temperature, top_p, top_k)
        logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV), next_B[:, None], axis=-1)[:, 0]
        next_B = jnp.where(done_B, pad_id, next_B)
        tokens_BxS = tokens_BxS.at[rows_B, cursor_B].set(next_B)
        mask_BxS = mask_BxS.at[rows_B, cursor_B].set(jnp.where(done_B, 0, 1))
        logprobs_BxS = logprobs_BxS.at[rows_B, cursor_B].set(jnp.where(done_B, 0.0, logprob_B))
        done_B |= (next_B == eos_id) | _ends_with_stop(tokens_BxS, cursor_B, lengths_B, stop_sequences)
        hidden_Bx1xD, logits_fn, cache = apply_with_cache(graphdef, params, next_B[:, None], cursor_B[:, None], cache)
        return i + 1, tokens_BxS, mask_BxS, logprobs_BxS, done_B, logits_fn(hidden_Bx1xD)[:, 0], cache

    def more(carry):
        i, done_B = carry[0], carry[4]
        return (i < max_new_tokens) & ~jnp.all(done_B)

    start = (0, tokens_BxS, jnp.zeros((B, S), jnp.int32), jnp.zeros((B, S), jnp.float32), jnp.zeros((B,), bool),
             logits_BxV, cache)
    _, tokens_BxS, mask_BxS, logprobs_BxS, *_ = jax.lax.while_loop(more, body, start)
    generation = Generation(tokens_BxS, mask_BxS, logprobs_BxS)
    return generation if mesh is None else jax.lax.with_sharding_constraint(generation, sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How to sample: the config's `eval` section (`from_config`), or set by hand."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, eval_config: Any, **overrides: Any) -> "SamplingSettings":
        """The settings of a config's `eval` section, with `overrides` (e.g. another temperature)."""
        fields = dict(max_new_tokens=eval_config.max_new_tokens, temperature=eval_config.temperature,
                      top_p=eval_config.top_p, top_k=eval_config.top_k, stop=tuple(eval_config.stop))
        return cls(**{**fields, **overrides})


@dataclasses.dataclass
class Samples:
    """Generated completions of N prompts, on the host."""

    tokens: np.ndarray  # [N, P + max_new_tokens] as Generation.tokens
    completion_mask: np.ndarray  # [N, P + max_new_tokens]
    logprobs: np.ndarray  # [N, P + max_new_tokens]
    texts: list[str]  # each completion decoded (special tokens dropped), cut before the first stop string

    @property
    def sequence_logprobs(self) -> np.ndarray:
        """log π(completion | prompt) of each sample [N]."""
        return self.logprobs.sum(axis=-1)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    ends = [text.find(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_tokens_NxP: np.ndarray,
    prompt_lengths_N: np.ndarray,
    *,
    tokenizer: Any,
    settings: SamplingSettings,
    rng: jax.Array,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> Samples:
    """Generate for N prompts in batches of `batch_size` rows (the last padded with copies of its first prompt and
    dropped), each batch's rows sharded over the mesh's batch axes; batch b draws with `fold_in(rng, b)`."""
    num_prompts = len(prompt_lengths_N)
    stop_sequences = tuple(tuple(tokenizer.encode(s)) for s in settings.stop if s and tokenizer.encode(s))
    parts = []
    for b, start in enumerate(range(0, num_prompts, batch_size)):
        rows = np.arange(start, start + batch_size)
        rows = np.where(rows < num_prompts, rows, start)
        prompts, lengths = prompt_tokens_NxP[rows], prompt_lengths_N[rows]
        if mesh is not None:
            batch = sharding.whole_batch({"tokens": prompts, "lengths": lengths}, mesh)
            prompts, lengths = batch["tokens"], batch["lengths"]
        generation = generate(
            graphdef, params, jnp.asarray(prompts), jnp.asarray(lengths), max_new_tokens=settings.max_new_tokens,
            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, rng=jax.random.fold_in(rng, b),
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            stop_sequences=stop_sequences, mesh=mesh,
        )
        parts.append(jax.tree.map(lambda x, n=min(batch_size, num_prompts - start): np.asarray(x)[:n],
                                  jax.device_get(generation)))
    tokens, mask, logprobs = (np.concatenate([getattr(p, f) for p in parts]) for f in Generation._fields)
    texts = [cut_at_stop(tokenizer.decode(row[m > 0].tolist()), settings.stop) for row, m in zip(tokens, mask)]
    return Samples(tokens, mask, logprobs, texts)
