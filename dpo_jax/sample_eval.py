"""Evaluation on samples during training: each eval prompt sampled once, its reward and its KL to π_ref.

The KL of a sample y ~ π is Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over its completion tokens,
computed over the full vocabulary at each position (exact along the sampled prefix; its mean
over samples from π estimates the sequence-level KL(π ‖ π_ref)). The win-rate command built on it is evaluate.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import rewards, sharding
from dpo_jax.logprobs import token_kl
from dpo_jax.models import apply_model
from dpo_jax.sampling import Samples, SamplingSettings, sample



@functools.lru_cache(maxsize=8)  # One compile per model structure, however often it is evaluated.
def make_sequence_kl_fn(graphdef: Any, chunk_size: int, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Jitted `(params, ref_params, tokens_BxT, completion_mask_BxT) -> KL [B]` summed over completion tokens;
    with a mesh, replicated so that every process can read it."""

    def sequence_kl(params, ref_params, tokens_BxT, completion_mask_BxT):
        hidden, logits_fn = apply_model(graphdef, params, tokens_BxT)
        ref_hidden, ref_logits_fn = apply_model(graphdef, ref_params, tokens_BxT)
        kl_BxS = token_kl(hidden, logits_fn, ref_hidden, ref_logits_fn, chunk_size)
        return (kl_BxS * completion_mask_BxT[:, 1:]).sum(axis=-1)

    return jax.jit(sequence_kl, out_shardings=None if mesh is None else sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class SampleEvaluator:
    """What evaluating a model on samples needs, fixed for a run: the eval prompts, how to sample, the reward (or
    None), and the rng (the same at every evaluation, so successive evaluations differ only by the params)."""

    graphdef: Any
    prompt_tokens: np.ndarray  # [N, P], right-padded
    prompt_lengths: np.ndarray  # [N]
    tokenizer: Any
    settings: SamplingSettings
    reward: rewards.Reward | None
    rng: jax.Array
    batch_size: int
    mesh: jax.sharding.Mesh | None = None
    chunk_size: int = 128

    def prompt_texts(self) -> list[str]:
        """The eval prompts decoded."""
        return [self.tokenizer.decode(row[:n].tolist()) for row, n in zip(self.prompt_tokens, self.prompt_lengths)]

    def __call__(self, params: Any, ref_params: Any | None, settings: SamplingSettings | None = None,
                 rng: jax.Array | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Sample each prompt once: (means of kl (with ref_params), reward (with a reward) and completion_length,
        one record per sample: prompt, completion, length, logprob, and its kl and reward when computed)."""
        samples = sample(
            self.graphdef, params, self.prompt_tokens, self.prompt_lengths, tokenizer=self.tokenizer,
            settings=settings or self.settings, rng=self.rng if rng is None else rng, batch_size=self.batch_size,
            mesh=self.mesh)
        lengths = samples.completion_mask.sum(axis=-1)
        columns: dict[str, np.ndarray] = {"completion_length": lengths.astype(np.float64)}
        if ref_params is not None:
            columns["kl"] = sequence_kl(self.graphdef, params, ref_params, samples, self.batch_size, self.chunk_size,
                                        self.mesh)
        prompts = self.prompt_texts()
        if self.reward is not None:
            columns["reward"] = self.reward(prompts, samples.texts)
        records = [
            {"prompt": prompt, "completion": text, "length": int(length), "logprob": float(logprob),
             **{name: float(values[i]) for name, values in columns.items() if name != "completion_length"}}
            for i, (prompt, text, length, logprob) in enumerate(
                zip(prompts, samples.texts, lengths, samples.sequence_logprobs))
        ]
        return {name: float(np.mean(values)) for name, values in columns.items()}, records


def sequence_kl(graphdef: Any, params: Any, ref_params: Any, samples: Samples, batch_size: int,
                chunk_size: int, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """Σ_t KL(π(·|x, y_<t) ‖ π_ref(·|x, y_<t)) over each sample's completion tokens [N], in batches of `batch_size`
    rows (the last padded with copies of its first row, then dropped), sharded over the mesh's batch axes if any."""
    kl_fn = make_sequence_kl_fn(graphdef, chunk_size, mesh)
    num_samples, values = len(samples.texts), []
    for start in range(0, num_samples, batch_size):
        rows = np.arange(start, start + batch_size)
        rows = np.where(rows < num_samples, rows, start)
        batch = {"tokens": samples.tokens[rows], "mask": samples.completion_mask[rows]}
        batch = sharding.whole_batch(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch)
        kl = kl_fn(params, ref_params, batch["tokens"], batch["mask"])
        values.append(np.asarray(jax.device_get(kl))[: min(batch_size, num_samples - start)])
    return np.concatenate(values).astype(np.float64)
