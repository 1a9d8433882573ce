"""The controlled-sentiment experiment's stages, each a run of the trainer: SFT, samples and pairs, then each method.

Layout of the workdir: `corpus/` (tokenizer, SFT and pair files), `sft/` (the SFT run, π_ref of every method),
`methods/<name>/` (one DPO-stage run per method, from the SFT params), and the report beside them. A run whose
summary.json holds the same config is finished and not run again; any other resumes from its checkpoints (the
sweep's rule, experiments/sweep/execution.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import jax
import ml_collections
import numpy as np

from dpo_jax import build, checkpoint, data, losses, rewards
from dpo_jax.config import base_config
from dpo_jax.sampling import SamplingSettings, sample
from experiments.sentiment import corpus, pairs, posthoc_kl, report
from experiments.sentiment.jsonl import write_jsonl
from experiments.sweep.execution import train_one

CORPUS_REWARD = "python:experiments.sentiment.corpus:score"
SAMPLES_PER_PROMPT = 4  # the paper's: 6 pairs per training prefix (of which the held-out prefixes keep one)
SAMPLING_STREAMS = {"train": 0, "eval": 1}
MAX_LENGTH = corpus.MAX_WORDS + 8  # tokens of prompt + completion: at most corpus.MAX_WORDS words, then EOS


@dataclasses.dataclass(frozen=True)
class Method:
    """One trained policy of the frontier: a family (the plot's colour), its loss and hyper-parameter, and the
    learning rate it trains with at CPU scale (None: the config's dpo.learning_rate)."""

    family: str
    loss: str
    hyperparameter: str = ""  # the loss key it sets ("beta", "alpha"), or none
    value: float = 0.0
    learning_rate: float | None = None

    @property
    def name(self) -> str:
        """Directory name: family and hyper-parameter, e.g. 'dpo_beta0.1'."""
        suffix = f"_{self.hyperparameter}{self.value:g}" if self.hyperparameter else ""
        return self.family.lower().replace("-", "_") + suffix


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the built-in experiment is: corpus, model, steps and evaluation."""

    sft_reviews: int
    sft_steps: int
    train_prefixes: int
    eval_prefixes: int  # held-out prefixes sampled at each evaluation
    method_steps: int
    eval_every: int
    model: tuple  # (key, value) pairs of config.model
    sft_learning_rate: float = 1e-3
    sft_warmup_steps: int = 20
    warmup_steps: int = 150  # of each method: the paper's (RMSprop's first steps are ~10x lr without it)
    methods: tuple[str, ...] = ()  # names of the METHODS to train (): all of them


MODEL = (("hidden_size", 64), ("num_layers", 2), ("num_heads", 4), ("num_kv_heads", 2), ("head_dim", 16),
         ("intermediate_size", 128), ("tie_embeddings", True))
FULL = Scale(sft_reviews=20_000, sft_steps=600, train_prefixes=2_000, eval_prefixes=512, method_steps=600,
             eval_every=100, model=MODEL)
# Each method's run compiles its own train step (its loss constants differ): ~10 s a method on a busy 2-core
# machine, so --quick trains one point of each family, and DPO at two β.
QUICK = Scale(sft_reviews=2_000, sft_steps=80, train_prefixes=64, eval_prefixes=16, method_steps=4,
              eval_every=2, model=(*MODEL, ("num_layers", 1)), warmup_steps=2,
              methods=("dpo_beta0.1", "dpo_beta5", "unweighted_beta0.1", "unlikelihood_alpha0.1", "preferred_ft"))

# Learning rates: chosen by the runs reported in docs/paper.md.
METHODS: tuple[Method, ...] = (
    *(Method("DPO", "dpo", "beta", beta, 3e-4) for beta in (0.05, 0.1, 1.0, 5.0)),
    Method("Unweighted", "unweighted", "beta", 0.1, 3e-4),
    *(Method("Unlikelihood", "unlikelihood", "alpha", alpha, 3e-4) for alpha in (0.05, 0.1, 0.5, 1.0)),
    Method("Preferred-FT", "sft", learning_rate=3e-4),
)


def config_methods() -> tuple[Method, ...]:
    """METHODS as a --config runs them: each at the config's dpo.learning_rate (the CPU rates fit our tiny model only)."""
    return tuple(dataclasses.replace(m, learning_rate=None) for m in METHODS)


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes inside the workdir."""

    workdir: str

    def __getattr__(self, name: str) -> str:
        files = {"corpus": "corpus", "tokenizer": "corpus/tokenizer", "sft_train": "corpus/sft_train.jsonl",
                 "sft_eval": "corpus/sft_eval.jsonl", "pairs_train": "corpus/pairs_train.jsonl",
                 "pairs_eval": "corpus/pairs_eval.jsonl", "sft": "sft", "methods": "methods"}
        if name not in files:
            raise AttributeError(name)
        return os.path.join(self.workdir, files[name])

    def method(self, method: Method) -> str:
        """The run directory of `method`."""
        return os.path.join(self.methods, method.name)


def builtin_sft_config(scale: Scale, paths: Paths, seed: int = 0) -> ml_collections.ConfigDict:
    """SFT of the small decoder on the built-in corpus (prefix → rest of the review), sampled at temperature 1."""
    config = base_config()
    config.mode, config.seed = "sft", seed
    config.model.update(dict(scale.model))
    config.data.update(
        source="file", path=paths.sft_train, eval_path=paths.sft_eval, tokenizer="hf:" + paths.tokenizer,
        num_train_pairs=0, num_eval_pairs=0, num_eval_prompts=scale.eval_prefixes, num_threads=2,
        max_prompt_length=corpus.MAX_PREFIX, max_length=MAX_LENGTH, truncation_mode="keep_start",
        length_buckets=(MAX_LENGTH,),  # one padded shape: each further one costs a compile of the step (~10 s)
    )
    config.sft.update(num_steps=scale.sft_steps, learning_rate=scale.sft_learning_rate,
                      warmup_steps=scale.sft_warmup_steps)
    config.train.update(eval_batch_size=min(128, scale.eval_prefixes // 2), eval_every=scale.sft_steps,
                        checkpoint_every=scale.sft_steps, log_every=min(50, scale.sft_steps), progress_bar=False)
    # A completion is at most MAX_WORDS − MIN_PREFIX words, then EOS.
    config.eval.update(max_new_tokens=corpus.MAX_WORDS - corpus.MIN_PREFIX + 1, temperature=1.0, reward=CORPUS_REWARD)
    return config


def method_config(sft_config: ml_collections.ConfigDict, method: Method, paths: Paths, num_steps: int,
                  eval_every: int, warmup_steps: int) -> ml_collections.ConfigDict:
    """The DPO-stage run of `method`: the SFT model as policy start and π_ref, the sampled pairs, an evaluation of
    samples' reward and KL every `eval_every` steps (a checkpoint at each, all kept for a loss without π_ref: see
    posthoc_kl)."""
    config = ml_collections.ConfigDict(sft_config.to_dict())
    config.mode = "dpo"
    config.dpo.update(reference_workdir=paths.sft, num_steps=num_steps, warmup_steps=warmup_steps,
                      learning_rate=method.learning_rate or sft_config.dpo.learning_rate)
    config.data.update(source="file", path=paths.pairs_train, eval_path=paths.pairs_eval, num_train_pairs=0,
                       num_eval_pairs=0)
    if sft_config.data.length_buckets:  # a row holds the prompt and both completions
        config.data.length_buckets = (2 * config.data.max_length,)
    config.loss.name = method.loss
    if method.hyperparameter:
        config.loss[method.hyperparameter] = method.value
    config.train.update(eval_every=eval_every, checkpoint_every=eval_every,
                        log_every=min(config.train.log_every, eval_every))
    if not losses.uses_reference(method.loss, build.loss_params(config)):  # posthoc_kl reads every evaluated step
        config.train.keep_checkpoints = num_steps // eval_every + 1
    return config


def write_builtin_corpus(scale: Scale, paths: Paths, seed: int = 0) -> None:
    """The tokenizer and SFT files of the built-in corpus (deterministic; rewritten only when absent)."""
    if not os.path.exists(os.path.join(paths.tokenizer, "tokenizer.json")):
        corpus.save_tokenizer(paths.tokenizer)
    if not os.path.exists(paths.sft_eval):
        records = corpus.sft_records(scale.sft_reviews + 512, seed)
        write_jsonl(paths.sft_train, records[512:])
        write_jsonl(paths.sft_eval, records[:512])


def sample_completions(config: ml_collections.ConfigDict, sft_workdir: str, prompts: Sequence[str | list], num: int,
                       seed: int) -> list[list[str]]:
    """`num` completions of each prompt (a string or chat messages) at config.eval's settings at temperature 1, from
    the SFT model at `sft_workdir`, or with `sft_workdir` "" from config.model's own checkpoint (a pretrained π_ref)."""
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    mesh = build.make_mesh(config)
    graphdef, params, _ = build.build_model(config, tokenizer, mesh)
    if sft_workdir:
        params = checkpoint.load_final_params(sft_workdir, "sft", checkpoint.abstract(params))
    tokens_NxP, lengths_N = data.encode_prompts(prompts, tokenizer, max_prompt_length=config.data.max_prompt_length,
                                                truncation_mode=config.data.truncation_mode)
    rows = np.repeat(np.arange(len(prompts)), num)  # row i·num + k: sample k of prompt i
    samples = sample(graphdef, params, tokens_NxP[rows], lengths_N[rows], tokenizer=tokenizer,
                     settings=SamplingSettings.from_config(config.eval, temperature=1.0), rng=jax.random.key(seed),
                     batch_size=config.train.eval_batch_size, mesh=mesh)  # the evaluations' shapes: one compile
    return [samples.texts[i * num:(i + 1) * num] for i in range(len(prompts))]


def write_pairs(config: ml_collections.ConfigDict, paths: Paths, prompts: dict[str, Sequence[str]],
                reward_spec: str) -> bool:
    """Sample the SFT model on each split's prefixes and write its Bradley–Terry pairs; False when written before."""
    if os.path.exists(paths.pairs_eval):
        return False
    reward = rewards.make_reward(reward_spec, config.data.source)
    for split in ("train", "eval"):
        seed = int(np.random.SeedSequence([config.seed, SAMPLING_STREAMS[split]]).generate_state(1)[0])
        completions = sample_completions(config, paths.sft, prompts[split], SAMPLES_PER_PROMPT, seed)
        flat_prompts = [p for p, texts in zip(prompts[split], completions) for _ in texts]
        flat_logits = pairs.logits_of(reward(flat_prompts, [t for texts in completions for t in texts]))
        logits = flat_logits.reshape(len(completions), -1)
        records = pairs.preference_records(prompts[split], completions, logits, seed)
        if split == "eval":
            records = pairs.one_per_prompt(records)
        write_jsonl(getattr(paths, f"pairs_{split}"), records)
    return True


def source_prompts(config: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """Training and held-out prompts of the config's own data source (for IMDb: 2–8-word prefixes of the train and
    test reviews; as many as data.num_train_pairs (0: all) and data.num_eval_prompts)."""
    where = dict(seed=config.seed, path=config.data.path, eval_path=config.data.eval_path,
                 eval_fraction=config.data.eval_fraction, tfds_data_dir=config.data.tfds_data_dir,
                 download=config.data.download, raw_dir=config.data.raw_dir)
    prompts = {}
    for split, limit in (("train", config.data.num_train_pairs), ("eval", 0)):
        records = data.load_split(config.data.source, split, num_records=limit, **where)
        prompts[split] = list(dict.fromkeys(r["prompt"] for r in records if not r.get("problem")))
    prompts["eval"] = prompts["eval"][:config.data.num_eval_prompts]
    return prompts


def recorded_timings(workdir: str) -> dict:
    """The stage timings of the workdir's experiment.json (written by the calls before this one), or none."""
    try:
        with open(os.path.join(workdir, "experiment.json")) as f:
            return json.load(f)["timings_seconds"]
    except FileNotFoundError:
        return {}


def train_methods(configs: Sequence[tuple[Method, ml_collections.ConfigDict]], paths, timings: dict) -> list:
    """Train each method's run in `paths.method(method)` (a finished one is skipped), then fill in the sample KL of
    runs trained without π_ref; records the seconds of what ran in `timings`; returns [(method, workdir)]."""
    runs = []
    for method, config in configs:
        if (seconds := train_one(paths.method(method), config, method.name)) is not None:
            timings[method.name] = seconds
        began = time.perf_counter()
        if posthoc_kl.fill_missing_kl(config, paths.method(method)):
            timings[f"{method.name}/posthoc_kl"] = time.perf_counter() - began
        runs.append((method, paths.method(method)))
    return runs


def run_experiment(workdir: str, scale: Scale = FULL, sft_config: ml_collections.ConfigDict | None = None,
                   reward: str = "", seed: int = 0) -> dict:
    """Every stage in `workdir`, reusing the finished ones, then the report (see report.py); returns experiment.json.

    Built in (no `sft_config`): the corpus, model and steps of `scale`. With `sft_config` (e.g. configs/imdb.py's
    SFT step): its model, data source and DPO settings, every method at its dpo.learning_rate, and `reward`
    (hf:PATH of a sentiment classifier) as the ground truth.
    """
    paths, started = Paths(workdir), time.perf_counter()
    timings = recorded_timings(workdir)  # a stage skipped in this call keeps the seconds of the call that ran it
    if sft_config is None:
        write_builtin_corpus(scale, paths, seed)
        sft_config = builtin_sft_config(scale, paths, seed)
        prompts = {split: corpus.prefixes(num, seed, split)
                   for split, num in (("train", scale.train_prefixes), ("eval", scale.eval_prefixes))}
        methods = tuple(m for m in METHODS if not scale.methods or m.name in scale.methods)
        steps, eval_every, warmup = scale.method_steps, scale.eval_every, scale.warmup_steps
        well_formed = corpus.is_well_formed
    else:
        sft_config = ml_collections.ConfigDict(sft_config.to_dict())
        sft_config.mode = "sft"
        sft_config.eval.reward = reward or sft_config.eval.reward
        prompts = source_prompts(sft_config)
        methods = config_methods()
        steps, eval_every, warmup = sft_config.dpo.num_steps, sft_config.train.eval_every, sft_config.dpo.warmup_steps
        well_formed = None
    if (seconds := train_one(paths.sft, sft_config, "sft")) is not None:
        timings["sft"] = seconds
    began = time.perf_counter()
    if write_pairs(sft_config, paths, prompts, sft_config.eval.reward):
        timings["samples_and_pairs"] = time.perf_counter() - began
    runs = train_methods([(m, method_config(sft_config, m, paths, steps, eval_every, warmup)) for m in methods],
                         paths, timings)

    rows = report.frontier_table(runs)
    report.write_table(rows, os.path.join(workdir, "frontier.csv"), os.path.join(workdir, "frontier.md"))
    report.plot_frontier(rows, os.path.join(workdir, "frontier.png"))
    degeneration = report.write_degeneration(runs, os.path.join(workdir, "degeneration.md"),
                                             sft_config.eval.max_new_tokens, well_formed)
    dominance = report.dominance(rows)
    summary = report.dominance_summary(dominance)
    print(summary)
    timings["total_this_call"] = time.perf_counter() - started
    result = {"timings_seconds": timings, "dominance": dominance, "dominance_summary": summary,
              "degeneration": degeneration}
    with open(os.path.join(workdir, "experiment.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
