r"""The paper's evaluation as a command: win rates of runs' samples against references, the chosen answers, or
another run, judged by a reward or an LLM, across sampling temperatures; Best-of-N from the same command.

    python -m dpo_jax.evaluate --workdir=RUN_DIR[,RUN_DIR2] --against=references|chosen|OTHER_RUN_DIR \
        --temperatures=0,0.25,0.5,0.75,1.0 [--judge=reward|llm] [--best_of_n=N]

Samples and their reward come from sample_eval.SampleEvaluator, the evaluator the training loop uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from dpo_jax import build, checkpoint, data, errors, judges, models, rewards, sharding
from dpo_jax.sample_eval import SampleEvaluator
from dpo_jax.sampling import SamplingSettings


@dataclasses.dataclass
class LoadedRun:
    """A finished run read back for evaluation: its config, tokenizer, eval data and final policy."""

    workdir: str
    config: Any
    tokenizer: Any
    data: build.RunData
    graphdef: Any
    params: Any
    stage: str
    step: int


def load_run(workdir: str, mesh: jax.sharding.Mesh | None = None) -> LoadedRun:
    """The run in `workdir`: its config and model from its last stage's latest checkpoint, its data rebuilt."""
    stage = checkpoint.last_stage(workdir)
    step, meta = checkpoint.read_meta(workdir, stage)
    config = ml_collections.ConfigDict(meta["config"])
    model_config = models.config_from_dict(meta["model"])
    mesh = mesh or build.make_mesh(config)
    graphdef, abstract = models.abstract_model(model_config)
    abstract = sharding.abstract_params(abstract, models.family_of(model_config).name, mesh)
    params = checkpoint.load_final_params(workdir, stage, abstract, step)
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    return LoadedRun(workdir, config, tokenizer, build.build_data(config, tokenizer), graphdef, params, stage, step)


def chosen_texts(run: LoadedRun) -> list[str]:
    """The chosen completion of each eval prompt's first pair, decoded (the paper's HH comparison)."""
    chosen = {}
    for example in run.data.eval.encoded:
        chosen.setdefault(tuple(example["prompt"].tolist()), example.get("chosen"))
    texts = []
    for row, n in zip(run.data.prompt_tokens, run.data.prompt_lengths):
        tokens = chosen[tuple(row[:n].tolist())]
        if tokens is None:
            raise ValueError(f"{run.workdir}: --against=chosen needs paired eval data; its data is unpaired")
        texts.append(run.tokenizer.decode(np.asarray(tokens).tolist()))
    return texts


def reference_texts(path: str, prompts: list[str]) -> list[str]:
    """Each prompt's reference completion from a JSON-lines file of {"prompt", "reference"} (prompts compared
    without surrounding whitespace); ValueError naming the file and the first prompt it lacks."""
    references = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not {"prompt", "reference"} <= record.keys():
                    raise ValueError(f"{path}:{number}: expected an object with 'prompt' and 'reference'")
                references[record["prompt"].strip()] = record["reference"]
    missing = [p for p in prompts if p.strip() not in references]
    if missing:
        raise ValueError(f"{path}: no reference for {len(missing)} of {len(prompts)} eval prompts, e.g. {missing[0]!r}")
    return [references[p.strip()] for p in prompts]


def evaluator_of(run: LoadedRun, reward: rewards.Reward | None, num_prompts: int | None) -> SampleEvaluator:
    """A SampleEvaluator over the run's first `num_prompts` eval prompts (all: None) with its eval settings."""
    n = len(run.data.prompt_lengths) if num_prompts is None else num_prompts
    return SampleEvaluator(
        run.graphdef, run.data.prompt_tokens[:n], run.data.prompt_lengths[:n], run.tokenizer,
        settings=SamplingSettings.from_config(run.config.eval), reward=reward, rng=jax.random.key(run.config.seed),
        batch_size=run.config.train.eval_batch_size, chunk_size=run.config.train.logprob_chunk_size,
    )


