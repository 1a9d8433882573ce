"""The controlled-sentiment experiment on a real language model, stage by stage (issue 20, item 5).

π_ref is SmolLM2-135M-Instruct itself (its GGUF, `model.path`), asked through its chat template to continue a
movie-review opening (prompts.py); the reward is VADER's compound score of the continuation (reward.py).

Layout of the workdir: `pairs/` (every π_ref sample with its reward, the best-vs-worst pairs in the file source's
chat form, pairs_report.json), `methods/<name>/` (one mode=dpo run per method, started from the model itself, which
is also π_ref), and the report beside them (report.py). The stages are those of experiments/sentiment without its
SFT (the instruct model needs none to write reviews) and reuse its code: its sampler, method configs, post-hoc KL
and frontier report. A run whose summary.json holds the same config is finished and not run again; any other
resumes from its checkpoints (the sweep's rule, experiments/sweep/execution.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import ml_collections
import numpy as np

from configs import smollm2
from dpo_jax import config as config_lib
from dpo_jax import fetch, rewards
from experiments.real_sentiment import prompts, report
from experiments.real_sentiment import reward as vader
from experiments.sentiment import pipeline as sentiment_pipeline
from experiments.sentiment.jsonl import write_jsonl
from experiments.sentiment.pipeline import Method

SAMPLES_PER_PROMPT = 4
SAMPLING_STREAMS = {"train": 0, "eval": 1}
STAND_IN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tests", "fixtures", "hf", "llama")  # --quick: a random 2-layer Llama with a tiny tokenizer


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big a run is: prompts, sample length, and each method's steps."""

    train_prompts: int
    eval_prompts: int  # held-out prompts, sampled at each evaluation and judged for the win rate
    max_new_tokens: int
    method_steps: int
    eval_every: int
    batch_size: int  # pairs a step
    learning_rate: float  # AdamW, every method
    warmup_steps: int
    max_prompt_length: int = 80  # SmolLM2's chat prompts are 54–72 tokens (its default system turn included)
    model_path: str = ""  # "": the fetched SmolLM2-135M-Instruct GGUF (python -m dpo_jax.fetch smollm2)


# Sized for the project's 2-core CPU shared with other jobs (docs/real_sentiment.md gives the measured times).
FULL = Scale(train_prompts=128, eval_prompts=64, max_new_tokens=48, method_steps=24, eval_every=12, batch_size=4,
             learning_rate=2e-5, warmup_steps=2)
QUICK = Scale(train_prompts=24, eval_prompts=24, max_new_tokens=16, method_steps=2, eval_every=1, batch_size=4,
              learning_rate=1e-3, warmup_steps=0, max_prompt_length=160, model_path=STAND_IN)  # 90–147 tokens


