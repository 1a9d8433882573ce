"""Compile time of the first DPO step with the decoder's blocks unrolled vs stacked in one scan (`model.scan_layers`).

    python benchmarks/compile_time.py [--layers 24] [--forms unrolled scanned] [--remat none] [--pairs 8] [--length 128]

The step is the training one (policy and π_ref forwards, policy backward, RMSprop update) that `build.stage_steps`
makes for a Llama-style decoder of `--layers` layers and small widths (compile time depends on the program's size,
not its widths). It is lowered (traced to StableHLO) and compiled for abstract inputs, so nothing is allocated or
run; each form is measured in a fresh process, so no cache of one helps the other. Prints the seconds of each part
and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

WIDTHS = dict(hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=704)
VOCAB_SIZE = 8192


def measure(num_layers: int, scan_layers: bool, remat: str, pairs: int, length: int) -> dict:
    """Seconds to lower and to compile the DPO train step of one form, on this process's first device."""
    import jax
    import numpy as np

    from dpo_jax import build, config as config_lib, data, models, sharding

    config = config_lib.base_config()
    config.mode = "dpo"
    config.model.update(WIDTHS, num_layers=num_layers, remat=remat, scan_layers=scan_layers)
    config.data.max_length = length
    config.train.batch_size = pairs
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model_config = models.config_from_section(config.model, vocab_size=VOCAB_SIZE)
    graphdef, abstract_params = models.abstract_model(model_config)
    create_state, _, train_step, _ = build.stage_steps(
        config, "dpo", graphdef, "llama", mesh, abstract_params, abstract_params)
    abstract_state = jax.eval_shape(create_state, abstract_params)
    tokens = jax.ShapeDtypeStruct((pairs, length), np.int32)
    mask = jax.ShapeDtypeStruct((pairs, length), np.float32)
    batch = data.PairedBatch(chosen=data.Rows(tokens_BxT=tokens, loss_mask_BxT=mask),
                             rejected=data.Rows(tokens_BxT=tokens, loss_mask_BxT=mask))
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, abstract_params, batch)
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    return {
        "form": "scanned" if scan_layers else "unrolled", "layers": num_layers, "remat": remat,
        "lower_seconds": lowered_at - start, "compile_seconds": compiled_at - lowered_at,
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[24])
    parser.add_argument("--forms", nargs="+", default=["unrolled", "scanned"], choices=["unrolled", "scanned"])
    parser.add_argument("--remat", default="none", choices=["none", "block", "full"])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--child", nargs=2, metavar=("LAYERS", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        layers, form = args.child
        print(json.dumps(measure(int(layers), form == "scanned", args.remat, args.pairs, args.length)))
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}")
    print(f"DPO train step of {args.pairs} pairs × {args.length} tokens, remat {args.remat}, widths {WIDTHS}")
    for layers in args.layers:
        for form in args.forms:
            command = [sys.executable, __file__, "--child", str(layers), form, "--remat", args.remat,
                       "--pairs", str(args.pairs), "--length", str(args.length)]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"{layers} layers {form} failed:\n{child.stderr[-3000:]}")
            r = json.loads(child.stdout.strip().splitlines()[-1])
            total = r["lower_seconds"] + r["compile_seconds"]
            print(f"  {layers} layers {form:>8}: lower {r['lower_seconds']:6.2f} s + compile "
                  f"{r['compile_seconds']:6.2f} s = {total:6.2f} s  ({r['params']:,} params, {r['device']}, "
                  f"jax {r['jax']})")


if __name__ == "__main__":
    main()
