"""Attention kernels at long context: time and memory of one forward + backward of attention alone, per
implementation and mask, and each kernel's output against XLA's at the shortest length.

    python -m benchmarks.attention [--lengths 2048 8192 32768] [--heads 16 --kv_heads 8 --head_dim 128]

Only jax and numpy (no dpo_jax), so it runs on an accelerator image as is. Cases (bfloat16, batch 1, grouped-query
heads as the families use them):
- `xla, dense mask`: jax.nn.dot_product_attention with a [T, T] boolean mask, implementation 'xla' — what
  layers.attend runs today for every mask (causal, padding, branches, segments, sliding window);
- `xla, is_causal`: the same without a materialised mask;
- `cudnn, dense mask`: the cuDNN fused kernel given the same boolean mask (any of our masks fits this form);
- `cudnn, is_causal`: the cuDNN kernel with its built-in causal mask (plain rows; no branch or segment mask).
Memory is XLA's compiled temporary bytes of the step (`memory_analysis`), time the mean of `--repeats` runs after a
warm-up. A case that cannot compile or run here (no GPU for cuDNN, or out of memory) is reported with its error.
Then, at the shortest length, cuDNN's output given each mask dpo_jax builds (causal, shared-prompt branches, packed
segments, sliding window) against XLA's, or the error where it cannot take one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def causal_mask(length: int) -> jax.Array:
    """bool [1, 1, T, T]: query t sees keys s ≤ t."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


CASES: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "xla, dense mask": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=causal_mask(q.shape[1]), implementation="xla"),
    "xla, is_causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    "cudnn, dense mask": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=causal_mask(q.shape[1]), implementation="cudnn"),
    "cudnn, is_causal": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn"),
}


def dpo_masks(length: int) -> dict[str, jax.Array]:
    """bool [1, 1, T, T] masks of the layouts dpo_jax trains on, as models.layers.attention_mask builds them: causal;
    a shared-prompt row (prompt half the row, then chosen and rejected, each seeing the prompt and itself); a packed
    row (four such pairs, each its own segment); causal within a sliding window of T / 8."""
    t = jnp.arange(length)
    causal = t[:, None] >= t[None, :]
    quarter = length // 4
    branches = jnp.where(t < 2 * quarter, 0, jnp.where(t < 3 * quarter, 1, 2))
    branch = causal & ((branches[None, :] == 0) | (branches[:, None] == branches[None, :]))
    segments, local = t // quarter, t % quarter
    local_branches = jnp.where(local < quarter // 2, 0, jnp.where(local < 3 * quarter // 4, 1, 2))
    packed = causal & (segments[:, None] == segments[None, :]) & (
        (local_branches[None, :] == 0) | (local_branches[:, None] == local_branches[None, :]))
    window = causal & (t[:, None] - t[None, :] < length // 8)
    return {name: m[None, None] for name, m in
            (("causal", causal), ("shared prompt", branch), ("packed", packed), ("sliding window", window))}


def mask_parity(length: int, heads: int, kv_heads: int, head_dim: int) -> list[dict]:
    """For each of dpo_masks, the forward output of cuDNN given the dense mask against XLA's: max |Δ| (bfloat16),
    or the error where the kernel cannot take the mask."""
    q, k, v = inputs(length, heads, kv_heads, head_dim)
    rows = []
    for name, mask in dpo_masks(length).items():
        expected = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        try:
            got = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn"))(
                q, k, v, mask)
            rows.append({"mask": name, "length": length, "max_abs_difference": float(
                jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32)).max())})
        except Exception as error:
            rows.append({"mask": name, "length": length,
                         "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
    return rows


def inputs(length: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """q [1, T, H, K], k and v [1, T, G, K], bfloat16, standard normal."""
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((1, length, heads, head_dim), (1, length, kv_heads, head_dim), (1, length, kv_heads, head_dim))
    return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys, shapes))


def forward_backward(attention: Callable) -> Callable:
    """(q, k, v) -> (output, gradients of Σ output² with respect to q, k and v): one training step's attention."""

    def loss(q, k, v):
        out = attention(q, k, v)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def measure(case: str, length: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> dict:
    """One case at one length: compiled temporary memory, seconds per forward + backward, and the output."""
    q, k, v = inputs(length, heads, kv_heads, head_dim)
    step = forward_backward(CASES[case])
    try:
        compiled = step.lower(q, k, v).compile()
        analysis = compiled.memory_analysis()
        (_, out), grads = compiled(q, k, v)
        jax.block_until_ready(grads)
        started = time.perf_counter()
        for _ in range(repeats):
            (_, out), grads = compiled(q, k, v)
        jax.block_until_ready(grads)
    except Exception as error:  # a kernel this backend lacks, or memory it does not have: reported, not raised
        return {"case": case, "length": length, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    seconds = (time.perf_counter() - started) / repeats
    # Causal attention FLOPs: QKᵀ and PV over half the T × T scores, forward ×1 and backward ×2.
    flops = 3 * 2 * 2 * heads * head_dim * length * length / 2
    return {"case": case, "length": length, "seconds": seconds, "tflops": flops / seconds / 1e12,
            "temp_gib": None if analysis is None else analysis.temp_size_in_bytes / 2**30, "output": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"{device.platform} {device.device_kind}; bfloat16, batch 1, {args.heads} query heads, {args.kv_heads} "
          f"key/value heads of {args.head_dim}\n")
    print("| length | case | ms per forward + backward | TFLOP/s | compiled temporaries | max |Δ| vs xla, dense |")
    print("|---|---|---|---|---|---|")
    rows = []
    for length in args.lengths:
        reference = None
        for case in args.cases:
            row = measure(case, length, args.heads, args.kv_heads, args.head_dim, args.repeats)
            out = row.pop("output", None)
            if case == "xla, dense mask" and out is not None:
                reference = np.asarray(out, np.float32)
            if out is not None and reference is not None:
                row["max_abs_difference"] = float(np.abs(np.asarray(out, np.float32) - reference).max())
            rows.append(row)
            if "error" in row:
                print(f"| {length} | {case} | – | – | – | {row['error']} |", flush=True)
                continue
            temp = "–" if row["temp_gib"] is None else f"{row['temp_gib']:.2f} GiB"
            difference = f"{row['max_abs_difference']:.3g}" if "max_abs_difference" in row else "–"
            print(f"| {length} | {case} | {1e3 * row['seconds']:.2f} | {row['tflops']:.1f} | {temp} | {difference} |",
                  flush=True)
    parity = mask_parity(min(args.lengths), args.heads, args.kv_heads, args.head_dim)
    print(f"\ncuDNN given each of dpo_jax's masks as a dense mask, forward output against XLA's (T = "
          f"{min(args.lengths)}):\n\n| mask | max |Δ| (bfloat16) |\n|---|---|")
    for row in parity:
        print(f"| {row['mask']} | {row.get('error') or format(row['max_abs_difference'], '.3g')} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "rows": rows, "mask_parity": parity},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
