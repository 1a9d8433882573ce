"""What the experiment reports: the reward-vs-KL frontier (table, CSV, plot), DPO's dominance, and degeneration.

Every point is one evaluation of one method: the mean ground-truth reward and the mean sequence-level KL to π_ref
of its samples of the held-out prefixes (samples/dpo/step_N.jsonl; step 0 is π_ref, the SFT model, itself).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Sequence

import numpy as np

from dpo_jax.metrics_writer import stage_sample_files
from experiments.sentiment.jsonl import read_jsonl
from experiments.sweep.results import write_csv

COLUMNS = ("method", "family", "hyperparameter", "step", "kl", "reward", "reward_se")
FAMILY_COLOURS = {"DPO": "Blues", "Unlikelihood": "Oranges", "Preferred-FT": "Greens", "Unweighted": "Reds"}
MARKERS = ("o", "s", "^", "D", "v", "P")
NUM_SHOWN = 4  # samples per method in degeneration.md


def frontier_table(runs: Sequence[tuple[object, str]]) -> list[dict]:
    """One row per (method, evaluated step) of `runs` ((Method, its run directory) pairs): the COLUMNS, with the
    means of the step's samples."""
    rows = []
    for method, workdir in runs:
        for step, path in stage_sample_files(workdir, "dpo"):
            samples = read_jsonl(path)
            rows.append({"method": method.name, "family": method.family,
                         "hyperparameter": f"{method.hyperparameter}={method.value:g}" if method.hyperparameter else "",
                         "step": step, "kl": float(np.mean([s["kl"] for s in samples])),
                         "reward": float(np.mean([s["reward"] for s in samples])),
                         "reward_se": float(np.std([s["reward"] for s in samples]) / math.sqrt(len(samples)))})
    return rows


def write_table(rows: Sequence[dict], csv_path: str, markdown_path: str) -> None:
    """The frontier as CSV and as a markdown table."""
    write_csv([{k: row[k] for k in COLUMNS} for row in rows], csv_path)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [f"| {r['method']} | {r['family']} | {r['hyperparameter']} | {r['step']} | {r['kl']:.3f} | "
              f"{r['reward']:.3f} | {r['reward_se']:.3f} |" for r in rows]
    with open(markdown_path, "w") as f:
        f.write("\n".join(lines) + "\n")


def mixture_reward(points: Sequence[dict], kl: float) -> float | None:
    """The highest reward that a mixture of two of `points` (policies' mean kl and reward) reaches at KL ≤ `kl`, None
    when every point has more KL. Mixing π_a and π_b with weight w gives the reward (1−w)·r_a + w·r_b at a KL of at
    most (1−w)·KL_a + w·KL_b (KL is convex in π), so DPO's upper hull is a frontier it reaches."""
    best = max((p["reward"] for p in points if p["kl"] <= kl), default=None)
    for a in points:
        for b in points:
            if a["kl"] <= kl < b["kl"]:
                w = (kl - a["kl"]) / (b["kl"] - a["kl"])
                best = max(best, (1 - w) * a["reward"] + w * b["reward"])
    return best


def dominance(rows: Sequence[dict]) -> list[dict]:
    """For each trained point (step > 0) of a non-DPO method: is some DPO point at least as high in reward at no
    more KL (the paper's claim, Fig. 2 left)? Each result names the best such DPO point, or the nearest miss, and
    says whether a mixture of two DPO points (see mixture_reward) reaches its reward at no more KL."""
    dpo = [r for r in rows if r["family"] == "DPO"]
    results = []
    for row in rows:
        if row["family"] == "DPO" or row["step"] == 0:
            continue
        within = [d for d in dpo if d["kl"] <= row["kl"]]
        best = max(within, key=lambda d: d["reward"], default=None)
        dominated = best is not None and best["reward"] >= row["reward"]
        mixture = mixture_reward(dpo, row["kl"])
        results.append({**row, "dominated": dominated,
                        "by": None if best is None else f"{best['method']}@{best['step']}",
                        "dpo_reward_at_no_more_kl": None if best is None else best["reward"],
                        "dpo_mixture_reward": mixture,
                        "dominated_by_mixture": mixture is not None and mixture >= row["reward"]})
    return results


