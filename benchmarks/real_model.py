"""SmolLM2-135M-Instruct from its GGUF: load time and peak host memory, and the time of a DPO step of
configs/smollm2.py, each in a fresh process, beside this machine's float32 matmul peak.

    python -m dpo_jax.fetch smollm2 && python benchmarks/real_model.py [--variant cpu] [--steps 3] [--scan both]

load: `models.load_hf` of the GGUF (dequantised to float32, 134.5M params): wall time, RSS before and peak RSS
(VmHWM). step: the config's first training batches (its data, layout and optimizer; policy forward and backward,
π_ref's forward), the first step (compile + run) and the mean of `--steps` more, and the process's peak RSS; with
`--scan both`, once with the 30 blocks stacked in one scan (the default from 8 layers) and once unrolled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` and `benchmarks` as packages when run as a script

from benchmarks.load_hf import rss_mib  # noqa: E402
from benchmarks.step_time import matmul_gflops  # noqa: E402


def measure_load() -> dict:
    """Run in a fresh process: seconds and memory of loading the GGUF into float32 params."""
    import jax

    from dpo_jax import fetch, models

    path = fetch.model_path("smollm2")
    jax.numpy.zeros(1).block_until_ready()  # start the runtime before the baseline
    before = rss_mib("VmRSS")
    started = time.perf_counter()
    _, params, _ = models.load_hf(path)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - started
    return dict(seconds=seconds, rss_before_mib=before, peak_rss_mib=rss_mib("VmHWM"), rss_after_mib=rss_mib("VmRSS"),
                params_mib=sum(x.nbytes for x in jax.tree.leaves(params)) / 2**20,
                num_params=sum(x.size for x in jax.tree.leaves(params)), file_mib=os.path.getsize(path) / 2**20)


def measure_step(variant: str, steps: int, scan_layers: bool) -> dict:
    """Run in a fresh process: first-step and steady DPO step seconds of configs/smollm2.py:`variant`."""
    import jax

    from configs import smollm2
    from dpo_jax import build, data, models, sharding

    config = smollm2.get_config(variant)
    config.model.scan_layers = scan_layers
    mesh = build.make_mesh(config)
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    run_data = build.build_data(config, tokenizer)
    _, params, model_config = models.load_hf(config.model.path, scan_layers=scan_layers)
    graphdef = models.abstract_model(model_config)[0]
    ref_params = build.reference_params(params, config.model.reference_dtype)
    state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, ref_params)
    batches = build.train_batches(config, "dpo", run_data, build.stage_loss(config, "dpo")).iterator()
    started = time.perf_counter()
    state, metrics = train_step(state, ref_params, sharding.global_batch(next(batches), mesh))
    jax.block_until_ready(metrics)
    first = time.perf_counter() - started
    seconds = []
    for _ in range(steps):
        batch = sharding.global_batch(next(batches), mesh)
        started = time.perf_counter()
        state, metrics = train_step(state, ref_params, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - started)
    return dict(scan_layers=scan_layers, first_step_seconds=first, step_seconds=sum(seconds) / len(seconds),
                pairs=config.train.batch_size, max_length=config.data.max_length, peak_rss_mib=rss_mib("VmHWM"))


def child(*args) -> dict:
    """The JSON line a fresh `python benchmarks/real_model.py [options] --child what...` prints (`args`: the
    options, then the list `what`)."""
    *options, what = args
    output = subprocess.run([sys.executable, __file__, *options, "--child", *what], capture_output=True, text=True,
                            check=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="cpu", choices=["cpu", "accelerator"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--scan", default="both", choices=["on", "off", "both"])
    parser.add_argument("--json", help="also write the results (and the matmul peak) to this JSON file")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: load | step SCAN
    args = parser.parse_args()
    if args.child:
        what = args.child[0]
        result = measure_load() if what == "load" else measure_step(args.variant, args.steps, args.child[1] == "on")
        print(json.dumps(result))
        return
    peak = matmul_gflops()
    load = child(["load"])
    print(f"float32 matmul peak of this machine: {peak:.1f} GFLOP/s")
    print(f"load: {load['num_params'] / 1e6:.1f}M params from a {load['file_mib']:.0f} MiB GGUF in {load['seconds']:.1f} s; "
          f"RSS {load['rss_before_mib']:.0f} MiB before, peak {load['peak_rss_mib']:.0f} MiB "
          f"(params {load['params_mib']:.0f} MiB), {load['rss_after_mib']:.0f} MiB after")
    forms = {"on": ["on"], "off": ["off"], "both": ["on", "off"]}[args.scan]
    steps = [child("--variant", args.variant, "--steps", str(args.steps), ["step", form]) for form in forms]
    for step in steps:
        print(f"DPO step, {step['pairs']} pairs × ≤{step['max_length']} tokens, "
              f"{'scanned' if step['scan_layers'] else 'unrolled'} layers: first {step['first_step_seconds']:.1f} s, "
              f"then {step['step_seconds']:.2f} s/step (mean of {args.steps}); peak RSS {step['peak_rss_mib'] / 1024:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_peak_gflops": peak, "load": load, "steps": steps}, f, indent=2)


if __name__ == "__main__":
    main()
