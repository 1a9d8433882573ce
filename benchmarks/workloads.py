"""Preference pairs with realistic lengths, the same for every layout and every trainer compared, and how much of each
layout's rows is padding.

    python -m benchmarks.workloads [--pairs 512] [--batch_size 8] [--json PATH]
    python -m benchmarks.workloads --time [--workload tldr] [--steps 12] [--batch_size 8]

Two length distributions, drawn with a fixed seed (token ids are random: only the shapes matter for speed):
- `tldr`: TL;DR-like. Prompt tokens from a log-normal with median 250 (σ 0.35), clipped to [40, 450]; chosen and
  rejected summaries independently uniform in [10, 60].
- `hh`: HH-RLHF-like multi-turn dialogues. Prompt tokens log-normal with median 250 (σ 0.7), clipped to [50, 900];
  completions independently log-normal with median 80 (σ 0.6), clipped to [20, 300].
`max_length` (prompt + one completion) is 512 for `tldr` and 1200 for `hh`: no pair is truncated.

The report: for each layout, the rows a training epoch pads (batches as the trainer makes them: shuffled, each padded
to the smallest length bucket of the config's defaults that holds its longest row) and the share of padding in them,
and the share of the LM head's positions that are prompt or padding in the plain layout (which completion-only
log-probs skip).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Sequence

import jax
import numpy as np

from benchmarks.step_time import MODELS, matmul_gflops
from dpo_jax import build, config as config_lib, data, models, sharding


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """Log-normal prompt lengths (median, σ, clip) and completion lengths (uniform, or log-normal when `median`)."""

    max_length: int
    prompt_median: float
    prompt_sigma: float
    prompt_clip: tuple[int, int]
    completion_clip: tuple[int, int]
    completion_median: float | None = None  # None: uniform over completion_clip
    completion_sigma: float = 0.0


WORKLOADS = {
    "tldr": LengthDistribution(max_length=512, prompt_median=250, prompt_sigma=0.35, prompt_clip=(40, 450),
                               completion_clip=(10, 60)),
    "hh": LengthDistribution(max_length=1200, prompt_median=250, prompt_sigma=0.7, prompt_clip=(50, 900),
                             completion_clip=(20, 300), completion_median=80, completion_sigma=0.6),
}


def pair_lengths(name: str, count: int, seed: int = 0) -> np.ndarray:
    """[count, 3] int: prompt, chosen and rejected token counts of `count` pairs drawn from workload `name`."""
    spec = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.round(rng.lognormal(np.log(spec.prompt_median), spec.prompt_sigma, count)),
                      *spec.prompt_clip)
    low, high = spec.completion_clip
    if spec.completion_median is None:
        completions = rng.integers(low, high + 1, (count, 2))
    else:
        completions = np.clip(np.round(rng.lognormal(np.log(spec.completion_median), spec.completion_sigma,
                                                     (count, 2))), low, high)
    return np.column_stack([prompts, completions]).astype(np.int64)


def encoded_pairs(lengths: np.ndarray, vocab_size: int, seed: int = 0) -> list[dict]:
    """Encoded examples (random token ids in [3, vocab_size)) with these prompt, chosen and rejected lengths."""
    rng = np.random.default_rng(seed + 1)
    ids = lambda n: rng.integers(3, vocab_size, int(n)).astype(np.int32)  # noqa: E731
    return [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)} for p, c, r in lengths]


def batches(examples: Sequence[dict], batch_size: int, seed: int = 0) -> list[list[dict]]:
    """One shuffled epoch of `examples` in batches of `batch_size` (the last partial batch dropped)."""
    order = np.random.default_rng(seed + 2).permutation(len(examples))
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order) - batch_size + 1, batch_size)]


def padding(name: str, layout: data.Layout, epoch: Sequence[Sequence[dict]]) -> dict:
    """Row tokens an epoch of `epoch`'s batches pads to in `layout` (the default buckets of the workload's
    max_length), the real tokens among them, and the padding's share; plus the plain layout's LM-head positions that
    score no completion token (prompt or padding), which completion-only log-probs skip (None for a
    completion-only layout, whose head runs at completion tokens alone)."""
    buckets = data.length_buckets(WORKLOADS[name].max_length, pack=layout.pack)
    padded = real = head_positions = scored = 0
    for examples in epoch:
        batch = data.collate(examples, buckets, 0, layout=layout)
        rows = [batch.chosen, batch.rejected] if isinstance(batch, data.PairedBatch) else [batch.rows]
        for r in rows:
            padded += r.tokens_BxT.size
            head_positions += r.tokens_BxT.shape[0] * (r.tokens_BxT.shape[1] - 1)
        completions = sum(len(e["chosen"]) + len(e["rejected"]) for e in examples)
        prompts = sum(len(e["prompt"]) for e in examples)
        real += completions + prompts * (2 if layout.pack == "none" else 1)
        scored += completions
    return {"padded_tokens": padded, "real_tokens": real, "padding_fraction": 1 - real / padded,
            "unscored_head_fraction": None if layout.completion_only else 1 - scored / head_positions}


LAYOUTS = {
    "plain (a row per completion)": data.Layout(),
    "shared prompt": data.Layout("shared_prompt"),
    "packed": data.Layout("packed"),
}


def report(pairs: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Each workload's length statistics and each layout's padding over one epoch of `pairs` pairs."""
    rows = []
    for name in WORKLOADS:
        lengths = pair_lengths(name, pairs, seed)
        epoch = batches(encoded_pairs(lengths, 1000, seed), batch_size, seed)
        for layout_name, layout in LAYOUTS.items():
            rows.append({"workload": name, "layout": layout_name,
                         "prompt_median": float(np.median(lengths[:, 0])), "prompt_max": int(lengths[:, 0].max()),
                         "completion_median": float(np.median(lengths[:, 1:])),
                         "completion_max": int(lengths[:, 1:].max()), **padding(name, layout, epoch)})
    return rows