def best_of_n(evaluator: SampleEvaluator, params: Any, settings: SamplingSettings, n: int,
              rng: jax.Array) -> list[dict[str, Any]]:
    """For each prompt, the highest-reward of `n` samples (draw i uses `fold_in(rng, i)`): the paper's baseline."""
    if evaluator.reward is None:
        raise ValueError("Best-of-N needs a reward (--reward, or the run's eval.reward / the data's ground truth)")
    best: list[dict[str, Any]] = []
    for i in range(n):
        _, records = evaluator(params, None, settings, jax.random.fold_in(rng, i))
        best = records if not best else [r if r["reward"] > b["reward"] else b for r, b in zip(records, best)]
    return best


def win_rates(
    runs: list[LoadedRun], against: str, temperatures: list[float], judge: Any, out_dir: str, *,
    reward: rewards.Reward | None = None, best_of: int = 1, num_prompts: int | None = None,
    references: str | None = None, seed: int = 0,
) -> dict[str, Any]:
    """Each run's samples against `against` ('references', 'chosen' or another run's directory) at each temperature,
    judged with the two responses in a random recorded order; writes each comparison to
    `out_dir/comparisons/<run>_t<T>.jsonl` and returns {run label: [win_rate(...) + temperature per temperature]}."""
    os.makedirs(os.path.join(out_dir, "comparisons"), exist_ok=True)
    opponent = None if against in ("references", "chosen") else load_run(against)
    curves: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        label = os.path.basename(os.path.normpath(run.workdir)) + (f" (best of {best_of})" if best_of > 1 else "")
        evaluator = evaluator_of(run, reward, num_prompts)
        prompts = evaluator.prompt_texts()
        if against == "references":
            if not references:
                raise ValueError("--against=references needs --references=FILE.jsonl ({prompt, reference} lines)")
            fixed = reference_texts(references, prompts)
        elif against == "chosen":
            fixed = chosen_texts(run)[: len(prompts)]
        elif opponent.config.data.tokenizer != run.config.data.tokenizer:
            raise ValueError(f"{against} uses tokenizer {opponent.config.data.tokenizer!r}, {run.workdir} "
                             f"{run.config.data.tokenizer!r}: they cannot be given the same prompt tokens")
        curves[label] = []
        for index, temperature in enumerate(temperatures):
            settings = dataclasses.replace(evaluator.settings, temperature=temperature)
            rng = jax.random.fold_in(jax.random.key(seed), index)
            if best_of > 1:
                ours = [r["completion"] for r in best_of_n(evaluator, run.params, settings, best_of, rng)]
            else:
                ours = [r["completion"] for r in evaluator(run.params, None, settings, rng)[1]]
            theirs = fixed if opponent is None else [
                r["completion"] for r in dataclasses.replace(evaluator, graphdef=opponent.graphdef)(
                    opponent.params, None, settings, jax.random.fold_in(rng, 1))[1]]
            ours_first = np.random.default_rng([seed, index]).random(len(prompts)) < 0.5
            comparisons = [judges.Comparison(p, *((a, b) if first else (b, a)))
                           for p, a, b, first in zip(prompts, ours, theirs, ours_first)]
            verdicts = [judges.orient(v, bool(first)) for v, first in zip(judge.judge(comparisons), ours_first)]
            path = os.path.join(out_dir, "comparisons", f"{label.replace(' ', '_')}_t{temperature:g}.jsonl")
            with open(path, "w") as f:
                for p, a, b, first, verdict in zip(prompts, ours, theirs, ours_first, verdicts):
                    f.write(json.dumps({"prompt": p, "evaluated": a, "against": b, "evaluated_first": bool(first),
                                        "verdict": verdict}) + "\n")
            curves[label].append({"temperature": temperature, **judges.win_rate(verdicts)})
    return curves


def win_rate_table(curves: dict[str, list[dict[str, Any]]]) -> str:
    """One line per (run, temperature): win rate, its 95% interval, and the counts."""
    lines = [f"{'run':32s}{'T':>6s}{'win rate':>10s}{'95% CI':>18s}{'n':>6s}{'ties':>6s}{'unparsed':>10s}"]
    for label, points in curves.items():
        for p in points:
            interval = f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]"
            lines.append(f"{label[:32]:32s}{p['temperature']:>6g}{p['win_rate']:>10.3f}{interval:>18s}{p['n']:>6d}"
                         f"{p['ties']:>6d}{p['unparseable']:>10d}")
    return "\n".join(lines)


