"""The forgetting check: perplexity of a held-out text (eval.perplexity_path) under the policy and under π_ref at
each evaluation, so that drift away from the pretrained language model shows up as a number beside the rewards.

Perplexity = exp(Σ −log π(token | the tokens before it in its window) / number of scored tokens), over every window
of data.held_out_text.text_windows. π_ref's is measured at each evaluation beside the policy's (one forward over the
windows; under TR-DPO, the stage's initial π_ref, as for the KL of samples).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import sharding
from dpo_jax.logprobs import token_logprobs
from dpo_jax.models import apply_model


@functools.lru_cache(maxsize=8)
def make_token_nll_fn(graphdef: Any, chunk_size: int, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """Jitted `(params, tokens_BxT, mask_BxT) -> Σ −log π of the masked tokens` (float32 scalar)."""

    def nll(params, tokens_BxT, mask_BxT):
        hidden_BxTxD, logits_fn = apply_model(graphdef, params, tokens_BxT)
        logprobs_BxS = token_logprobs(hidden_BxTxD, logits_fn, tokens_BxT, chunk_size)
        return -(logprobs_BxS * mask_BxT[:, 1:]).sum()

    return jax.jit(nll, out_shardings=None if mesh is None else sharding.replicated(mesh))


def perplexity(graphdef: Any, params: Any, tokens: np.ndarray, mask: np.ndarray, batch_size: int, chunk_size: int,
               mesh: jax.sharding.Mesh | None = None) -> float:
    """exp of the mean negative log-likelihood of the masked tokens, in batches of `batch_size` windows (the last
    padded with masked-out copies)."""
    nll_fn = make_token_nll_fn(graphdef, chunk_size, mesh)
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        rows = np.arange(start, start + batch_size)
        batch = {"tokens": tokens[np.where(rows < len(tokens), rows, start)],
                 "mask": np.where((rows < len(tokens))[:, None], mask[np.minimum(rows, len(tokens) - 1)], 0.0)
                 .astype(np.float32)}
        batch = sharding.whole_batch(batch, mesh) if mesh is not None else jax.tree.map(jnp.asarray, batch)
        total += float(jax.device_get(nll_fn(params, batch["tokens"], batch["mask"])))
    return math.exp(total / float(mask.sum()))


@dataclasses.dataclass
class PerplexityCheck:
    """`check(policy, reference)` -> {"perplexity/policy", "perplexity/reference" (with a reference)}."""

    graphdef: Any
    tokens: np.ndarray
    mask: np.ndarray
    batch_size: int
    chunk_size: int = 128
    mesh: jax.sharding.Mesh | None = None

    def __call__(self, policy: Any, reference: Any | None = None) -> dict[str, float]:
        """The perplexities of the held-out text under `policy` and, if given, `reference`."""
        score = functools.partial(perplexity, self.graphdef, tokens=self.tokens, mask=self.mask,
                                  batch_size=self.batch_size, chunk_size=self.chunk_size, mesh=self.mesh)
        metrics = {"perplexity/policy": score(policy)}
        if reference is not None:
            metrics["perplexity/reference"] = score(reference)
        return metrics
