"""DPO training throughput of each speed option, measured in one run: the plain layout, completion-only log-probs,
shared-prompt rows, each with π_ref's forward in the step or its log-probs cached.

    python -m benchmarks.step_throughput [--workload small medium long_prompt] [--steps 3] [--json PATH]

Workloads (Llama architecture, float32, random weights, every prompt and completion exactly this long): `small`
(4 layers, hidden 256, vocab 8192; prompt 96, completion 32), `medium` (6 layers, hidden 512, vocab 32000; prompt
192, completion 64), `long_prompt` (`medium` with prompt 448); 8 pairs a step. The run first measures this
machine's float32 matmul rate (the peak the achieved rate is compared with), then runs each option in its own
process (clean compile time and peak RSS): full DPO steps (policy forward and backward, π_ref's forward unless
cached, AdamW) timed after a warm-up step, and for a cached π_ref the precompute forward of one batch, timed the
same way. Columns:
- step pairs/s: pairs per second of the training step alone;
- epoch pairs/s: one epoch end to end with π_ref's cost included (in the step, or the precompute pass spread over
  the epoch: its time per batch added to each step);
- tokens/s: prompt + chosen + rejected tokens of the pairs per second of the step;
- GFLOP/s: model FLOPs the step computes (matmuls from the shapes: projections, attention scores and values over
  the padded rows, the LM head where it runs; backward = 2 × forward) per second, and that / the matmul peak;
- peak RSS of the process, and the step's compile time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

from benchmarks.step_time import MODELS, matmul_gflops

PAIRS = 8
WORKLOADS = {  # model, prompt tokens, completion tokens
    "small": ("small", 96, 32),
    "medium": ("medium", 192, 64),
    "long_prompt": ("medium", 448, 64),
}


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    pack: str
    logprobs: str
    cached: bool


OPTIONS = [
    Option(f"{name}{' + cached π_ref' if cached else ''}", pack, logprobs, cached)
    for cached in (False, True)
    for name, pack, logprobs in (
        ("plain (today's layout)", "none", "all_positions"),
        ("completion-only log-probs", "none", "completion_only"),
        ("shared prompt + completion-only", "shared_prompt", "completion_only"),
    )
]
BASELINE = OPTIONS[0].name


def forward_flops(model: dict, rows: int, length: int, scored: int) -> float:
    """Matmul FLOPs of one forward over `rows` × `length` tokens with the LM head at `scored` positions per row."""
    D, F, V, L = model["hidden_size"], model["intermediate_size"], model["vocab_size"], model["num_layers"]
    HK, GK = model["num_heads"] * model["head_dim"], model["num_kv_heads"] * model["head_dim"]
    tokens = rows * length
    per_layer = 2 * tokens * (D * (HK + 2 * GK) + HK * D + 3 * D * F) + 2 * 2 * rows * length * length * HK
    return L * per_layer + 2 * rows * scored * D * V


def worker(workload: str, option: Option, steps: int, precompute: bool) -> dict:
    """Time `option` on `workload` in this process: the train step, or (`precompute`) π_ref's cache forward."""
    import jax
    import numpy as np

    from dpo_jax import build, config as config_lib, data, models, sharding
    from dpo_jax.step import make_pair_logps

    model_name, P, C = WORKLOADS[workload]
    fields = dict(MODELS[model_name])
    vocab_size = fields.pop("vocab_size")
    config = config_lib.base_config()
    config.mode = "dpo"
    config.model.update(fields)
    config.optimizer.name = "adamw"
    config.train.update(batch_size=PAIRS, pack=option.pack, logprobs=option.logprobs)
    config.mesh.fsdp = 1
    layout = build.layout_of(config)
    if precompute:
        layout = dataclasses.replace(layout, completion_only=True)
    rng = np.random.default_rng(0)
    examples = [{"prompt": rng.integers(3, vocab_size, P).astype(np.int32),
                 "chosen": rng.integers(3, vocab_size, C).astype(np.int32),
                 "rejected": rng.integers(3, vocab_size, C).astype(np.int32)} for _ in range(PAIRS)]
    if option.cached and not precompute:
        examples = data.with_reference_logps(examples, np.full(PAIRS, -100.0), np.full(PAIRS, -100.0))
    row_length = P + 2 * C if layout.pack == "shared_prompt" else P + C
    batch = data.collate(examples, (row_length,), 0, layout=layout)
    mesh = sharding.make_mesh(config.mesh)
    batch = sharding.global_batch(batch, mesh)
    model_config = models.config_from_section(config.model, vocab_size=vocab_size)
    graphdef, params = models.split_params(models.model_from_config(model_config, models.nnx.Rngs(0)))
    rows = PAIRS if layout.pack == "shared_prompt" else 2 * PAIRS
    first_rows = batch.rows if isinstance(batch, data.SharedPromptBatch) else batch.chosen
    scored = first_rows.targets_BxN.shape[1] if first_rows.completion_only else row_length - 1
    forward = forward_flops(MODELS[model_name], rows, row_length, scored)

    if precompute:
        pair_logps = make_pair_logps(graphdef, config.train.logprob_chunk_size)
        call = jax.jit(lambda p, b: pair_logps(p, b, "reference"))
        started = time.perf_counter()
        compiled = call.lower(params, batch).compile()
        compile_seconds = time.perf_counter() - started
        jax.block_until_ready(compiled(params, batch))
        started = time.perf_counter()
        for _ in range(steps):
            out = compiled(params, batch)
        jax.block_until_ready(out)
        flops = forward
    else:
        ref_params = None if option.cached else jax.tree.map(lambda x: x.copy(), params)
        state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, ref_params,
                                                 donate_params=True)
        started = time.perf_counter()
        compiled = train_step.lower(state, ref_params, batch).compile()
        compile_seconds = time.perf_counter() - started
        state, metrics = compiled(state, ref_params, batch)
        jax.block_until_ready(metrics)
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, ref_params, batch)
        jax.block_until_ready(metrics)
        flops = 3 * forward + (0 if option.cached else forward)
    seconds = (time.perf_counter() - started) / steps
    return {"seconds": seconds, "flops": flops, "compile_seconds": compile_seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "tokens": PAIRS * (P + 2 * C)}