def time_layouts(name: str, steps: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Seconds per step of each layout over the same `steps` batches of workload `name` (module docstring)."""
    fields = dict(MODELS["small"])
    vocab_size = fields.pop("vocab_size")
    lengths = pair_lengths(name, steps * batch_size, seed)
    epoch = batches(encoded_pairs(lengths, vocab_size, seed), batch_size, seed)
    results = []
    for layout_name, layout in LAYOUTS.items():
        config = config_lib.base_config()
        config.mode = "dpo"
        config.model.update(fields)
        config.optimizer.name = "adamw"
        config.data.max_length = WORKLOADS[name].max_length
        config.train.update(batch_size=batch_size, pack=layout.pack,
                            logprobs="completion_only" if layout.completion_only else "all_positions")
        mesh = sharding.make_mesh(config.mesh)
        buckets = build.buckets_of(config)
        collated = [data.collate(examples, buckets, 0, layout=build.layout_of(config)) for examples in epoch]
        model_config = models.config_from_section(config.model, vocab_size=vocab_size)
        graphdef, params = models.split_params(models.model_from_config(model_config, models.nnx.Rngs(0)))
        ref_params = jax.tree.map(lambda x: x.copy(), params)
        state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, ref_params)
        shapes = {}
        for batch in collated:  # compile (and run once) each distinct shape
            key = tuple(x.shape for x in jax.tree.leaves(batch))
            if key not in shapes:
                shapes[key] = True
                state, metrics = train_step(state, ref_params, sharding.global_batch(batch, mesh))
        jax.block_until_ready(metrics)
        started = time.perf_counter()
        for examples in epoch:
            batch = data.collate(examples, buckets, 0, layout=build.layout_of(config))
            state, metrics = train_step(state, ref_params, sharding.global_batch(batch, mesh))
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - started) / len(epoch)
        real = int(lengths.sum())
        results.append({"workload": name, "layout": layout_name, "seconds_per_step": seconds,
                        "pairs_per_second": batch_size / seconds, "tokens_per_second": real / len(epoch) / seconds,
                        "shapes_compiled": len(shapes), **padding(name, layout, epoch)})
        print(f"  {name} / {layout_name}: {seconds:.2f} s/step", file=sys.stderr, flush=True)
    shared = next(r for r in results if r["layout"] == "shared prompt")
    for r in results:
        r["speedup_vs_shared_prompt"] = r["pairs_per_second"] / shared["pairs_per_second"]
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--time", action="store_true", help="train each layout and report its speed")
    parser.add_argument("--workload", default="tldr", choices=list(WORKLOADS), help="with --time")
    parser.add_argument("--steps", type=int, default=12, help="with --time: timed steps (batches)")
    args = parser.parse_args(argv)
    if args.time:
        peak = matmul_gflops()
        rows = time_layouts(args.workload, args.steps, args.batch_size, args.seed)
        print(f"float32 matmul peak {peak:.1f} GFLOP/s; {args.steps} batches of {args.batch_size} pairs\n")
        print("| workload | layout | s/step | pairs/s | real tokens/s | padding | vs shared prompt |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['workload']} | {r['layout']} | {r['seconds_per_step']:.2f} | {r['pairs_per_second']:.2f} | "
                  f"{r['tokens_per_second']:.0f} | {100 * r['padding_fraction']:.1f}% | "
                  f"{r['speedup_vs_shared_prompt']:.2f}× |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"matmul_peak_gflops": peak, "rows": rows}, f, indent=2)
        return 0
    rows = report(args.pairs, args.batch_size, args.seed)
    print(f"{args.pairs} pairs, batches of {args.batch_size}, seed {args.seed}\n")
    print("| workload | layout | prompt median / max | completion median / max | row tokens | padding | "
          "LM-head positions scoring no completion |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['layout']} | {r['prompt_median']:.0f} / {r['prompt_max']} | "
              f"{r['completion_median']:.0f} / {r['completion_max']} | {r['padded_tokens']:,} | "
              f"{100 * r['padding_fraction']:.1f}% | " + ("none (completion-only)" if r["unscored_head_fraction"] is None
                                                         else f"{100 * r['unscored_head_fraction']:.1f}%") + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
