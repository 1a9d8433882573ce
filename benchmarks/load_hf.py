"""Load time and peak host memory of `models.load_hf` on a random ~1B-parameter Llama checkpoint written to disk.

    python benchmarks/load_hf.py [--dir /tmp/llama_1b] [--layers 16] [--forms unrolled stacked]

Writes (once) a checkpoint with Llama-3.2-1B's shapes (1.24B params, tied embeddings, Llama-3 rope scaling) in
bfloat16, as published, with `models.save_hf`; then loads it in fresh processes, in bfloat16 and in float32, with the
blocks unrolled and stacked (`scan_layers`, each layer's tensors converted into its slice of one array), and
reports wall time and peak RSS (VmHWM) beside the RSS the process had before loading and the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
    intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True, rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


def rss_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def write_checkpoint(directory: str, num_layers: int) -> None:
    """Random N(0, 0.02²) weights, filled leaf by leaf, saved in bfloat16."""
    import jax
    import numpy as np

    from dpo_jax import models

    config = models.make_config("llama", **{**LLAMA_1B, "num_layers": num_layers})
    _, abstract = models.abstract_model(config)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape, dtype=np.float32)), abstract)
    started = time.perf_counter()
    models.save_hf(params, config, directory, dtype="bfloat16")
    print(f"wrote {directory} in {time.perf_counter() - started:.1f} s")


def measure_load(directory: str, dtype: str, scan_layers: bool) -> dict:
    """Run in a fresh process: RSS before, load time, peak RSS, bytes of the loaded params."""
    import jax

    from dpo_jax import models

    jax.numpy.zeros(1).block_until_ready()  # start the runtime before the baseline
    before = rss_mib("VmRSS")
    started = time.perf_counter()
    _, params, _ = models.load_hf(directory, dtype=dtype, scan_layers=scan_layers)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - started
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return dict(dtype=dtype, form="stacked" if scan_layers else "unrolled", seconds=seconds, rss_before_mib=before, peak_rss_mib=rss_mib("VmHWM"),
                rss_after_mib=rss_mib("VmRSS"), params_mib=param_bytes / 2**20,
                num_params=sum(x.size for x in jax.tree.leaves(params)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/dpo_jax_llama_1b")
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_layers"])
    parser.add_argument("--forms", nargs="+", default=["unrolled", "stacked"], choices=["unrolled", "stacked"])
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: the child's dtype and form
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_load(args.dir, args.measure[0], args.measure[1] == "stacked")))
        return
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        subprocess.run([sys.executable, "-c", f"import benchmarks.load_hf as b; b.write_checkpoint({args.dir!r}, {args.layers})"],
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    size_mib = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.endswith(".safetensors")) / 2**20
    print(f"checkpoint: {size_mib:.0f} MiB of safetensors (bfloat16) in {args.dir}")
    print(f"{'load as':19s}{'params':>10s}{'seconds':>9s}{'RSS before':>12s}{'peak RSS':>10s}{'peak - before':>15s}"
          f"{'vs file':>9s}")
    for form in args.forms:
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--measure", dtype, form],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            growth = r["peak_rss_mib"] - r["rss_before_mib"]
            print(f"{dtype + ', ' + form:19s}{r['num_params'] / 1e9:>9.2f}B{r['seconds']:>9.1f}"
                  f"{r['rss_before_mib']:>11.0f}M{r['peak_rss_mib']:>9.0f}M{growth:>14.0f}M{growth / size_mib:>8.2f}x"
                  f"   (params {r['params_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
