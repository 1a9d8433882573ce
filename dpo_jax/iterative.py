"""Iterative (online) DPO, mode = "iterative_dpo" (RLHFlow's recipe; docs/iterative.md): in each of
`iterative.rounds` rounds, sample `samples_per_prompt` completions of `prompts_per_round` train prompts from the current
policy, score them (`iterative.reward`, any eval.reward spec, or a pairwise LLM judge with its verdict cache), pair
them (best vs worst, or all pairs; ties dropped, a margin optional), and train a DPO stage on the pairs. π_ref is the
initial model (`fixed`) or the previous round's policy (`previous`).

Each round lives in `<workdir>/rounds/round_NNNN/`: `generated.jsonl` (the samples, written as soon as they are drawn),
`samples.jsonl` (with their scores), `pairs.jsonl` and `pairs_report.json`, the DPO stage's checkpoints (`dpo/`), and
`round.json` once it is done. A rerun resumes from the first file missing: samples are never drawn or scored twice, and
training resumes from the round's checkpoint (data position and rng in it), so a killed run ends bitwise equal to an
uninterrupted one. Training steps are logged as stage `iterative_dpo`, one line per round as stage `rounds` (the
policy's reward and KL to the initial model on the eval prompts), and `reward_vs_kl.png` plots the rounds.

`prompts_per_round = train.batch_size` with `steps_per_round = 1` is online DPO (TRL's OnlineDPOTrainer shape): one
sampling step per training step, the optimizer carried through (`iterative.optimizer = "carry"`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from dpo_jax import build, checkpoint, data, judges, models, rewards, sharding
from dpo_jax.data.generated import encode_generated_pair
from dpo_jax.errors import UserError, user_errors
from dpo_jax.metrics_writer import read_metrics
from dpo_jax.sampling import SamplingSettings, sample

STAGE = "iterative_dpo"  # the training steps' stage in metrics.jsonl (one curve over all rounds)
ROUNDS_STAGE = "rounds"  # one metrics line per round (step = round; 0: the initial model)
ROUNDS_DIRECTORY = "rounds"
PLOT_FILE = "reward_vs_kl.png"
GENERATED, SAMPLES, PAIRS, PAIRS_REPORT, ROUND_FILE = (
    "generated.jsonl", "samples.jsonl", "pairs.jsonl", "pairs_report.json", "round.json")
JUDGE_CACHE = "judge_cache.jsonl"
PROMPT_STREAM, SAMPLE_STREAM = 24, 25  # named rng streams of the rounds' prompts and samples


class NoUsablePairs(UserError):
    """A round's samples gave no pair to train on (all ties, or under the margin)."""


def round_directory(workdir: str, round_: int) -> str:
    """Where round `round_`'s files and checkpoints live."""
    return os.path.join(workdir, ROUNDS_DIRECTORY, f"round_{round_:04d}")


def train_prompts(examples: data.Examples) -> list[np.ndarray]:
    """The distinct prompts (token ids) of the train examples, in first-seen order."""
    seen = dict.fromkeys(tuple(e["prompt"].tolist()) for e in examples.encoded)
    return [np.asarray(p, np.int32) for p in seen]