def make_judge(name: str, reward: rewards.Reward | None, out_dir: str, **llm: Any) -> Any:
    """The judge named on the command line: 'reward' (higher reward wins) or 'llm' (the paper's GPT-4 judging
    prompts, sent to an OpenAI-compatible endpoint; verdicts cached in out_dir/judge_cache.jsonl)."""
    if name == "reward":
        if reward is None:
            raise ValueError("--judge=reward needs a reward: --reward=SPEC, or a run whose data has a ground truth")
        return judges.RewardJudge(reward)
    return judges.LLMJudge(cache_path=os.path.join(out_dir, "judge_cache.jsonl"), **llm)


def main(argv: list[str]) -> None:
    """python -m dpo_jax.evaluate: win rates (see the module's flags)."""
    del argv
    flags_ = _FLAGS
    workdirs = flags_.workdir
    out_dir = flags_.out or os.path.join(workdirs[0], "evaluation")
    try:
        with errors.user_errors("evaluate"):
            runs = [load_run(w) for w in workdirs]
            spec = runs[0].config.eval.reward if flags_.reward is None else flags_.reward
            reward = rewards.make_reward(spec, runs[0].config.data.source)
            judge = make_judge(flags_.judge, reward, out_dir, url=flags_.judge_url, model=flags_.judge_model,
                               task=flags_.judge_task, api_key_env=flags_.judge_api_key_env,
                               max_concurrency=flags_.judge_concurrency)
            curves = win_rates(runs, flags_.against, [float(t) for t in flags_.temperatures], judge, out_dir,
                               reward=reward, best_of=flags_.best_of_n, num_prompts=flags_.num_prompts,
                               references=flags_.references, seed=flags_.seed)
    except errors.RunStopped as stop:
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)
    result = {"against": flags_.against, "judge": getattr(judge, "name", flags_.judge), "curves": curves}
    with open(os.path.join(out_dir, "win_rates.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot = judges.plot_win_rates(curves, os.path.join(out_dir, "win_rates.png"))
    print(win_rate_table(curves))
    print(f"win rates against {flags_.against} written to {out_dir}/win_rates.json and {plot}")


class _Flags:
    """The command's absl flags, defined only when run as a command (importing this module defines none)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(flags.FLAGS, name)


_FLAGS = _Flags()


def define_flags() -> None:
    """Define the command-line flags of `python -m dpo_jax.evaluate`."""
    flags.DEFINE_list("workdir", None, "Run directories to evaluate (one line each in the plot).")
    flags.DEFINE_string("against", "chosen", "'references' (--references file), 'chosen' (the eval pairs' chosen "
                        "answers) or another run's directory (its samples at the same temperature).")
    flags.DEFINE_list("temperatures", ["0", "0.25", "0.5", "0.75", "1.0"], "Sampling temperatures.")
    flags.DEFINE_enum("judge", "reward", ["reward", "llm"], "Who decides which response is better.")
    flags.DEFINE_string("reward", None, "Reward spec (dpo_jax/rewards.py) for the reward judge and Best-of-N "
                        "(default: the run's eval.reward).")
    flags.DEFINE_string("judge_url", "https://api.openai.com/v1/chat/completions", "Chat-completions endpoint.")
    flags.DEFINE_string("judge_model", "gpt-4", "The LLM judge's model name.")
    flags.DEFINE_enum("judge_task", "tldr", ["tldr", "hh"], "Which of the paper's judging prompts.")
    flags.DEFINE_string("judge_api_key_env", "OPENAI_API_KEY", "Environment variable holding the API key.")
    flags.DEFINE_integer("judge_concurrency", 8, "Requests in flight at once.")
    flags.DEFINE_integer("best_of_n", 1, "Keep the highest-reward of N samples per prompt (the paper's baseline).")
    flags.DEFINE_integer("num_prompts", None, "Evaluate the first N eval prompts (default: all).")
    flags.DEFINE_string("references", None, "JSON lines of {prompt, reference}, for --against=references.")
    flags.DEFINE_integer("seed", 0, "Seed of the samples and of the response order.")
    flags.DEFINE_string("out", None, "Output directory (default: the first run's evaluation/).")
    flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
    define_flags()
    app.run(main)
