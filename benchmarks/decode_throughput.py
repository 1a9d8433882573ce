"""Decode throughput of `dpo_jax.sampling.generate` (KV cache) against the old full-recompute sampler.

    python -m benchmarks.decode_throughput [--model demo medium] [--repeats 5] [--json PATH]
    python -m benchmarks.decode_throughput --model smollm2 --temperature 1 --repeats 2 \
        [--model_path ~/.cache/dpo_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]

Both samplers decode greedily with the same random-init model and random, full-length prompts, with no EOS (every
row generates all max_new_tokens), and must produce the same tokens. The full-recompute baseline (the sampler before
the KV cache) reruns the model over the whole [B, P + max_new_tokens] buffer at every step and reads the logits at
each row's cursor; the KV-cache sampler also runs with the same weights' blocks stacked in one scan
(`scan_layers`, a cache stacked over layers). Models (float32, Llama family): `demo` is configs/demo.py's model
with the word tokenizer's vocabulary, 128 prompts of 12 tokens, 10 new tokens (the demo's eval); `medium` is
benchmarks.step_throughput's (6 layers, hidden 512, vocab 32000), 8 prompts of 64 tokens, 64 new tokens; `smollm2`
(asked for by name) is SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152), 128 prompts of 64 tokens, 48
new tokens (the sampling of experiments/real_sentiment), stacked blocks only, as it trains (a full recompute of 30
layers takes minutes a call). Its weights are random unless `--model_path` names its checkpoint (the GGUF, or any
checkpoint `models.load_hf` reads, whose architecture then replaces the built-in one): with EOS off every row
decodes every token, so the weights do not change the work.

`--temperature`, `--top_p` and `--top_k` set the KV-cache samplers' draw (default greedy, which the full recompute
decodes too and is checked against; with temperature > 0 the full recompute is not run). The run first measures this
machine's float32 matmul rate; then for each model and sampler: the first call's time (compile + one run), and the
median of `--repeats` timed calls as new tokens/s = batch × max_new_tokens / seconds, with the ratio to full
recompute where it ran.
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
    "smollm2": (128, 64, 48),
}
DEFAULT_MODELS = ("demo", "medium")  # smollm2 is asked for by name: minutes a call on a CPU
SMOLLM2 = dict(num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
               rope_theta=1e5, rms_norm_eps=1e-5, tie_embeddings=True, vocab_size=49152)  # its GGUF's metadata


def model_config(name: str):
    """The model config of workload `name` (random init, float32)."""
    if name == "demo":
        from configs.demo import get_config

        config = get_config()
        return build.model_config_of(config, data.get_tokenizer(config.data.tokenizer).vocab_size)
    fields = dict(SMOLLM2 if name == "smollm2" else MODELS[name])
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


def unrolled_model(name: str, model_path: str = "") -> tuple[nnx.GraphDef, nnx.State, object]:
    """(graphdef, params, config) of workload `name` with unrolled blocks: random (seed 0), or for smollm2 the
    checkpoint at `model_path` when given."""
    if name == "smollm2" and model_path:
        return models.load_hf(model_path, scan_layers=False)
    config = dataclasses.replace(model_config(name), scan_layers=False)
    return *models.split_params(models.model_from_config(config, nnx.Rngs(0))), config


def measure(name: str, repeats: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
            model_path: str = "") -> list[dict]:
    """The samplers' rows on workload `name`: the KV cache (unrolled and stacked blocks; smollm2 stacked only)
    drawing with the given settings and, when greedy (not smollm2), the full recompute, checked to agree."""
    B, P, N = WORKLOADS[name]
    graphdef, params, config = unrolled_model(name, model_path)
    stacked_params, stacked_config = models.to_form(params, config, scan_layers=True)
    stacked_graphdef = models.abstract_model(stacked_config)[0]
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (B, P)), jnp.int32)
    lengths = jnp.full((B,), P, jnp.int32)

    def kv_cache(graphdef, params):
        return lambda: sampling.generate(
            graphdef, params, prompts, lengths, max_new_tokens=N, eos_id=-1, pad_id=0, rng=jax.random.key(0),
            temperature=temperature, top_p=top_p, top_k=top_k, stop_sequences=(), mesh=None).tokens

    samplers = {}
    if temperature == 0 and name != "smollm2":
        samplers["full recompute"] = lambda: full_recompute(graphdef, params, prompts, lengths, max_new_tokens=N)
    if name != "smollm2":
        samplers["KV cache"] = kv_cache(graphdef, params)
    samplers["KV cache, stacked blocks"] = kv_cache(stacked_graphdef, stacked_params)
    rows, outputs = [], {}
    for sampler, call in samplers.items():
        first, seconds, outputs[sampler] = timed(call, repeats)
        rows.append({"model": name, "sampler": sampler, "batch": B, "prompt_tokens": P, "new_tokens": N,
                     "temperature": temperature, "top_p": top_p, "top_k": top_k,
                     "first_call_seconds": first, "median_seconds": seconds, "tokens_per_second": B * N / seconds})
        print(f"  {name} / {sampler}: {seconds * 1e3:.1f} ms per call", file=sys.stderr, flush=True)
    # A GPU's TF32 matmuls may flip near-ties between the two programs.
    if "full recompute" in outputs and jax.default_backend() == "cpu":
        assert np.array_equal(outputs["full recompute"], outputs["KV cache"]), f"{name}: greedy tokens differ"
    if "KV cache" in outputs and temperature == 0:
        # The scan rounds differently in the last bit, which may flip a near-tie of a random model's logits.
        same = float(np.mean(np.asarray(outputs["KV cache"]) == np.asarray(outputs["KV cache, stacked blocks"])))
        print(f"  {name}: stacked blocks decode {same:.1%} of the tokens the unrolled ones do", file=sys.stderr)
    baseline = rows[0]["tokens_per_second"] if "full recompute" in outputs else None
    for r in rows:
        r["speedup"] = None if baseline is None else r["tokens_per_second"] / baseline
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| model | sampler | batch × prompt + new | first call | median call | per new token | new tokens/s "
             "| vs full recompute |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['batch']} × {r['prompt_tokens']} + {r['new_tokens']} | "
            f"{r['first_call_seconds']:.2f} s | {r['median_seconds'] * 1e3:.1f} ms | "
            f"{r['median_seconds'] / r['new_tokens'] * 1e3:.1f} ms | {r['tokens_per_second']:.0f} | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    """python -m benchmarks.decode_throughput: the matmul peak, then each workload's samplers (see the flags)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (their median is used)")
    parser.add_argument("--temperature", type=float, default=0.0, help="the KV-cache draw (0: greedy)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus filter of the KV-cache draw (1: none)")
    parser.add_argument("--top_k", type=int, default=0, help="top-k filter of the KV-cache draw (0: none)")
    parser.add_argument("--model_path", default="", help="smollm2's weights and architecture from this checkpoint "
                        "(its GGUF: python -m dpo_jax.fetch smollm2); default: random weights of its shape")
    parser.add_argument("--json", help="also write the rows (and the matmul peak) to this JSON file")
    args = parser.parse_args()
    peak = matmul_gflops()
    print(f"float32 matmul peak of this machine: {peak:.1f} GFLOP/s", file=sys.stderr, flush=True)
    rows = [row for name in args.model for row in measure(
        name, args.repeats, args.temperature, args.top_p, args.top_k, args.model_path)]
    draw = ("greedy" if args.temperature == 0 else
            f"temperature {args.temperature:g}, top_p {args.top_p:g}, top_k {args.top_k}")
    print(f"matmul peak {peak:.1f} GFLOP/s (float32, jax.numpy); {draw}, no EOS; median of {args.repeats} calls; "
          f"ratios against full recompute in the same run\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