def methods(scale: Scale) -> tuple[Method, ...]:
    """DPO at β 0.1 and 0.5, and the paper's Preferred-FT baseline (NLL of the chosen, best-reward samples)."""
    return (*(Method("DPO", "dpo", "beta", beta, scale.learning_rate) for beta in (0.1, 0.5)),
            Method("Preferred-FT", "sft", learning_rate=scale.learning_rate))


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes inside the workdir (the attribute names experiments/sentiment's
    method_config reads: `sft` is π_ref's run, none here, so the method runs take model.path itself)."""

    workdir: str
    sft: str = ""

    @property
    def pairs(self) -> str:
        """The sampling stage's directory."""
        return os.path.join(self.workdir, "pairs")

    @property
    def pairs_train(self) -> str:
        """Training pairs, best vs worst of each training prompt's samples."""
        return os.path.join(self.pairs, "pairs_train.jsonl")

    @property
    def pairs_eval(self) -> str:
        """Held-out pairs; their prompts are the ones sampled at each evaluation."""
        return os.path.join(self.pairs, "pairs_eval.jsonl")

    @property
    def pairs_report(self) -> str:
        """The sampling stage's counts (ties dropped) and reward statistics; written last: it marks the stage done."""
        return os.path.join(self.pairs, "pairs_report.json")

    def samples(self, split: str) -> str:
        """Every π_ref sample of `split`'s prompts with its reward."""
        return os.path.join(self.pairs, f"samples_{split}.jsonl")

    def method(self, method: Method) -> str:
        """The run directory of `method`."""
        return os.path.join(self.workdir, "methods", method.name)


def base_config(scale: Scale, paths: Paths, seed: int = 0,
                eval_prompts: int | None = None) -> ml_collections.ConfigDict:
    """configs/smollm2.py's CPU settings (AdamW, float32, the model's own tokenizer and chat template) on the
    experiment's pair files: temperature-1 samples of `scale.max_new_tokens` tokens, scored by VADER, of
    `eval_prompts` held-out prompts (default scale.eval_prompts; fewer once tied ones are dropped), in one batch."""
    eval_prompts = eval_prompts or scale.eval_prompts
    config = smollm2.get_config("cpu")
    config.seed = seed
    config.model.path = scale.model_path or fetch.model_path("smollm2")
    max_length = scale.max_prompt_length + scale.max_new_tokens + 1  # a sample of max_new_tokens, then EOS
    config.data.update(path=paths.pairs_train, eval_path=paths.pairs_eval,
                       num_eval_prompts=eval_prompts, max_prompt_length=scale.max_prompt_length,
                       max_length=max_length, length_buckets=())
    # logits chunks of 64 positions: the KL of 64 samples holds [64, 64, vocab] float32 per model (0.8 GB here)
    config.train.update(batch_size=scale.batch_size, eval_batch_size=eval_prompts, logprob_chunk_size=64,
                        progress_bar=False)
    config.eval.update(max_new_tokens=scale.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, reward=vader.SPEC)
    return config


def method_config(base: ml_collections.ConfigDict, method: Method, paths: Paths,
                  scale: Scale) -> ml_collections.ConfigDict:
    """experiments/sentiment's method run (loss, steps, evaluations, checkpoints kept for the post-hoc KL) from the
    model itself, with one padded row length: [prompt | chosen | rejected] at their longest (one compile)."""
    config = sentiment_pipeline.method_config(base, method, paths, scale.method_steps, scale.eval_every,
                                              scale.warmup_steps)
    row = scale.max_prompt_length + 2 * (scale.max_new_tokens + 1)
    config.data.length_buckets = (-(-row // 8) * 8,)
    return config


def validate_early(config: ml_collections.ConfigDict) -> None:
    """config_lib.validate of a method's config before its pair files exist (configs/smollm2.py's sample file
    stands in for them)."""
    early = ml_collections.ConfigDict(config.to_dict())
    early.data.update(path=smollm2.SAMPLE_PREFERENCES, eval_path="")
    config_lib.validate(early)


def best_and_worst(opening: str, completions: list[str], scores: np.ndarray) -> dict | None:
    """The chat-form pair of the highest- against the lowest-reward completion (first of equals); None for a tie
    (every sample scored the same, often all 0: no lexicon word)."""
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] == scores[worst]:
        return None
    return {"prompt": prompts.chat_prompt(opening), "chosen": completions[best], "rejected": completions[worst],
            "opening": opening, "chosen_reward": float(scores[best]), "rejected_reward": float(scores[worst])}


def write_pairs(config: ml_collections.ConfigDict, paths: Paths, openings: dict[str, list[str]]) -> dict | None:
    """Sample π_ref SAMPLES_PER_PROMPT times per opening at temperature 1, score every sample, and write each split's
    best-vs-worst pairs (ties dropped and counted) and pairs_report.json; None when written before."""
    if os.path.exists(paths.pairs_report):
        return None
    reward = rewards.make_reward(config.eval.reward, config.data.source)
    summary = {}
    for split in ("train", "eval"):
        started = time.perf_counter()
        seed = int(np.random.SeedSequence([config.seed, SAMPLING_STREAMS[split]]).generate_state(1)[0])
        completions = sentiment_pipeline.sample_completions(
            config, paths.sft, [prompts.chat_prompt(o) for o in openings[split]], SAMPLES_PER_PROMPT, seed)
        flat = [text for texts in completions for text in texts]
        scores = reward([""] * len(flat), flat).reshape(len(completions), SAMPLES_PER_PROMPT)  # the continuation
        write_jsonl(paths.samples(split), [{"opening": o, "completions": texts, "rewards": s.tolist()}
                                           for o, texts, s in zip(openings[split], completions, scores)])
        pairs = [best_and_worst(o, texts, s) for o, texts, s in zip(openings[split], completions, scores)]
        kept = [p for p in pairs if p is not None]
        write_jsonl(paths.pairs_train if split == "train" else paths.pairs_eval, kept)
        summary[split] = {
            "prompts": len(pairs), "pairs": len(kept), "ties_dropped": len(pairs) - len(kept),
            "samples": len(flat), "reward_mean": float(scores.mean()),
            "reward_spread_mean": float((scores.max(axis=1) - scores.min(axis=1)).mean()),
            "chosen_reward_mean": float(np.mean([p["chosen_reward"] for p in kept])) if kept else float("nan"),
            "rejected_reward_mean": float(np.mean([p["rejected_reward"] for p in kept])) if kept else float("nan"),
            "zero_reward_fraction": float((scores == 0).mean()), "seconds": time.perf_counter() - started}
        print(f"pairs {split}: {len(kept)} of {len(pairs)} prompts ({len(pairs) - len(kept)} ties dropped), "
              f"{summary[split]['seconds']:.0f} s", flush=True)
    if not summary["eval"]["pairs"]:
        raise ValueError(f"every held-out prompt's samples tied: no evaluation prompts (see {paths.pairs})")
    with open(paths.pairs_report, "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def run_experiment(workdir: str, scale: Scale = FULL, seed: int = 0) -> dict:
    """Every stage in `workdir`, reusing the finished ones, then the report; returns experiment.json's contents."""
    paths, started = Paths(workdir), time.perf_counter()
    timings = sentiment_pipeline.recorded_timings(workdir)  # a skipped stage keeps the seconds of the call that ran it
    base = base_config(scale, paths, seed)
    for method in methods(scale):  # a bad setting stops the run now, not after the sampling stage
        validate_early(method_config(base, method, paths, scale))
    began = time.perf_counter()
    if write_pairs(base, paths, prompts.openings(scale.train_prompts, scale.eval_prompts, seed)) is not None:
        timings["samples_and_pairs"] = time.perf_counter() - began
    with open(paths.pairs_report) as f:
        pairs_report = json.load(f)
    base = base_config(scale, paths, seed, eval_prompts=pairs_report["eval"]["pairs"])
    runs = sentiment_pipeline.train_methods([(m, method_config(base, m, paths, scale)) for m in methods(scale)],
                                            paths, timings)
    result = report.write_report(workdir, runs, base.eval.reward, scale.max_new_tokens)
    timings["total_this_call"] = time.perf_counter() - started
    result = {"scale": dataclasses.asdict(scale), "model_path": base.model.path, "pairs": pairs_report,
              "timings_seconds": timings, **result}
    with open(os.path.join(workdir, "experiment.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
