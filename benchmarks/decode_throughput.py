"""Decode throughput of `dpo_jax.sampling.generate` (KV cache) against the old full-recompute sampler.

    python -m benchmarks.decode_throughput [--model demo medium] [--repeats 5] [--json PATH]

Both samplers decode greedily with the same random-init model and random, full-length prompts, with no EOS (every
row generates all max_new_tokens), and must produce the same tokens. The full-recompute baseline (the sampler before
the KV cache) reruns the model over the whole [B, P + max_new_tokens] buffer at every step and reads the logits at
each row's cursor; the KV-cache sampler also runs with the same weights' blocks stacked in one scan
(`scan_layers`, a cache stacked over layers). Models (float32, Llama family): `demo` is configs/demo.py's model with the word tokenizer's
vocabulary, 128 prompts of 12 tokens, 10 new tokens (the demo's eval); `medium` is benchmarks.step_throughput's
(6 layers, hidden 512, vocab 32000), 8 prompts of 64 tokens, 64 new tokens. The run first measures this machine's
float32 matmul rate; then for each model and sampler: the first call's time (compile + one run), and the median of
`--repeats` timed calls as new tokens/s = batch × max_new_tokens / seconds, with the ratio to full recompute.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.step_time import MODELS, matmul_gflops
from dpo_jax import build, config as config_lib, data, models, sampling

WORKLOADS = {  # batch, prompt tokens, new tokens
    "demo": (128, 12, 10),
    "medium": (8, 64, 64),
}


def model_config(name: str):
    """The model config of workload `name` (random init, float32)."""
    if name == "demo":
        from configs.demo import get_config

        config = get_config()
        return build.model_config_of(config, data.get_tokenizer(config.data.tokenizer).vocab_size)
    fields = dict(MODELS[name])
    vocab_size = fields.pop("vocab_size")
    config = config_lib.base_config()
    config.model.update(fields)
    return build.model_config_of(config, vocab_size)


@functools.partial(jax.jit, static_argnums=0, static_argnames="max_new_tokens")
def full_recompute(graphdef, params, prompt_tokens_BxP, prompt_lengths_B, *, max_new_tokens):
    """Greedy decoding that reruns the model over the whole buffer each step (the sampler before the KV cache)."""
    B, P = prompt_tokens_BxP.shape
    rows_B = jnp.arange(B)
    tokens_BxS = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt_tokens_BxP)

    def step(i, tokens_BxS):
        cursor_B = prompt_lengths_B - 1 + i
        hidden_BxSxD, logits_fn = models.apply_model(graphdef, params, tokens_BxS)
        logits_BxV = logits_fn(hidden_BxSxD[rows_B, cursor_B][:, None])[:, 0]
        return tokens_BxS.at[rows_B, cursor_B + 1].set(jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(0, max_new_tokens, step, tokens_BxS)


def timed(call, repeats: int) -> tuple[float, float, jax.Array]:
    """(first call's seconds, median seconds of `repeats` more calls, the output)."""
    started = time.perf_counter()
    out = jax.block_until_ready(call())
    first = time.perf_counter() - started
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(call())
        seconds.append(time.perf_counter() - started)
    return first, statistics.median(seconds), out


def measure(name: str, repeats: int) -> list[dict]:
    """Both samplers' rows on workload `name`."""
    B, P, N = WORKLOADS[name]
    config = model_config(name)
    config = dataclasses.replace(config, scan_layers=False)
    graphdef, params = models.split_params(models.model_from_config(config, nnx.Rngs(0)))
    stacked_params, stacked_config = models.to_form(params, config, scan_layers=True)
    stacked_graphdef = models.abstract_model(stacked_config)[0]
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (B, P)), jnp.int32)
    lengths = jnp.full((B,), P, jnp.int32)

    def kv_cache(graphdef, params):
        return lambda: sampling.generate(
            graphdef, params, prompts, lengths, max_new_tokens=N, eos_id=-1, pad_id=0, rng=jax.random.key(0),
            temperature=0.0, top_p=1.0, top_k=0, stop_sequences=(), mesh=None).tokens

    samplers = {
        "full recompute": lambda: full_recompute(graphdef, params, prompts, lengths, max_new_tokens=N),
        "KV cache": kv_cache(graphdef, params),
        "KV cache, stacked blocks": kv_cache(stacked_graphdef, stacked_params),
    }
    rows, outputs = [], {}
    for sampler, call in samplers.items():
        first, seconds, outputs[sampler] = timed(call, repeats)
        rows.append({"model": name, "sampler": sampler, "batch": B, "prompt_tokens": P, "new_tokens": N,
                     "first_call_seconds": first, "median_seconds": seconds, "tokens_per_second": B * N / seconds})
        print(f"  {name} / {sampler}: {seconds * 1e3:.1f} ms per call", file=sys.stderr, flush=True)
    if jax.default_backend() == "cpu":  # a GPU's TF32 matmuls may flip near-ties between the two programs
        assert np.array_equal(outputs["full recompute"], outputs["KV cache"]), f"{name}: greedy tokens differ"
    # The scan rounds differently in the last bit, which may flip a near-tie of a random model's logits.
    same = float(np.mean(np.asarray(outputs["KV cache"]) == np.asarray(outputs["KV cache, stacked blocks"])))
    print(f"  {name}: stacked blocks decode {same:.1%} of the tokens the unrolled ones do", file=sys.stderr)
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| model | sampler | batch × prompt + new | first call | median call | new tokens/s | vs full recompute |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['batch']} × {r['prompt_tokens']} + {r['new_tokens']} | "
            f"{r['first_call_seconds']:.2f} s | {r['median_seconds'] * 1e3:.1f} ms | {r['tokens_per_second']:.0f} | "
            f"{r['speedup']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (their median is used)")
    parser.add_argument("--json", help="also write the rows (and the matmul peak) to this JSON file")
    args = parser.parse_args()
    peak = matmul_gflops()
    print(f"float32 matmul peak of this machine: {peak:.1f} GFLOP/s", file=sys.stderr, flush=True)
    rows = [row for name in args.model for row in measure(name, args.repeats)]
    print(f"matmul peak {peak:.1f} GFLOP/s (float32, jax.numpy); greedy, no EOS; median of {args.repeats} calls; "
          f"ratios against full recompute in the same run\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
