"""Train-step time of a benchmark model on 1 and on N devices (simulated CPU devices here, real ones on a TPU/GPU).

    python benchmarks/step_time.py [--model medium] [--devices 1 8] [--pairs 8] [--length 128] [--steps 3]

Each device count runs in its own process (on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before JAX starts) on a mesh of fsdp = N: a DPO step (policy and reference forward, policy backward, RMSprop) of
`--pairs` pairs × `--length` tokens, timed over `--steps` steps after a compiled warm-up. Beside the times it prints
the machine's measured float32 matmul rate, since CPU peaks vary between sessions: compare ratios within one run.
Simulated devices share the same cores, so N of them measure the sharded program's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {  # Llama-style decoders: the benchmark workloads' models (benchmarks of the speed issue use the same)
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=4, head_dim=64, intermediate_size=704,
                  vocab_size=8192),
    "medium": dict(num_layers=6, hidden_size=512, num_heads=8, num_kv_heads=8, head_dim=64, intermediate_size=1408,
                   vocab_size=32000),
}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The measured float32 matmul rate of one device (GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        a = matmul(a)
    a.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def measure(model: str, pairs: int, length: int, steps: int) -> dict:
    """Seconds per step of the model on all devices of this process (mesh fsdp = all)."""
    import jax
    import numpy as np

    from dpo_jax import build, config as config_lib, data, models, sharding

    config = config_lib.base_config()
    config.mode = "dpo"
    fields = dict(MODELS[model])
    vocab_size = fields.pop("vocab_size")
    config.model.update(fields)
    config.data.max_length = length
    config.train.batch_size = pairs
    mesh = sharding.make_mesh(config.mesh)
    model_config = models.config_from_section(config.model, vocab_size=vocab_size)
    graphdef, abstract = models.abstract_model(model_config)
    shardings = sharding.tree_shardings(abstract, "llama", mesh)
    params = jax.jit(lambda: models.split_params(models.model_from_config(model_config, models.nnx.Rngs(0)))[1],
                     out_shardings=shardings)()
    state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, params)
    rng = np.random.default_rng(0)
    mask = np.zeros((pairs, length), np.float32)
    mask[:, length // 2:] = 1.0  # prompts of half the row, completions of the rest
    rows = {key: data.Rows(tokens_BxT=rng.integers(3, vocab_size, (pairs, length)).astype(np.int32), loss_mask_BxT=mask)
            for key in ("chosen", "rejected")}
    batch = sharding.global_batch(data.PairedBatch(**rows), mesh)
    state, metrics = train_step(state, params, batch)  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, params, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"devices": jax.device_count(), "seconds_per_step": seconds, "params": num_params,
            "matmul_gflops": matmul_gflops()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="medium", choices=sorted(MODELS))
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.pairs, args.length, args.steps)))
        return
    results = []
    for count in args.devices:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
        command = [sys.executable, __file__, "--child", "--model", args.model, "--pairs", str(args.pairs),
                   "--length", str(args.length), "--steps", str(args.steps)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    base = results[0]["seconds_per_step"]
    print(f"{args.model}: {results[0]['params']:,} params, DPO step of {args.pairs} pairs × {args.length} tokens")
    for r in results:
        print(f"  {r['devices']} device(s), mesh fsdp={r['devices']}: {r['seconds_per_step']:.3f} s/step "
              f"({r['seconds_per_step'] / base:.2f}× the first), matmul {r['matmul_gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
