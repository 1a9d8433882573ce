"""dpo_jax's DPO step side by side with TRL's DPOTrainer and Tunix's DPO trainer, on the same pairs, model shape,
precision and optimizer; anyone can rerun it.

    python -m benchmarks.compare [--workload small tldr] [--batches N] [--ours plain default packed]
                                 [--peer_python /tmp/bench_venv/bin/python] [--json PATH] [--cost_analysis]

Workloads: the fixed-length ones of benchmarks/step_throughput.py (`small`, `medium`, `long_prompt`: every prompt
and completion exactly that long, its model) and the realistic ones of benchmarks/workloads.py (`tldr`, `hh`: the
`small` model, lengths from its distributions, the same seed and batch order as its `--time`). Llama-shaped
decoder, random init, float32, AdamW (lr, weight decay, clip norm and β: dpo_jax's config defaults), 8 pairs a
batch. compare.py writes the pairs to one workload file (benchmarks/peers/workload_file.py), so every arm trains
on the same token ids, and runs each arm in its own process (its own peak RSS; torch never enters ours):
- ours, each `--ours` layout: `plain` (a row per completion, LM head at every position: the FLOPs Tunix computes),
  `default` (the config's defaults: shared-prompt rows, completion-only log-probs), `packed`. A timed step is
  collating the batch on the host and the compiled train step (policy forward and backward, π_ref's forward,
  AdamW), dispatched back to back, after one step on every distinct padded shape;
- TRL (benchmarks/peers/trl_dpo.py) and Tunix (benchmarks/peers/tunix_dpo.py, its `step` and its `train` loop),
  run by `--peer_python` (or $DPO_JAX_PEER_PYTHON): a separate venv holding them (docs/speed.md has the recipe).
  A peer that is absent is reported as "not installed" in the table; one that fails, with its last error line.

Columns: s/step; pairs/s; real tokens/s (prompt + chosen + rejected, no padding); GFLOP/s: the matmul FLOPs of the
rows as each arm pads them (step_throughput.forward_flops: projections, attention over the padded rows, the LM head
where the arm runs it; backward = 2 × forward, plus π_ref's forward) per second, and its share of this machine's
float32 matmul peak (step_time.matmul_gflops, measured at the start); peak RSS; the ratio of ours (`default`) to
each arm. Compare within one run: on a shared machine the absolute rates move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import step_throughput, workloads
from benchmarks.peers import workload_file
from benchmarks.step_time import MODELS, matmul_gflops

PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
PEERS = {"trl": ("trl_dpo.py", "trl"), "tunix": ("tunix_dpo.py", "tunix")}  # runner, module it needs
PEER_PYTHON_ENV = "DPO_JAX_PEER_PYTHON"
OURS = ("plain", "default", "packed")
FIXED = step_throughput.WORKLOADS  # name -> (model, prompt tokens, completion tokens)
REALISTIC = workloads.WORKLOADS  # name -> LengthDistribution
DEFAULT_BATCHES = {"fixed": 3, "realistic": 12}  # step_throughput's timed steps; workloads --time's batches


def workload_spec(name: str, batch_size: int) -> dict:
    """The settings every arm trains `name` with: model shape, batch size, float32, AdamW's and the loss's settings
    (dpo_jax's config defaults), and the longest row (prompt + one completion)."""
    from dpo_jax import config as config_lib

    base = config_lib.base_config()
    model_name = FIXED[name][0] if name in FIXED else "small"
    model = dict(MODELS[model_name], rope_theta=float(base.model.rope_theta),
                 rms_norm_eps=float(base.model.rms_norm_eps))
    max_length = FIXED[name][1] + FIXED[name][2] if name in FIXED else REALISTIC[name].max_length
    return {"workload": name, "model_name": model_name, "model": model, "batch_size": batch_size,
            "learning_rate": float(base.dpo.learning_rate), "weight_decay": float(base.optimizer.weight_decay),
            "max_grad_norm": float(base.optimizer.max_grad_norm), "beta": float(base.loss.beta),
            "dtype": "float32", "max_length": max_length}


def workload_pairs(name: str, batches: int, batch_size: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """`batches` × `batch_size` pairs of workload `name` in batch order (random token ids in [3, vocab_size))."""
    count = batches * batch_size
    if name in FIXED:
        _, prompt, completion = FIXED[name]
        rng = np.random.default_rng(seed)
        ids = lambda n: rng.integers(3, vocab_size, n).astype(np.int32)  # noqa: E731
        return [{"prompt": ids(prompt), "chosen": ids(completion), "rejected": ids(completion)}
                for _ in range(count)]
    lengths = workloads.pair_lengths(name, count, seed)
    epoch = workloads.batches(workloads.encoded_pairs(lengths, vocab_size, seed), batch_size, seed)
    return [pair for batch in epoch for pair in batch]


def write_workload(path: str, name: str, batches: int, batch_size: int, seed: int = 0) -> dict:
    """Write workload `name`'s file to `path`; returns its spec."""
    spec = workload_spec(name, batch_size)
    workload_file.save(path, spec, workload_pairs(name, batches, batch_size, spec["model"]["vocab_size"], seed))
    return spec


def ours_config(spec: dict, arm: str):
    """dpo_jax's config for our arm `arm` (OURS) on the workload `spec`."""
    from dpo_jax import config as config_lib

    config = config_lib.base_config()
    config.mode = "dpo"
    config.model.update({k: v for k, v in spec["model"].items() if k != "vocab_size"})
    config.model.dtype = spec["dtype"]
    config.optimizer.update(name="adamw", weight_decay=spec["weight_decay"], max_grad_norm=spec["max_grad_norm"])
    config.dpo.update(learning_rate=spec["learning_rate"], warmup_steps=0)
    config.loss.beta = spec["beta"]
    config.data.max_length = spec["max_length"]
    config.train.batch_size = spec["batch_size"]
    if arm == "plain":
        config.train.update(pack="none", logprobs="all_positions")
    elif arm == "packed":
        config.train.update(pack="packed", logprobs="completion_only")
    elif arm != "default":
        raise ValueError(f"--ours takes {OURS}, got {arm!r}")
    config.mesh.fsdp = 1
    return config


def padded_shape(batch) -> list[int]:
    """[rows, row length, LM-head positions per row] of one of our collated batches."""
    from dpo_jax import data

    rows = batch.chosen if isinstance(batch, data.PairedBatch) else batch.rows
    count, length = rows.tokens_BxT.shape
    scored = rows.targets_BxN.shape[1] if rows.completion_only else length - 1
    return [2 * count if isinstance(batch, data.PairedBatch) else count, length, scored]


def run_ours(path: str, arm: str, cost_analysis: bool = False) -> dict:
    """Time our step (`arm`'s layout) on the workload file at `path`, in this process (module docstring)."""
    import jax

    from dpo_jax import build, data, models, sharding

    spec, pairs = workload_file.load(path)
    config = ours_config(spec, arm)
    layout, buckets = build.layout_of(config), build.buckets_of(config)
    epoch = workload_file.batches(spec, pairs)
    mesh = sharding.make_mesh(config.mesh)
    model_config = models.config_from_section(config.model, vocab_size=spec["model"]["vocab_size"])
    graphdef, params = models.split_params(models.model_from_config(model_config, models.nnx.Rngs(0)))
    ref_params = jax.tree.map(lambda x: x.copy(), params)
    state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, ref_params,
                                             donate_params=True)
    started = time.perf_counter()
    shapes, first = {}, None
    for examples in epoch:  # one step on each distinct padded shape: its compile
        batch = sharding.global_batch(data.collate(examples, buckets, 0, layout=layout), mesh)
        first = first or batch
        key = tuple(x.shape for x in jax.tree.leaves(batch))
        if key not in shapes:
            shapes[key] = True
            state, metrics = train_step(state, ref_params, batch)
            jax.block_until_ready(metrics)
    warmup_seconds = time.perf_counter() - started
    padded = []
    started = time.perf_counter()
    for examples in epoch:
        collated = data.collate(examples, buckets, 0, layout=layout)
        state, metrics = train_step(state, ref_params, sharding.global_batch(collated, mesh))
        padded.append(padded_shape(collated))
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - started) / len(epoch)
    result = {"framework": f"dpo_jax ({arm})", "seconds_per_step": seconds, "warmup_seconds": warmup_seconds,
              "shapes_compiled": len(shapes), "timed_steps": len(epoch), "padded_shapes": padded,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "pack": config.train.pack, "logprobs": config.train.logprobs, "jax": jax.__version__}
    if cost_analysis:
        cost = train_step.lower(state, ref_params, first).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result["cost_analysis"] = {"train_step": {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost}}
    return result


