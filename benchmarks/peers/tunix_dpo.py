"""Tunix's DPO trainer on a compare.py workload file; prints one JSON line. Runs in the peer venv (see
docs/speed.md, "Side by side with TRL and Tunix"): imports only Tunix (and its JAX/Flax/optax) and numpy.

    /tmp/bench_venv/bin/python benchmarks/peers/tunix_dpo.py WORKLOAD.npz [--padding batch|max] [--cost_analysis]

The model is Tunix's own `Llama3` (tunix.models.llama3) with the workload's shape, random init, float32; the
optimizer optax AdamW after a global-norm clip, lr, weight decay and clip from the workload; `DPOTrainer` with β
from the workload and π_ref a second `Llama3` with the same weights. Each batch goes in as Tunix's tokenized
`TrainingInput`: prompts left-padded, completions right-padded, to the batch's longest (`--padding batch`) or to
the workload's longest prompt and completion (`--padding max`, one shape, as Tunix's own string pipeline
pads to max_prompt_length / max_response_length).

Warm-up: one step on every distinct padded shape (Tunix's step compiles per shape). Then two timed passes over
all batches:
- step: what `DPOTrainer.train` does per batch minus its bookkeeping: `_prepare_inputs` (the concatenation,
  attention mask, positions, and π_ref's forward under its own jit: Tunix computes π_ref's log-probs every step)
  and the jitted train step (policy forward and backward, AdamW), dispatched back to back, blocked at the end;
- loop: `DPOTrainer.train` itself over the same batches (adds its metric buffering and per-step host reads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload")
    parser.add_argument("--padding", choices=("batch", "max"), default="batch")
    parser.add_argument("--cost_analysis", action="store_true", help="also report XLA's cost analysis of the steps")
    args = parser.parse_args()
    spec, pairs = workload_file.load(args.workload)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from importlib.metadata import version
    from tunix.models.llama3 import model as llama3
    from tunix.sft.dpo import dpo_trainer

    if spec["dtype"] != "float32":
        raise ValueError(f"tunix_dpo.py runs float32 only, the workload asks {spec['dtype']!r}")
    m = spec["model"]
    config = llama3.ModelConfig(
        num_layers=m["num_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
        hidden_dim=m["intermediate_size"], num_heads=m["num_heads"], head_dim=m["head_dim"],
        num_kv_heads=m["num_kv_heads"], rope_theta=int(m["rope_theta"]), norm_eps=m["rms_norm_eps"],
        weight_tying=False)
    model = llama3.Llama3(config, rngs=nnx.Rngs(0))
    ref_model = llama3.Llama3(config, rngs=nnx.Rngs(0))  # same init: π_ref = the policy's start
    optimizer = optax.chain(optax.clip_by_global_norm(spec["max_grad_norm"]),
                            optax.adamw(spec["learning_rate"], weight_decay=spec["weight_decay"]))
    trainer = dpo_trainer.DPOTrainer(
        model=model, ref_model=ref_model, optimizer=optimizer,
        training_config=dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, beta=spec["beta"],
                                                      pbar_description=None))

    batches = workload_file.batches(spec, pairs)
    longest = (max(len(p["prompt"]) for p in pairs), max(max(len(p["chosen"]), len(p["rejected"])) for p in pairs))

    def training_input(batch):
        if args.padding == "batch":
            P = max(len(p["prompt"]) for p in batch)
            C = max(max(len(p["chosen"]), len(p["rejected"])) for p in batch)
        else:
            P, C = longest
        prompt = np.zeros((len(batch), P), np.int32)
        chosen, rejected = np.zeros((len(batch), C), np.int32), np.zeros((len(batch), C), np.int32)
        masks = [np.zeros_like(prompt), np.zeros_like(chosen), np.zeros_like(rejected)]
        for i, p in enumerate(batch):
            n = len(p["prompt"])
            prompt[i, P - n:], masks[0][i, P - n:] = p["prompt"], 1
            for ids, mask, key in ((chosen, masks[1], "chosen"), (rejected, masks[2], "rejected")):
                ids[i, :len(p[key])], mask[i, :len(p[key])] = p[key], 1
        return dpo_trainer.TrainingInput(
            prompt_ids=jnp.asarray(prompt), prompt_mask=jnp.asarray(masks[0]), chosen_ids=jnp.asarray(chosen),
            chosen_mask=jnp.asarray(masks[1]), rejected_ids=jnp.asarray(rejected),
            rejected_mask=jnp.asarray(masks[2]))

    inputs = [training_input(b) for b in batches]
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)

    def step(example):
        example = trainer._prepare_inputs(example)
        return train_step(example)

    started = time.perf_counter()
    seen = {}
    for example in inputs:
        key = (example.prompt_ids.shape, example.chosen_ids.shape)
        if key not in seen:
            seen[key] = True
            jax.block_until_ready(step(example))
    warmup_seconds = time.perf_counter() - started

    started = time.perf_counter()
    for example in inputs:
        out = step(example)
    jax.block_until_ready(out)
    step_seconds = (time.perf_counter() - started) / len(inputs)

    trainer.is_managed_externally = True  # keeps train() from closing the trainer or skipping batches
    started = time.perf_counter()
    trainer.train(inputs)
    jax.block_until_ready(nnx.state(model))
    loop_seconds = (time.perf_counter() - started) / len(inputs)

    shapes = []  # per batch: rows, row length, LM-head positions per row (Tunix's model computes every position)
    for example in inputs:
        length = example.prompt_ids.shape[1] + example.chosen_ids.shape[1]
        shapes.append([2 * example.prompt_ids.shape[0], length, length])
    result = {
        "framework": f"tunix {version('google-tunix')}", "seconds_per_step": step_seconds,
        "loop_seconds_per_step": loop_seconds, "warmup_seconds": warmup_seconds, "shapes_compiled": len(seen),
        "timed_steps": len(inputs), "padded_shapes": shapes, "padding": args.padding,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "jax": jax.__version__, "devices": str(jax.devices()),
    }
    if args.cost_analysis:
        example = trainer._prepare_inputs(inputs[0])
        jitted = nnx.jit(trainer._train_step, donate_argnames=("optimizer",))
        train_cost = jitted.lower(model, trainer.optimizer, example).compile().cost_analysis()
        ref_cost = dpo_trainer.compute_logps.lower(
            ref_model, example.input_ids, example.positions, example.attention_mask, example.logits_to_keep,
            example.completion_mask).compile().cost_analysis()
        pick = lambda c: {k: float(c[k]) for k in ("flops", "bytes accessed") if k in c}  # noqa: E731
        result["cost_analysis"] = {"train_step": pick(train_cost), "reference_forward": pick(ref_cost)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