def dominance_summary(results: Sequence[dict]) -> str:
    """Lines saying how many non-DPO points DPO dominates, per method, and which points it does not."""
    by_method = collections.defaultdict(list)
    for r in results:
        by_method[r["method"]].append(r)
    missed = [r for r in results if not r["dominated"]]
    close = [r for r in missed if r["by"] is not None and r["reward"] - r["dpo_reward_at_no_more_kl"] <= r["reward_se"]]
    mixed = sum(r["dominated_by_mixture"] for r in results)
    lines = [f"DPO dominates {len(results) - len(missed)} of {len(results)} trained non-DPO points (a DPO point with "
             f"at least the reward at no more KL); of the {len(missed)} others, {len(close)} miss by less than one "
             f"standard error of their mean reward. A mixture of two DPO policies dominates {mixed} of "
             f"{len(results)}. Per method:"]
    for method, points in by_method.items():
        misses = [f"step {r['step']} (kl {r['kl']:.2f}, reward {r['reward']:.3f} ± {r['reward_se']:.3f}; best DPO "
                  "at no more KL: " + ("none" if r["by"] is None else f"{r['dpo_reward_at_no_more_kl']:.3f}")
                  + ("" if r["dpo_mixture_reward"] is None else f", mixture {r['dpo_mixture_reward']:.3f}") + ")"
                  for r in points if not r["dominated"]]
        lines.append(f"  {method}: {len(points) - len(misses)}/{len(points)}" + (f"; not: {', '.join(misses)}"
                                                                                   if misses else ""))
    return "\n".join(lines)


