"""Offline DPO against iterative DPO on the embedded demo, at the same number of gradient steps and of labelled pairs
(issue 24; docs/iterative.md has the measured table), and the online shape's throughput.

    python experiments/iterative_demo.py compare --out=/tmp/iterative_demo --seeds=0,1,2 [--eval_temperature=1]
    python experiments/iterative_demo.py online --out=/tmp/iterative_online --rounds=30
    python experiments/iterative_demo.py table /tmp/iterative_demo
    python experiments/iterative_demo.py plot /tmp/iterative_demo --png=docs/images/iterative_demo.png

`compare`, per seed: Preferred-FT once (the demo's 300 steps), then from it (π_ref and the start of both)
- offline: mode dpo on the demo's 2048 labelled pairs for 300 steps, eval every 75 steps;
- iterative: mode iterative_dpo, 4 rounds of 512 prompts × 4 samples (best vs worst: at most 2048 pairs labelled by
  the task reward), 75 steps a round, the optimizer carried, π_ref fixed.
Both score greedy samples of the same 128 eval prompts with the task reward and their KL to the SFT model.
`online`: prompts_per_round = train.batch_size, one step a round; seconds per round by phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))

import demo  # noqa: E402  (configs/demo.py)

from dpo_jax import run  # noqa: E402
from dpo_jax.metrics_writer import read_metrics  # noqa: E402

ROUNDS, STEPS, PROMPTS, SAMPLES = 4, 75, 512, 4
EVAL_TEMPERATURE = [0.0]  # --eval_temperature: 0 (greedy, the demo's) saturates at reward 5; 1 does not


def base(seed: int):
    config = demo.get_config()
    config.seed = seed
    config.eval.temperature = EVAL_TEMPERATURE[0]
    # log_every divides eval_every: an evaluation's metrics are written with the logged step
    config.train.update(progress_bar=False, eval_every=STEPS, checkpoint_every=STEPS, log_every=25)
    return config


def sft(out: str, seed: int) -> str:
    workdir = os.path.join(out, f"seed{seed}", "sft")
    config = base(seed)
    config.mode = "sft"
    config.data.num_eval_prompts = 0
    run.train_and_evaluate(config, workdir)
    return workdir


def offline(out: str, seed: int, sft_dir: str) -> dict:
    workdir = os.path.join(out, f"seed{seed}", "offline")
    config = base(seed)
    config.mode = "dpo"
    config.dpo.update(reference_workdir=sft_dir, num_steps=ROUNDS * STEPS)
    started = time.perf_counter()
    summary = run.train_and_evaluate(config, workdir)
    curve = [(0, summary["dpo_initial"]["samples/kl"], summary["dpo_initial"]["samples/reward"])]
    curve += [(r["step"], r["eval/samples/kl"], r["eval/samples/reward"]) for r in read_metrics(workdir)
              if r["stage"] == "dpo" and "eval/samples/kl" in r]
    return {"seconds": time.perf_counter() - started, "pairs": config.data.num_train_pairs,
            "steps": config.dpo.num_steps, "curve": curve}


def iterative_run(out: str, seed: int, sft_dir: str) -> dict:
    workdir = os.path.join(out, f"seed{seed}", "iterative")
    config = base(seed)
    config.mode = "iterative_dpo"
    config.dpo.reference_workdir = sft_dir
    config.iterative.update(rounds=ROUNDS, prompts_per_round=PROMPTS, samples_per_prompt=SAMPLES,
                            steps_per_round=STEPS)
    started = time.perf_counter()
    summary = run.train_and_evaluate(config, workdir)
    rounds = summary["rounds"]
    return {"seconds": time.perf_counter() - started, "pairs": sum(r.get("pairs/pairs", 0) for r in rounds),
            "ties": sum(r.get("pairs/ties", 0) for r in rounds), "steps": ROUNDS * STEPS,
            "curve": [(int(r["steps"]), r["samples/kl"], r["samples/reward"]) for r in rounds],
            "sample_score": [r.get("score/mean") for r in rounds]}


def compare(out: str, seeds: list[int]) -> None:
    for seed in seeds:
        path = os.path.join(out, f"seed{seed}", "result.json")
        if os.path.exists(path):
            continue
        sft_dir = sft(out, seed)
        result = {"seed": seed, "offline": offline(out, seed, sft_dir), "iterative": iterative_run(out, seed, sft_dir)}
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))


def online(out: str, rounds: int, seed: int = 0) -> None:
    sft_dir = os.path.join(out, "sft")
    if not os.path.exists(os.path.join(sft_dir, "summary.json")):
        config = base(seed)
        config.mode = "sft"
        config.data.num_eval_prompts = 0
        run.train_and_evaluate(config, sft_dir)
    config = base(seed)
    config.mode = "iterative_dpo"
    config.dpo.update(reference_workdir=sft_dir, warmup_steps=0)
    config.train.log_every = 1
    config.iterative.update(rounds=rounds, prompts_per_round=config.train.batch_size, samples_per_prompt=SAMPLES,
                            steps_per_round=1, eval_every=rounds)
    started = time.perf_counter()
    summary = run.train_and_evaluate(config, os.path.join(out, "online"))
    wall = time.perf_counter() - started
    records = summary["rounds"][1:]
    later = records[1:]  # round 1 compiles
    phases = {k: sum(r.get(k, 0.0) for r in later) / len(later)
              for k in ("sampling_seconds", "scoring_seconds", "training_seconds", "seconds")}
    result = {"rounds": rounds, "wall_seconds": wall, "per_round_after_the_first": phases,
              "pairs_per_second": sum(r["pairs/pairs"] for r in later) / sum(r["seconds"] for r in later)}
    with open(os.path.join(out, "online.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def table(out: str) -> None:
    rows = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "result.json")
        if os.path.exists(path):
            rows.append(json.load(open(path)))
    print("| seed | method | pairs labelled | steps | final reward | final KL | reward by step (KL) | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for method in ("offline", "iterative"):
            r = row[method]
            curve = ", ".join(f"{s}: {reward:.2f} ({kl:.2f})" for s, kl, reward in r["curve"])
            print(f"| {row['seed']} | {method} | {int(r['pairs'])} | {r['steps']} | {r['curve'][-1][2]:.3f} | "
                  f"{r['curve'][-1][1]:.3f} | {curve} | {r['seconds'] / 60:.1f} |")


def plot(out: str, path: str) -> None:
    """Reward against KL to the SFT model over training, offline (one line per seed) and iterative, into `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for name in sorted(os.listdir(out)):
        result = os.path.join(out, name, "result.json")
        if not os.path.exists(result):
            continue
        row = json.load(open(result))
        for method, style in (("offline", "s--C0"), ("iterative", "o-C1")):
            _, kl, reward = zip(*row[method]["curve"])
            ax.plot(kl, reward, style, label=method if row["seed"] == 0 else None, alpha=0.8)
    ax.set(xlabel="KL(policy ‖ SFT model) of samples", ylabel="mean reward of samples (T = 1)",
           title="demo: 300 steps, ~2048 labelled pairs each")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=("compare", "online", "table", "plot"))
    parser.add_argument("out", nargs="?")
    parser.add_argument("--out", dest="out_flag")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval_temperature", type=float, default=0.0)
    parser.add_argument("--png", default="docs/images/iterative_demo.png")
    args = parser.parse_args()
    EVAL_TEMPERATURE[0] = args.eval_temperature
    out = args.out_flag or args.out
    os.makedirs(out, exist_ok=True)
    if args.command == "compare":
        compare(out, [int(s) for s in args.seeds.split(",")])
    elif args.command == "online":
        online(out, args.rounds)
    elif args.command == "plot":
        plot(out, args.png)
    else:
        table(out)


if __name__ == "__main__":
    main()
