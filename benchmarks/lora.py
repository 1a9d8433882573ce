"""LoRA against full fine-tuning, and QLoRA's log-prob error, measured (docs/lora.md has the figures):

    python benchmarks/lora.py smollm2 [--steps 8]      # SmolLM2-135M-Instruct DPO: full vs LoRA, fresh processes
    python benchmarks/lora.py qlora                    # SmolLM2's sequence log-probs with an int8 / NF4 base
    python benchmarks/lora.py demo                     # the demo: Preferred-FT, then DPO full vs LoRA on it

smollm2: configs/smollm2.py (cpu variant) for `--steps` steps, each run in its own process: peak RSS (VmHWM), the
mean step time after the first (compile) step, the held-out reward accuracy and margin at the end. qlora: the
sequence log-probs of the sample file's chosen and rejected completions under the float32 model and under the
adapted model with its base stored int8 / NF4 (adapters off). demo: configs/demo.py's Preferred-FT stage once
(mode sft), then its DPO stage on it (dpo.reference_workdir) with all weights and with LoRA of each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def train_once(config_name: str, overrides: dict, workdir: str) -> dict:
    """In this (fresh) process: train the config with `overrides`; final eval metrics, step times, peak RSS."""
    from configs import demo, smollm2
    from dpo_jax import run

    config = {"smollm2": smollm2.get_config, "demo": demo.get_config}[config_name]()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    summary = run.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    rates = [r["examples_per_second"] for r in records if "examples_per_second" in r and r["stage"] == "dpo"]
    step_seconds = [config.train.batch_size / rate for rate in rates[1:]] or [float("nan")]
    result = {name: summary["dpo"].get(name) for name in ("rewards/accuracies", "rewards/margins", "loss")}
    if "samples" in summary:
        result.update({f"samples/{who}/{k}": v for who in ("reference", "policy")
                       for k, v in summary["samples"][who].items() if k in ("reward", "kl")})
    result.update(step_seconds=sum(step_seconds) / len(step_seconds), peak_rss_mib=peak_rss_mib(),
                  wall_seconds=summary["wall_time_seconds"])
    return result


def in_fresh_process(config_name: str, overrides: dict, workdir: str) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "_train", config_name, json.dumps(overrides), workdir], cwd=REPO,
        capture_output=True, text=True, check=False)
    if output.returncode:
        raise RuntimeError(output.stderr[-3000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


def smollm2(steps: int) -> None:
    common = {"dpo.num_steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
              "data.num_eval_prompts": 0}
    variants = {
        "full fine-tuning (AdamW 5e-6)": {},
        "LoRA r=16, alpha=32 (AdamW 5e-6)": {"model.lora.enabled": True},
        "LoRA r=16, alpha=32 (AdamW 1e-4)": {"model.lora.enabled": True, "dpo.learning_rate": 1e-4},
    }
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory() as workdir:
            print(name, json.dumps(in_fresh_process("smollm2", {**common, **overrides}, workdir)), flush=True)


def demo() -> None:
    with tempfile.TemporaryDirectory() as root:
        sft = os.path.join(root, "sft")
        in_fresh_process_sft(sft)
        dpo = {"mode": "dpo", "dpo.reference_workdir": sft, "train.progress_bar": False}
        variants = {
            "full fine-tuning (RMSprop 1e-4)": {},
            "LoRA r=4, alpha=8 (RMSprop 1e-3)": {"model.lora.enabled": True, "model.lora.rank": 4,
                                                 "model.lora.alpha": 8.0, "dpo.learning_rate": 1e-3},
            "LoRA r=16, alpha=32 (RMSprop 1e-3)": {"model.lora.enabled": True, "dpo.learning_rate": 1e-3},
            "LoRA r=16, alpha=32 (RMSprop 3e-4)": {"model.lora.enabled": True, "dpo.learning_rate": 3e-4},
            "LoRA r=64, alpha=128 (RMSprop 3e-4)": {"model.lora.enabled": True, "model.lora.rank": 64,
                                                    "model.lora.alpha": 128.0, "dpo.learning_rate": 3e-4},
        }
        for name, overrides in variants.items():
            workdir = os.path.join(root, f"dpo{len(os.listdir(root))}")
            print(name, json.dumps(in_fresh_process("demo", {**dpo, **overrides}, workdir)), flush=True)


def in_fresh_process_sft(workdir: str) -> None:
    """The demo's Preferred-FT stage alone (mode sft), the base every DPO variant starts from."""
    output = subprocess.run([sys.executable, "-m", "dpo_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
                             "--config.mode=sft", "--config.train.progress_bar=False"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    if output.returncode:
        raise RuntimeError(output.stderr[-3000:])


def qlora() -> None:
    """Sequence log-probs of the sample pairs: float32 model vs the same base stored int8 / NF4."""
    import jax
    import numpy as np

    from configs import smollm2
    from dpo_jax import build, data, lora
    from dpo_jax.step import make_pair_logps

    config = smollm2.get_config()
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    run_data = build.build_data(config, tokenizer)
    mesh = build.make_mesh(config)
    graphdef, params, _ = build.build_model(config, tokenizer, mesh)
    batches = [batch for examples in (run_data.train, run_data.eval)
               for batch in data.eval_batches(examples, 8, run_data.buckets, run_data.pad_id, run_data.layout)]

    def logps(g, p):
        pair_logps = jax.jit(make_pair_logps(g, config.train.logprob_chunk_size))
        out = []
        for batch in batches:
            (chosen, rejected), _ = pair_logps(p, batch)
            weight = np.asarray(batch.weight) > 0
            out += [np.asarray(chosen)[weight], np.asarray(rejected)[weight]]
        return np.concatenate(out)

    full = logps(graphdef, params)
    print(f"float32: {len(full)} sequences, mean log-prob {full.mean():.3f}")
    for kind in ("int8", "nf4"):
        settings = lora.LoraSettings(rank=16, alpha=32.0, base_quantization=kind)
        adapted, base, adapters = lora.attach(graphdef, params, settings, 0)
        quantised = logps(adapted, lora.combine(base, lora.adapters_off(adapters)))
        diff = quantised - full
        print(kind, json.dumps({"sequences": len(full), "mean_abs_diff": float(np.abs(diff).mean()),
                                "max_abs_diff": float(np.abs(diff).max()), "mean_diff": float(diff.mean()),
                                "mean_abs_logprob": float(np.abs(full).mean())}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "_train":
        print(json.dumps(train_once(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["smollm2", "qlora", "demo"])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    {"smollm2": lambda: smollm2(args.steps), "qlora": qlora, "demo": demo}[args.what]()