def plot_frontier(rows: Sequence[dict], path: str, title: str = "", ylabel: str = "reward (p(positive) of samples)",
                  reference_label: str = "SFT (π_ref)") -> None:
    """Reward against KL (log-scaled above 0.1 nats), a colour per method family and a shade and marker per
    hyper-parameter, each method's evaluations joined in step order; DPO's mixture frontier dashed; π_ref (step 0)
    as a black star named `reference_label`."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # not pyplot: no global backend switch (as metrics_writer)

    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    methods = list(dict.fromkeys((r["family"], r["method"]) for r in rows))
    for family in FAMILY_COLOURS:
        members = [m for f, m in methods if f == family]
        colours = colormaps[FAMILY_COLOURS[family]](np.linspace(0.45, 0.95, max(len(members), 1)))
        for k, method in enumerate(members):
            points = sorted((r for r in rows if r["method"] == method and r["step"] > 0), key=lambda r: r["step"])
            label = f"{family} {points[0]['hyperparameter']}".strip() if points else method
            ax.plot([p["kl"] for p in points], [p["reward"] for p in points], "-", color=colours[k], alpha=0.35,
                    linewidth=0.8)
            ax.scatter([p["kl"] for p in points], [p["reward"] for p in points], color=colours[k],
                       marker=MARKERS[k % len(MARKERS)], s=22, label=label, edgecolors="none")
    dpo = [r for r in rows if r["family"] == "DPO"]
    if dpo:  # the frontier DPO reaches by mixing two of its policies (see mixture_reward)
        grid = np.concatenate([[0.0], np.geomspace(1e-3, max(r["kl"] for r in dpo), 300)])
        ax.plot(grid, [mixture_reward(dpo, kl) for kl in grid], "--", color="tab:blue", linewidth=1, alpha=0.6,
                label="DPO frontier (mixtures)")
    reference = [r for r in rows if r["step"] == 0]
    if reference:
        ax.scatter([reference[0]["kl"]], [reference[0]["reward"]], marker="*", s=140, color="black",
                   label=reference_label, zorder=5)
    ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)  # linear below 0.1 nats: the low-KL points spread out
    ax.set_xlabel("KL(π ‖ π_ref) of samples, nats (log scale above 0.1)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Reward vs KL to the reference (IMDb-style sentiment, Fig. 2 left)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def repetition(completions: Sequence[str]) -> tuple[float, float]:
    """(mean fraction of each completion's words that repeat an earlier word of it, distinct-2: distinct word
    bigrams over all bigrams of all completions)."""
    repeated, bigrams = [], []
    for text in completions:
        words = text.split()
        if words:
            repeated.append(1 - len(set(words)) / len(words))
        bigrams += list(zip(words, words[1:]))
    return float(np.mean(repeated)) if repeated else 0.0, len(set(bigrams)) / max(len(bigrams), 1)


def sample_statistics(samples: Sequence[dict], max_new_tokens: int,
                      well_formed: Callable[[str, bool], bool] | None = None) -> dict:
    """Reward, KL, length (tokens, EOS included), the fraction stopped by the token limit, repetition, distinct-2,
    the policy's own perplexity of its samples (exp of −log-prob per token) and, given a grammar check of prompt +
    completion (told whether the limit cut it), the well-formed fraction."""
    repeated, distinct = repetition([s["completion"] for s in samples])
    tokens = sum(s["length"] for s in samples)
    at_limit = [s["length"] >= max_new_tokens for s in samples]
    stats = {"reward": np.mean([s["reward"] for s in samples]), "kl": np.mean([s["kl"] for s in samples]),
             "length": tokens / len(samples), "at_limit": np.mean(at_limit), "repeated": repeated,
             "distinct2": distinct, "perplexity": math.exp(-sum(s["logprob"] for s in samples) / max(tokens, 1))}
    if well_formed is not None:
        stats["well_formed"] = np.mean([well_formed(s["prompt"] + s["completion"], cut)
                                        for s, cut in zip(samples, at_limit)])
    return {k: float(v) for k, v in stats.items()}


def write_degeneration(runs: Sequence[tuple[object, str]], path: str, max_new_tokens: int,
                       well_formed: Callable[[str, bool], bool] | None = None) -> list[dict]:
    """degeneration.md: per method at its last evaluation (and π_ref), the sample statistics and a few samples of
    the same prompts; returns the statistics rows."""
    rows, shown = [], []
    for i, (method, workdir) in enumerate(runs):
        files = stage_sample_files(workdir, "dpo")
        picks = ([("SFT (π_ref)", 0, files[0][1])] if i == 0 else []) + [(method.name, *files[-1])]
        for name, step, sample_path in picks:
            samples = read_jsonl(sample_path)
            rows.append({"method": name, "step": step, **sample_statistics(samples, max_new_tokens, well_formed)})
            shown.append((name, step, samples[:NUM_SHOWN]))
    columns = [c for c in ("reward", "kl", "length", "at_limit", "repeated", "distinct2", "perplexity",
                           "well_formed") if c in rows[0]]
    lines = ["# Degeneration: samples of each method at its last evaluation", "",
             "Temperature 1 samples of the held-out prefixes. `length`: tokens, EOS included; `at_limit`: fraction "
             f"stopped by the {max_new_tokens}-token limit; `repeated`: mean fraction of a completion's words that "
             "repeat an earlier word of it; `distinct2`: distinct word bigrams / all bigrams; `perplexity`: the "
             "policy's own, of its samples (per token, EOS included)"
             + ("; `well_formed`: prompt + completion is whole sentences of the corpus grammar (up to the last "
                "full stop for a sample the limit cut)" if well_formed else "") + ".", "",
             "| method | step | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    lines += [f"| {r['method']} | {r['step']} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |" for r in rows]
    for name, step, samples in shown:
        lines += ["", f"## {name} (step {step})", ""]
        lines += [f"- `{s['prompt'].strip()}` → `{s['completion'].strip()}` (reward {s['reward']:.2f}, kl "
                  f"{s['kl']:.2f})" for s in samples]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return rows