def run_subprocess(command: list[str], label: str) -> dict:
    """Run an arm's command; its last stdout line parsed as JSON, or {'error': ...} naming what went wrong."""
    out = subprocess.run(command, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        errors = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return {"error": f"{label} failed (exit {out.returncode}): {errors[-1] if errors else 'no output'}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"{label} printed no JSON line: {lines[-1][:200]!r}"}


def peer_status(peer: str, peer_python: str | None) -> str | None:
    """None when `peer` can run under `peer_python`, else why not ('not installed: ...')."""
    if not peer_python:
        return f"not installed (no peer venv: pass --peer_python or set ${PEER_PYTHON_ENV})"
    if not os.path.exists(peer_python):
        return f"not installed (no interpreter at {peer_python})"
    module = PEERS[peer][1]
    probe = subprocess.run([peer_python, "-c", f"import importlib.util, sys; "
                            f"sys.exit(importlib.util.find_spec({module!r}) is None)"], capture_output=True)
    if probe.returncode != 0:
        return f"not installed ({module} is not importable by {peer_python})"
    return None


def run_arm(arm: str, path: str, peer_python: str | None, cost_analysis: bool, tunix_padding: str) -> dict:
    """One arm's result on the workload file: `ours:<layout>`, `trl` or `tunix`."""
    if arm.startswith("ours:"):
        command = [sys.executable, "-m", "benchmarks.compare", "--worker", arm.split(":", 1)[1], path]
        return run_subprocess(command + (["--cost_analysis"] if cost_analysis else []), arm)
    status = peer_status(arm, peer_python)
    if status:
        return {"error": status, "not_installed": True}
    command = [peer_python, os.path.join(PEERS_DIR, PEERS[arm][0]), path]
    if arm == "tunix":
        command += ["--padding", tunix_padding] + (["--cost_analysis"] if cost_analysis else [])
    return run_subprocess(command, arm)


def rows_of(workload: str, arm: str, result: dict, spec: dict, pairs: list[dict], peak: float) -> list[dict]:
    """The table rows of one arm's result (Tunix gives two: its step and its train loop)."""
    name = {"trl": "TRL DPOTrainer", "tunix": "Tunix DPOTrainer step"}.get(arm, f"ours, {arm.split(':')[-1]}")
    if "error" in result:
        return [{"workload": workload, "arm": name, "error": result["error"]}]
    epoch = workload_file.batches(spec, pairs)
    tokens = sum(workload_file.real_tokens(b) for b in epoch) / len(epoch)
    model = spec["model"]
    flops = sum(4 * step_throughput.forward_flops(model, rows, length, scored)
                for rows, length, scored in result["padded_shapes"]) / len(epoch)
    real = sum(len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for b in epoch for p in b)
    padded = sum(rows * length for rows, length, _ in result["padded_shapes"])
    if arm.startswith("ours:"):  # our layouts run the prompt once per pair in shared rows
        real_in_rows = real if result.get("pack") != "none" else real + sum(len(p["prompt"]) for b in epoch for p in b)
    else:
        real_in_rows = real + sum(len(p["prompt"]) for b in epoch for p in b)
    timings = [("", result["seconds_per_step"])]
    if "loop_seconds_per_step" in result:
        timings.append((" (train loop)", result["loop_seconds_per_step"]))
    rows = []
    for suffix, seconds in timings:
        label = name if not suffix else name.replace(" step", "") + suffix
        rows.append({
            "workload": workload, "arm": label, "framework": result["framework"], "seconds_per_step": seconds,
            "pairs_per_second": spec["batch_size"] / seconds, "tokens_per_second": tokens / seconds,
            "gflops": flops / seconds / 1e9, "fraction_of_peak": flops / seconds / 1e9 / peak,
            "padding_fraction": 1 - real_in_rows / padded, "peak_rss_gib": result["peak_rss_gib"],
            "warmup_seconds": result.get("warmup_seconds"), "raw": result})
    return rows


def median_result(results: list[dict]) -> dict:
    """An arm's result over its rounds: the median round's (by step time), Tunix's loop time its own median, the
    rounds' step times listed, the cost analysis of the first round; an error if a round failed."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(results, key=lambda r: r["seconds_per_step"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    median["rounds_seconds_per_step"] = [r["seconds_per_step"] for r in results]
    if "loop_seconds_per_step" in median:
        loops = sorted(r["loop_seconds_per_step"] for r in results)
        median["loop_seconds_per_step"] = loops[(len(loops) - 1) // 2]
    if "cost_analysis" in results[0]:
        median["cost_analysis"] = results[0]["cost_analysis"]
    median["peak_rss_gib"] = max(r["peak_rss_gib"] for r in results)
    return median


def measure(workload: str, arms: list[str], batches: int, batch_size: int, peer_python: str | None, peak: float,
            cost_analysis: bool = False, tunix_padding: str = "batch", workdir: str | None = None,
            rounds: int = 1) -> list[dict]:
    """Every arm's rows on `workload` (each arm `rounds` times, interleaved, its median round kept), each ratio
    against ours (`default`, or the first of ours) in this run."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, f"{workload}.npz")
        spec = write_workload(path, workload, batches, batch_size)
        _, pairs = workload_file.load(path)
        results = {arm: [] for arm in arms}
        for round_index in range(rounds):  # the arms interleaved, so a change in the machine's load hits them all
            for arm in arms:
                if results[arm] and "error" in results[arm][0]:
                    continue
                result = run_arm(arm, path, peer_python, cost_analysis and round_index == 0, tunix_padding)
                results[arm].append(result)
                print(f"  {workload} / {arm}, round {round_index + 1}: " + (
                    result["error"] if "error" in result else f"{result['seconds_per_step']:.2f} s/step"),
                    file=sys.stderr, flush=True)
        rows = [row for arm in arms for row in rows_of(workload, arm, median_result(results[arm]), spec, pairs, peak)]
    timed = [r for r in rows if "error" not in r]
    base = next((r for r in timed if r["arm"] == "ours, default"),
                next((r for r in timed if r["arm"].startswith("ours")), None))
    for r in timed:
        r["ours_default_vs_this"] = base["pairs_per_second"] / r["pairs_per_second"] if base else None
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| workload | arm | s/step | pairs/s | real tokens/s | GFLOP/s (of peak) | padding | peak RSS | "
             "ours (default) ÷ this |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['arm']} | {r['error']} | | | | | | |")
            continue
        ratio = "" if r["ours_default_vs_this"] is None else f"{r['ours_default_vs_this']:.2f}×"
        lines.append(
            f"| {r['workload']} | {r['arm']} | {r['seconds_per_step']:.2f} | {r['pairs_per_second']:.2f} | "
            f"{r['tokens_per_second']:.0f} | {r['gflops']:.1f} ({100 * r['fraction_of_peak']:.0f}%) | "
            f"{100 * r['padding_fraction']:.1f}% | {r['peak_rss_gib']:.2f} GiB | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", nargs="+", default=["small", "tldr"], choices=list(FIXED) + list(REALISTIC))
    parser.add_argument("--batches", type=int, help="timed batches (default: 3 fixed-length, 12 realistic)")
    parser.add_argument("--batch_size", type=int, default=step_throughput.PAIRS)
    parser.add_argument("--ours", nargs="*", default=["plain", "default"], choices=OURS)
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--peer_python", default=os.environ.get(PEER_PYTHON_ENV),
                        help=f"the peer venv's python (default ${PEER_PYTHON_ENV})")
    parser.add_argument("--tunix_padding", choices=("batch", "max"), default="batch",
                        help="Tunix's rows: padded to the batch's longest, or to the workload's (one shape)")
    parser.add_argument("--cost_analysis", action="store_true", help="XLA's flops / bytes of ours' and Tunix's steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every arm this many times, interleaved, and keep each arm's median round")
    parser.add_argument("--json", help="also write the rows (and the matmul peak) to this JSON file")
    parser.add_argument("--workdir", help="where the workload files go (default: a temporary directory)")
    parser.add_argument("--worker", nargs=2, metavar=("LAYOUT", "WORKLOAD_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_ours(args.worker[1], args.worker[0], args.cost_analysis)))
        return 0
    peak = matmul_gflops()
    print(f"float32 matmul peak of this machine: {peak:.1f} GFLOP/s", file=sys.stderr, flush=True)
    arms = [f"ours:{layout}" for layout in args.ours] + list(args.peers)
    rows = []
    for workload in args.workload:
        batches = args.batches or DEFAULT_BATCHES["fixed" if workload in FIXED else "realistic"]
        rows += measure(workload, arms, batches, args.batch_size, args.peer_python, peak, args.cost_analysis,
                        args.tunix_padding, args.workdir, args.rounds)
    print(f"matmul peak {peak:.1f} GFLOP/s (float32, jax.numpy); {args.batch_size} pairs a batch; "
          f"each arm's median of {args.rounds} round(s); load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n")
    print(table(rows))
    for r in rows:
        if "cost_analysis" in r.get("raw", {}):
            print(f"XLA cost analysis, {r['workload']} / {r['arm']}: {json.dumps(r['raw']['cost_analysis'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "batch_size": args.batch_size, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