def run_worker(workload: str, option: Option, steps: int, precompute: bool = False) -> dict:
    """`worker` in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.step_throughput", "--worker", workload, option.name,
               "--steps", str(steps)] + (["--precompute"] if precompute else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(workload: str, steps: int, peak_gflops: float) -> list[dict]:
    """Every option's row on `workload`."""
    rows, precomputed = [], {}
    for option in OPTIONS:
        result = run_worker(workload, option, steps)
        step_seconds = result["seconds"]
        epoch_seconds = step_seconds
        if option.cached:
            key = option.pack
            if key not in precomputed:
                precomputed[key] = run_worker(workload, option, steps, precompute=True)["seconds"]
            epoch_seconds += precomputed[key]
        gflops = result["flops"] / step_seconds / 1e9
        rows.append({
            "workload": workload, "option": option.name, "step_seconds": step_seconds,
            "step_pairs_per_second": PAIRS / step_seconds, "epoch_pairs_per_second": PAIRS / epoch_seconds,
            "tokens_per_second": result["tokens"] / step_seconds, "gflops": gflops,
            "fraction_of_peak": gflops / peak_gflops, "peak_rss_gib": result["peak_rss_gib"],
            "compile_seconds": result["compile_seconds"],
            "precompute_seconds_per_batch": precomputed.get(option.pack) if option.cached else None,
        })
        print(f"  {workload} / {option.name}: {step_seconds:.2f} s/step", file=sys.stderr, flush=True)
    base = next(r for r in rows if r["option"] == BASELINE)
    for r in rows:
        r["step_speedup"] = r["step_pairs_per_second"] / base["step_pairs_per_second"]
        r["epoch_speedup"] = r["epoch_pairs_per_second"] / base["epoch_pairs_per_second"]
        r["rss_ratio"] = r["peak_rss_gib"] / base["peak_rss_gib"]
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| workload | option | step pairs/s | epoch pairs/s | tokens/s | GFLOP/s | of peak | peak RSS | compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['option']} | {r['step_pairs_per_second']:.2f} ({r['step_speedup']:.2f}×) | "
            f"{r['epoch_pairs_per_second']:.2f} ({r['epoch_speedup']:.2f}×) | {r['tokens_per_second']:.0f} | "
            f"{r['gflops']:.1f} | {100 * r['fraction_of_peak']:.0f}% | {r['peak_rss_gib']:.2f} GiB "
            f"({r['rss_ratio']:.2f}×) | {r['compile_seconds']:.1f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--json", help="also write the rows (and the matmul peak) to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "OPTION"), help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        option = next(o for o in OPTIONS if o.name == args.worker[1])
        print(json.dumps(worker(args.worker[0], option, args.steps, args.precompute)))
        return
    peak = matmul_gflops()
    print(f"float32 matmul peak of this machine: {peak:.1f} GFLOP/s", file=sys.stderr, flush=True)
    rows = [row for workload in args.workload for row in measure(workload, args.steps, peak)]
    print(f"matmul peak {peak:.1f} GFLOP/s (float32, jax.numpy); {PAIRS} pairs a step; speed-ups against "
          f"{BASELINE!r} in the same run\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "pairs_per_step": PAIRS, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