def round_prompt_indices(num_prompts: int, per_round: int, seed: int, round_: int) -> np.ndarray:
    """Indices of round `round_`'s prompts: consecutive slices of an endless sequence of seeded permutations of the
    prompts (every prompt once per pass), so each round's prompts depend only on (seed, round)."""
    start, stop = (round_ - 1) * per_round, round_ * per_round
    indices = []
    for epoch in range(start // num_prompts, (stop - 1) // num_prompts + 1):
        order = np.random.default_rng([seed, PROMPT_STREAM, epoch]).permutation(num_prompts)
        first = epoch * num_prompts
        indices.extend(order[max(start - first, 0):min(stop - first, num_prompts)].tolist())
    return np.asarray(indices, np.int64)


def build_pairs(scores: np.ndarray, pairs: str, margin: float) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(chosen, rejected) sample indices from scores [num_prompts, samples_per_prompt] (row-major sample indices):
    each prompt's best against its worst (the first of equal scores), or every two samples (`all_pairs`); a pair of
    equal scores is a tie and dropped, one whose difference is under `margin` dropped; both counted."""
    counts = {"ties": 0, "below_margin": 0}
    chosen_rejected = []
    num_prompts, per_prompt = scores.shape
    for p in range(num_prompts):
        row = scores[p]
        if pairs == "best_vs_worst":
            candidates = [(int(np.argmax(row)), int(np.argmin(row)))]
        else:
            candidates = [(i, j) if row[i] >= row[j] else (j, i)
                          for i in range(per_prompt) for j in range(i + 1, per_prompt)]
        for i, j in candidates:
            difference = row[i] - row[j]
            if difference == 0:
                counts["ties"] += 1
            elif difference < margin:
                counts["below_margin"] += 1
            else:
                chosen_rejected.append((p * per_prompt + i, p * per_prompt + j))
    return chosen_rejected, counts


class _RoundWriter:
    """The run's writer as the rounds' DPO stages see it: their stage logged as STAGE, their steps shifted by `offset`
    (a round of `iterative.optimizer = reset` counts from 0), so all rounds draw one curve."""

    def __init__(self, writer: Any):
        self.writer, self.offset = writer, 0
        self._truncated: set[str] = set()

    def truncate(self, stage: str, step: int) -> None:
        self.truncate_as(STAGE, step + self.offset)

    def truncate_as(self, stage: str, step: int) -> None:
        """The run's writer's truncate (which rebuilds `stage`'s tracking runs from metrics.jsonl) the first time in
        this process, and later only when metrics.jsonl holds records of `stage` past `step`: not once a round, whose
        cost would grow with the rounds."""
        path = getattr(self.writer, "path", None)
        if stage in self._truncated and not (path and os.path.exists(path) and any(
                r["stage"] == stage and r["step"] > step for r in read_metrics(os.path.dirname(path)))):
            return
        self._truncated.add(stage)
        self.writer.truncate(stage, step)

    def write(self, stage: str, step: int, metrics: Any) -> None:
        self.writer.write(STAGE, step + self.offset, metrics)

    def write_samples(self, stage: str, step: int, records: list[dict]) -> Any:
        return self.writer.write_samples(STAGE, step + self.offset, records)

    def __getattr__(self, name: str) -> Any:  # tracking, flush, close: the run's writer's
        return getattr(self.writer, name)


def _write_json_lines(path: str, records: list[dict]) -> None:
    """Atomically (a kill leaves the whole file or none), by process 0."""
    if sharding.is_main_process():
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(path + ".tmp", path)
    sharding.sync_processes(f"wrote {os.path.basename(path)}")


def _write_json(path: str, value: dict) -> None:
    if sharding.is_main_process():
        with open(path + ".tmp", "w") as f:
            json.dump(value, f, indent=2)
        os.replace(path + ".tmp", path)
    sharding.sync_processes(f"wrote {os.path.basename(path)}")


def _read_json_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_scorer(config: Any, workdir: str) -> Callable[[int, list[dict]], np.ndarray]:
    """`score(round, samples) -> [num_prompts, samples_per_prompt]` of the config's scorer: `iterative.reward` on
    each sample, or (`iterative.judge = 'llm'`) each sample's wins (ties half) against the other samples of its prompt,
    asked of the LLM judge with its verdict cache in `<workdir>/judge_cache.jsonl`."""
    section = config.iterative
    per_prompt = section.samples_per_prompt
    if section.judge == "llm":
        judge = judges.LLMJudge(section.judge_url, section.judge_model, task=section.judge_task,
                                api_key_env=section.judge_api_key_env, cache_path=os.path.join(workdir, JUDGE_CACHE),
                                max_retries=section.judge_max_retries)
        return lambda round_, samples: judge_scores(judge, round_, samples, per_prompt, workdir)
    with user_errors(f"config.iterative.reward = {section.reward!r}"):
        reward = rewards.make_reward(section.reward, config.data.source)
    if reward is None:
        raise UserError(f"config.iterative.reward = {section.reward!r}: data.source = {config.data.source!r} has no "
                        "ground-truth reward; name one (hf:PATH, python:module:function) or set iterative.judge")

    def score(round_: int, samples: list[dict]) -> np.ndarray:
        try:
            values = np.asarray(reward([s["prompt"] for s in samples], [s["completion"] for s in samples]), np.float64)
            if values.shape != (len(samples),):
                raise ValueError(f"it gave {values.shape} scores for {len(samples)} samples")
        except (ValueError, TypeError, OSError) as error:
            raise UserError(f"round {round_}: config.iterative.reward = {section.reward!r} could not score the "
                            f"samples: {error}") from error
        return values.reshape(-1, per_prompt)

    return score


def judge_scores(judge: Any, round_: int, samples: list[dict], per_prompt: int, workdir: str) -> np.ndarray:
    """Each sample's wins (a tie half a win; an unreadable verdict nothing) against every other sample of its prompt,
    each two compared once (which one is shown first alternates); [num_prompts, per_prompt]."""
    comparisons, where = [], []
    for start in range(0, len(samples), per_prompt):
        for i in range(per_prompt):
            for j in range(i + 1, per_prompt):
                a, b = (i, j) if (i + j) % 2 else (j, i)
                comparisons.append(judges.Comparison(samples[start]["prompt"], samples[start + a]["completion"],
                                                     samples[start + b]["completion"]))
                where.append((start + a, start + b))
    try:
        verdicts = judge.judge(comparisons)
    except judges.JudgeError as error:
        raise judges.JudgeError(
            f"round {round_}: the judge failed: {error}. Its verdicts so far are cached in "
            f"{os.path.join(workdir, JUDGE_CACHE)}: rerun the same command to resume the round") from error
    wins = np.zeros(len(samples))
    for (first, second), verdict in zip(where, verdicts):
        if verdict == judges.FIRST:
            wins[first] += 1
        elif verdict == judges.SECOND:
            wins[second] += 1
        elif verdict == judges.TIE:
            wins[first] += 0.5
            wins[second] += 0.5
    return wins.reshape(-1, per_prompt)


def _draw_samples(run: Any, params: Any, tokenizer, prompts: list[np.ndarray], indices: np.ndarray,
                  round_: int) -> list[dict]:
    """`samples_per_prompt` samples of each round prompt from `params` (prompt-major), with their token ids."""
    config = run.config
    section = config.iterative
    width = config.data.max_prompt_length
    rows = np.repeat(indices, section.samples_per_prompt)
    tokens = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for r, index in enumerate(rows):
        tokens[r, :len(prompts[index])] = prompts[index]
        lengths[r] = len(prompts[index])
    settings = SamplingSettings(max_new_tokens=config.eval.max_new_tokens, temperature=section.temperature,
                                top_p=section.top_p, top_k=section.top_k, stop=tuple(config.eval.stop))
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), SAMPLE_STREAM), round_)
    drawn = sample(run.graphdef, params, tokens, lengths, tokenizer=tokenizer, settings=settings, rng=rng,
                   batch_size=config.train.eval_batch_size, mesh=run.mesh)
    texts = [tokenizer.decode(prompts[index].tolist()) for index in rows]
    return [
        {"prompt_index": int(index), "prompt": prompt, "completion": completion,
         "prompt_ids": prompts[index].tolist(), "completion_ids": row[mask > 0].tolist(), "logprob": float(logprob)}
        for index, prompt, completion, row, mask, logprob in zip(
            rows, texts, drawn.texts, drawn.tokens, drawn.completion_mask, drawn.sequence_logprobs)
    ]


def round_pairs(config: Any, tokenizer, samples: list[dict], scores: np.ndarray) -> tuple[data.Examples, list[dict],
                                                                                             dict]:
    """(the round's training examples, the pairs as records, the counts) from scored samples. Fewer pairs than
    train.batch_size are repeated to fill one batch (counted as `repeated`); none at all raises NoUsablePairs."""
    section = config.iterative
    indices, counts = build_pairs(scores, section.pairs, section.margin)
    encoded, records, counts["identical"] = [], [], 0
    for chosen, rejected in indices:
        try:
            encoded.append(encode_generated_pair(
                samples[chosen]["prompt_ids"], samples[chosen]["completion_ids"], samples[rejected]["completion_ids"],
                eos_id=tokenizer.eos_token_id, max_length=config.data.max_length,
                max_prompt_length=config.data.max_prompt_length, truncation_mode=config.data.truncation_mode))
        except data.BadRecord:  # a judge can rank two identical samples apart
            counts["identical"] += 1
            continue
        records.append({"prompt": samples[chosen]["prompt"], "chosen": samples[chosen]["completion"],
                        "rejected": samples[rejected]["completion"], "chosen_score": float(scores.flat[chosen]),
                        "rejected_score": float(scores.flat[rejected]), "chosen_sample": chosen,
                        "rejected_sample": rejected})
    counts.update(prompts=int(scores.shape[0]), samples=int(scores.size), pairs=len(encoded))
    if not encoded:
        raise NoUsablePairs(
            f"no usable pairs: {counts['prompts']} prompts, {counts['samples']} samples, {counts['ties']} ties, "
            f"{counts['below_margin']} under iterative.margin = {section.margin}, {counts['identical']} identical; "
            "nothing was trained (raise iterative.temperature or samples_per_prompt, or lower the margin)")
    counts["repeated"] = max(config.train.batch_size - len(encoded), 0)
    encoded = [encoded[i % len(encoded)] for i in range(max(len(encoded), config.train.batch_size))]
    return data.Examples(encoded, paired=True, report=dict(counts)), records, counts


def _round_config(config: Any, round_: int) -> Any:
    """The config of round `round_`'s DPO stage: steps_per_round steps, or (carried optimizer) up to the round's
    cumulative step."""
    section = config.iterative
    round_config = config.copy_and_resolve_references()
    steps = section.steps_per_round
    round_config.dpo.num_steps = steps * (round_ if section.optimizer == "carry" else 1)
    return round_config


def _carried_state(run: Any, round_: int) -> Callable[[Any], Any]:
    """`initial_state` of a round's stage that starts from round `round_ - 1`'s final train state (optimizer, step,
    schedule)."""
    def carried(state: Any) -> Any:
        checkpoints = checkpoint.StageCheckpoints(round_directory(run.workdir, round_ - 1), "dpo",
                                                  run.config.train.keep_checkpoints, run.config.train.max_save_failures)
        try:
            restored = checkpoints.restore(checkpoint.abstract(state))
        finally:
            checkpoints.close()
        if restored is None:
            raise UserError(f"round {round_}: round {round_ - 1} has no checkpoint in "
                            f"{round_directory(run.workdir, round_ - 1)} to carry the optimizer from")
        return restored[0]

    return carried


def _round_params(run: Any, round_: int) -> Any:
    """Round `round_`'s final policy, read from its checkpoint."""
    abstract = sharding.abstract_params(models.abstract_model(run.model_config)[1], run.family, run.mesh)
    with user_errors(f"round {round_}'s checkpoint"):
        return checkpoint.load_final_params(round_directory(run.workdir, round_), "dpo", abstract)


def _evaluate(run: Any, params: Any, initial: Any, round_: int) -> dict[str, float]:
    """The policy's samples of the eval prompts: mean reward, KL to the initial model, length; samples written."""
    if run.evaluator is None:
        return {}
    means, records = run.evaluator(params, initial)
    run.writer.write_samples(ROUNDS_STAGE, round_, records)
    return {f"samples/{name}": value for name, value in means.items()}


def run_round(run: Any, train_stage: Callable, tokenizer, scorer: Callable, prompts: list[np.ndarray],
              policy: Any, initial: Any, round_: int, writer: _RoundWriter) -> tuple[Any, dict]:
    """Round `round_` from where its directory says it stopped: sample, score, pair, train, evaluate. Returns the
    round's final params and its record."""
    config, section = run.config, run.config.iterative
    directory = round_directory(run.workdir, round_)
    os.makedirs(directory, exist_ok=True)
    record: dict[str, Any] = {"round": round_}
    started = time.perf_counter()
    if os.path.exists(os.path.join(directory, SAMPLES)):
        samples = _read_json_lines(os.path.join(directory, SAMPLES))
        scores = np.asarray([s["score"] for s in samples], np.float64).reshape(-1, section.samples_per_prompt)
    else:
        if os.path.exists(os.path.join(directory, GENERATED)):
            samples = _read_json_lines(os.path.join(directory, GENERATED))
        else:
            indices = round_prompt_indices(len(prompts), section.prompts_per_round, config.seed, round_)
            samples = _draw_samples(run, policy, tokenizer, prompts, indices, round_)
            _write_json_lines(os.path.join(directory, GENERATED), samples)
            record["sampling_seconds"] = time.perf_counter() - started
        scoring_started = time.perf_counter()
        scores = scorer(round_, samples)
        samples = [{**s, "score": float(v)} for s, v in zip(samples, scores.reshape(-1))]
        _write_json_lines(os.path.join(directory, SAMPLES), samples)
        record["scoring_seconds"] = time.perf_counter() - scoring_started
    examples, pair_records, counts = round_pairs(config, tokenizer, samples, scores)
    _write_json_lines(os.path.join(directory, PAIRS), pair_records)
    _write_json(os.path.join(directory, PAIRS_REPORT), counts)
    logging.info("round %d: %s", round_, counts)
    record.update({f"pairs/{name}": float(value) for name, value in counts.items()})
    record["score/mean"] = float(scores.mean())
    record["score/best_mean"] = float(scores.max(axis=1).mean())

    training_started = time.perf_counter()
    round_config = _round_config(config, round_)
    writer.offset = 0 if section.optimizer == "carry" else (round_ - 1) * section.steps_per_round
    round_run = dataclasses.replace(
        run, config=round_config, workdir=directory, data=dataclasses.replace(run.data, train=examples),
        writer=writer, evaluator=None, perplexity=None)
    reference = initial if section.reference == "fixed" else policy
    carry = _carried_state(run, round_) if section.optimizer == "carry" and round_ > 1 else None
    params, _, final = train_stage(round_run, "dpo", policy, reference, initial_state=carry)
    record["training_seconds"] = time.perf_counter() - training_started
    record["steps"] = float(section.steps_per_round * round_)
    record.update({f"eval/{name}": value for name, value in final.items()})
    run.signals.stop(f"round {round_}, its training done (saved)")
    if round_ % section.eval_every == 0 or round_ == section.rounds:
        record.update(_evaluate(run, params, initial, round_))
    record["seconds"] = time.perf_counter() - started
    return params, record


def _record_round(run: Any, writer: _RoundWriter, round_: int, record: dict) -> None:
    """The round's line of metrics.jsonl (stage `rounds`) and its round.json, which marks it done."""
    writer.truncate_as(ROUNDS_STAGE, round_ - 1)  # a line a killed run wrote before round.json
    run.writer.write(ROUNDS_STAGE, round_, {k: v for k, v in record.items() if k != "round"})
    run.writer.flush()
    _write_json(os.path.join(round_directory(run.workdir, round_), ROUND_FILE), record)


def run_rounds(run: Any, start: Any, tokenizer, train_stage: Callable) -> dict[str, Any]:
    """mode = iterative_dpo from the initial params `start` (π_ref of `fixed`): every round not done yet, resumed
    where the workdir says; `train_stage` is run.train_stage. Returns {"rounds": [each round's record]}."""
    config, section = run.config, run.config.iterative
    scorer = make_scorer(config, run.workdir)
    initial = build.reference_params(start, config.model.reference_dtype)
    prompts = train_prompts(run.data.train)
    records, writer = [], _RoundWriter(run.writer)
    initial_file = round_directory(run.workdir, 0)
    if not os.path.exists(os.path.join(initial_file, ROUND_FILE)):
        os.makedirs(initial_file, exist_ok=True)
        _record_round(run, writer, 0, {"round": 0, "steps": 0.0, **_evaluate(run, start, initial, 0)})
    with open(os.path.join(initial_file, ROUND_FILE)) as f:
        records.append(json.load(f))
    policy = start
    for round_ in range(1, section.rounds + 1):
        done = os.path.join(round_directory(run.workdir, round_), ROUND_FILE)
        if os.path.exists(done):
            with open(done) as f:
                records.append(json.load(f))
            policy = None  # read from its checkpoint if a later round needs it
            continue
        if policy is None:
            policy = _round_params(run, round_ - 1)
        policy, record = run_round(run, train_stage, tokenizer, scorer, prompts, policy, initial, round_, writer)
        _record_round(run, writer, round_, record)
        records.append(record)
        if not section.keep_round_checkpoints and round_ > 1 and sharding.is_main_process():
            shutil.rmtree(checkpoint.stage_directory(round_directory(run.workdir, round_ - 1), "dpo"),
                          ignore_errors=True)
        print(f"round {round_}/{section.rounds}: {int(record['pairs/pairs'])} pairs "
              f"({int(record['pairs/ties'])} ties), sample score {record['score/mean']:.3f}"
              + (f", eval reward {record['samples/reward']:.3f}" if "samples/reward" in record else "")
              + (f", KL to initial {record['samples/kl']:.3f}" if "samples/kl" in record else ""))
    if sharding.is_main_process():
        plot_reward_vs_kl(records, os.path.join(run.workdir, PLOT_FILE))
    return {"rounds": records}


def plot_reward_vs_kl(records: list[dict], path: str) -> str | None:
    """The policy's mean reward against its KL to the initial model on the eval prompts, one point per evaluated
    round (labelled with its number), into the PNG `path`; None when no round has both."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch

    points = [(r["round"], r["samples/kl"], r["samples/reward"]) for r in records
              if "samples/kl" in r and "samples/reward" in r]
    if not points:
        return None
    rounds_, kl, reward = (np.asarray(column) for column in zip(*points))
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(kl, reward, "o-")
    for r, x, y in zip(rounds_, kl, reward):
        ax.annotate(str(int(r)), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xlabel="KL(policy ‖ initial) on eval prompts", ylabel="mean reward", title="iterative DPO by round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
