"""The training loop and the run's modes: each stage stepped to its end (resuming what the workdir holds) with
hooks for evaluation, logging, checkpointing, preemption and non-finite steps (hooks.py); Preferred-FT, DPO, both in
turn, or π_ref's log-probs written to a reference cache. What the loop runs is built by build.py.

The run is kept safe: one process per workdir, preemption saves the current step, non-finite steps are skipped and
limited, failed saves are retried, corrupt checkpoints are stepped past. What stops a run, and its exit status, is in
errors.py; the faults and the tests that inject them are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from tqdm.auto import tqdm

from dpo_jax import build, checkpoint, data, iterative, lora, losses, models, reference_cache, sharding
from dpo_jax import config as config_lib
from dpo_jax.errors import user_errors
from dpo_jax.guards import PreemptionSignals, WorkdirLock
from dpo_jax.hooks import (
    Checkpointer, Evaluation, Hooks, MetricsLogger, NonFiniteSteps, Preemption, StepInfo, evaluate_pairs,
)
from dpo_jax.metrics_writer import MetricsWriter, NullWriter, plot_training_curves
from dpo_jax.perplexity import PerplexityCheck
from dpo_jax.sample_eval import SampleEvaluator
from dpo_jax.step import make_pair_logps

DATA_REPORT = "data_report.json"  # what the scan of each split kept, truncated and skipped (with origins)


@dataclasses.dataclass
class RunContext:
    """What every stage of one run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: Any
    model_config: Any
    data: build.RunData
    writer: MetricsWriter | NullWriter  # process 0 writes metrics; the others a NullWriter
    signals: PreemptionSignals
    evaluator: SampleEvaluator | None = None  # samples at each evaluation (None: data.num_eval_prompts = 0)
    lora_base: dict | None = None  # with LoRA: the base's path and fingerprint (checkpoints record it)
    perplexity: PerplexityCheck | None = None  # eval.perplexity_path's check at each evaluation

    @property
    def family(self) -> str:
        return models.family_of(self.model_config).name


def train_stage(
    run: RunContext, stage: str, params: Any, ref_params: Any, evaluate_start: bool = False,
    donate_params: bool = False, initial_state: Any = None,
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Run (or resume) one stage, 'sft' or 'dpo', to its last step (`donate_params`: the stage takes `params`'
    buffers over; no copy of them stays in device memory; `initial_state(state)`: the state to start from instead,
    e.g. an iterative round's carried optimizer; the stage's own checkpoint still comes first).

    Returns (final params, eval metrics of the initial params if `evaluate_start` else {}, final eval metrics).
    """
    config = run.config
    loss_name = build.stage_loss(config, stage)
    if run.lora_base is not None:  # the train state holds the adapters; the frozen base is also π_ref
        params, ref_params = lora.split(params)
    elif not losses.uses_reference(loss_name, build.loss_params(config)):
        ref_params = None
    state, train_step, eval_step = build.compile_stage(
        config, stage, run.graphdef, run.family, run.mesh, params, ref_params, donate_params)
    if initial_state is not None:
        state = initial_state(state)
    batches = build.train_batches(config, stage, run.data, loss_name)
    evaluate = _stage_evaluation(run, stage, eval_step, ref_params, loss_name)
    # The state starts from `params`; for DPO these are π_ref's, so its step-0 samples are π_ref's.
    initial_eval = evaluate(state, 0) if evaluate_start else {}
    checkpoints = checkpoint.StageCheckpoints(
        run.workdir, stage, config.train.keep_checkpoints, config.train.max_save_failures)
    progress = None
    try:
        state, data_state, nonfinite = _restore(checkpoints, state, config, stage, run.lora_base)
        first_step, num_steps = int(state.step), config[stage].num_steps
        run.writer.truncate(stage, first_step)  # what a killed run logged after its checkpoint is logged again
        train_iterator = batches.iterator(data_state)
        progress = tqdm(range(first_step, num_steps), initial=first_step, total=num_steps, desc=stage,
                        disable=not (config.train.progress_bar and sharding.is_main_process()), dynamic_ncols=True)
        evaluation = Evaluation(evaluate)

        def meta(step: int) -> dict:
            return _checkpoint_meta(run, stage, step, batches.seed, train_iterator.get_state(), nonfinite.total)

        preemption = Preemption(run.signals, checkpoints, run.writer)
        hooks = Hooks()
        hooks.add(nonfinite, overhead=False)
        hooks.add(preemption.check, overhead=False)
        hooks.add(evaluation, every=config.train.eval_every)
        hooks.add(MetricsLogger(run.writer, config.train.batch_size, nonfinite, progress, first_step),
                  every=config.train.log_every)
        hooks.add(Checkpointer(checkpoints, nonfinite, meta), every=config.train.checkpoint_every, on_stop=True)
        hooks.add(preemption.stop, overhead=False)
        for step in progress:
            batch = sharding.global_batch(next(train_iterator), run.mesh)
            state, metrics = train_step(state, ref_params, batch)
            hooks.run(StepInfo(stage, step + 1, num_steps, state, metrics))
        checkpoints.wait()
    finally:  # Also when interrupted: complete and report the save in flight.
        if progress is not None:
            progress.close()
        checkpoints.close()
    # Resumed at the end, nothing ran: evaluate the restored params.
    final_eval = evaluation.latest or evaluate(state, int(state.step))
    final_params = state.params if run.lora_base is None else lora.combine(ref_params, state.params)
    return final_params, initial_eval, final_eval


def _stage_evaluation(run: RunContext, stage: str, eval_step, ref_params: Any, loss_name: str):
    """`evaluate(state, step)`: held-out pair metrics of the train state; with an evaluator, also samples' means
    (`samples/...`), the samples written (DPO's with their KL to π_ref). With TR-DPO's moving π_ref, both are
    measured against the stage's initial π_ref (`ref_params`)."""
    config = run.config
    eval_examples = build.examples_for(loss_name, run.data.eval)

    def evaluate(state: Any, step: int) -> dict[str, float]:
        params = state.params
        metrics = evaluate_pairs(eval_step, params, ref_params, eval_examples, config.train.eval_batch_size,
                                 run.data.buckets, run.data.pad_id, run.data.layout, run.mesh, state.loss_state)
        if run.evaluator is not None:
            reference = ref_params if stage == "dpo" else None
            if run.lora_base is not None:  # the adapted model's: with the adapters, and without them
                params, reference = (lora.combine(ref_params, params),
                                     lora.combine(ref_params, lora.adapters_off(params)))
            sample_means, records = run.evaluator(params, reference)
            metrics.update({f"samples/{name}": value for name, value in sample_means.items()})
            run.writer.write_samples(stage, step, records)
        if run.perplexity is not None:  # the forgetting check: the held-out text under the policy and π_ref
            policy, reference = state.params, ref_params if stage == "dpo" else None
            if run.lora_base is not None:  # the adapted model, and the base (π_ref) without the adapters
                policy, reference = lora.combine(ref_params, state.params), lora.combine(
                    ref_params, lora.adapters_off(state.params))
            metrics.update(run.perplexity(policy, reference))
        return metrics

    return evaluate


def _restore(checkpoints: checkpoint.StageCheckpoints, state: Any, config: ml_collections.ConfigDict, stage: str,
             lora_base: dict | None = None):
    """(state, Grain iterator state or None, NonFiniteSteps) from the stage's latest checkpoint, or as they start;
    a checkpoint of LoRA adapters on another base (or of the other kind) is refused."""
    nonfinite = NonFiniteSteps(stage, config.train.max_nonfinite_steps)
    restored = checkpoints.restore(checkpoint.abstract(state))
    if restored is None:
        return state, None, nonfinite
    state, meta = restored
    checkpoint.check_base(meta, lora_base, f"{stage} checkpoint at step {int(state.step)}")
    nonfinite.total = meta.get("skipped_steps", 0)
    logging.info("%s: resumed from step %d (data position %d)", stage, int(state.step), meta["data_position"])
    changes = config_lib.changed_keys(meta["config"], config.to_dict())
    if changes:
        logging.warning("%s: resuming a run whose config differed: %s", stage, "; ".join(changes))
    return state, meta["data_state"], nonfinite


def _checkpoint_meta(run: RunContext, stage: str, step: int, data_seed: int, data_state: Any, skipped: int) -> dict:
    """What a checkpoint records beside the state: the data position and Grain state, the config, the architecture
    (so a checkpoint exports alone)."""
    return {
        "stage": stage,
        "data_position": step * run.config.train.batch_size,
        "data_seed": data_seed,
        "data_state": data_state,  # Grain's: where the next batch comes from
        "rng_seed": run.config.seed,
        "skipped_steps": skipped,
        "config": run.config.to_dict(),
        "model": models.config_to_dict(run.model_config),
        **run.writer.tracking(),  # the W&B run id, so the run it continues is on record with the state
        **({"lora_base": run.lora_base} if run.lora_base is not None else {}),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the config's mode in `workdir` (resuming what is there); write summary.json and the plot.

    Raises errors.RunStopped subclasses for the stops the CLI reports in one line: UserError (bad config, data,
    checkpoint or a workdir in use), NonFiniteTraining, CheckpointSaveFailed, Preempted (after saving).
    """
    config_lib.validate(config)
    if config.dry_run:
        raise config_lib.ConfigError("config.dry_run = True is invalid here: a dry run trains nothing; "
                                     "dry_run.report(config) gives it (python -m dpo_jax.main dispatches it)")
    started = time.perf_counter()
    sharding.initialize_distributed(config.mesh.distributed)
    mesh = build.make_mesh(config)
    main = sharding.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    # One launch per workdir: process 0 holds the lock for all of a multi-host run's processes.
    with WorkdirLock(workdir) if main else contextlib.nullcontext(), PreemptionSignals() as signals:
        if main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        with user_errors(f"config.data.tokenizer = {config.data.tokenizer!r}"):
            tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
        with user_errors("data"):
            run_data = build.build_data(config, tokenizer)
        if main:
            with open(os.path.join(workdir, DATA_REPORT), "w") as f:
                json.dump({"train": run_data.train.report, "eval": run_data.eval.report}, f, indent=2)
        with user_errors(f"config.model.path = {config.model.path!r}" if config.model.path else "config.model"):
            graphdef, params, model_config = build.build_model(config, tokenizer, mesh)
        lora_base = None
        if config.model.lora.enabled:  # params: the base (π_ref) and the adapters
            if config.dpo.reference_workdir:  # the base: that run's final SFT params
                with user_errors("config.dpo.reference_workdir"):
                    params = build.sft_params(config.dpo.reference_workdir, model_config, mesh)
            graphdef, params, fingerprint = build.attach_lora(
                config, graphdef, params, models.family_of(model_config).name, mesh)
            lora_base = {"path": config.dpo.reference_workdir or config.model.path, "fingerprint": fingerprint}
        writer = (MetricsWriter(workdir, tuple(config.train.loggers), config.to_dict(), config.train.wandb_project,
                                config.train.wandb_entity) if main else NullWriter())
        with user_errors(f"config.eval.reward = {config.eval.reward!r}"):
            evaluator = build.make_evaluator(config, graphdef, run_data, tokenizer, mesh)
        run = RunContext(config, workdir, mesh, graphdef, model_config, run_data, writer, signals, evaluator, lora_base)
        with user_errors(f"config.eval.perplexity_path = {config.eval.perplexity_path!r}"):
            run.perplexity = build.make_perplexity(config, graphdef, tokenizer, mesh)
        summary: dict[str, Any] = {
            "config": config.to_dict(),
            "data": {split: {k: v for k, v in e.report.items() if k != "skipped_examples"}
                     for split, e in (("train", run_data.train), ("eval", run_data.eval))},
        }
        try:
            summary.update(_run_stages(run, params, tokenizer))
        finally:
            writer.close()
    summary["wall_time_seconds"] = time.perf_counter() - started
    if main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if config.mode != "precompute_ref":  # which trains nothing
            plot_training_curves(workdir)
    return summary


def _run_stages(run: RunContext, params: Any, tokenizer) -> dict[str, Any]:
    """The config's mode: Preferred-FT, DPO, or both in turn, then samples of π_ref and the policy; or
    precompute_ref: π_ref's log-probs into ref.cache."""
    config, results = run.config, {}
    if config.mode in ("sft", "sft_then_dpo"):
        params, _, results["sft"] = train_stage(run, "sft", params, None)
        run.signals.stop(f"sft step {config.sft.num_steps}, the end of the stage (saved)")
    else:
        params = _dpo_start_params(run, params)
    if config.mode == "iterative_dpo":  # rounds of sampling, scoring and a DPO stage (iterative.py)
        return iterative.run_rounds(run, params, tokenizer, train_stage)
    if config.mode == "precompute_ref":
        started = time.perf_counter()
        key = build_reference_cache(run, tokenizer, params)
        results["reference_cache"] = {"path": config.ref.cache, "key": key, "seconds": time.perf_counter() - started,
                                      "examples": {"train": len(run.data.train), "eval": len(run.data.eval)}}
        print(f"reference log-probs of {len(run.data.train)} train and {len(run.data.eval)} eval pairs written to "
              f"{config.ref.cache} in {results['reference_cache']['seconds']:.1f} s")
    if config.mode not in ("dpo", "sft_then_dpo"):
        return results

    cached = bool(config.ref.cache) and losses.uses_reference(config.loss.name, build.loss_params(config))
    if cached:  # π_ref's log-probs ride in the batches; its params are dropped (the policy takes their buffers)
        run = use_reference_cache(run, tokenizer, params)
        params, results["dpo_initial"], results["dpo"] = train_stage(run, "dpo", params, None, True, donate_params=True)
    else:  # Frozen: the step never updates it, and it is no part of the train state.
        ref_params = build.reference_params(params, config.model.reference_dtype)
        params, results["dpo_initial"], results["dpo"] = train_stage(run, "dpo", params, ref_params, True)
    run.signals.stop(f"dpo step {config.dpo.num_steps}, the end of the stage (saved)")
    if run.evaluator is not None:
        if "samples/kl" not in results["dpo"]:  # the stage held no π_ref (cached, or a loss without one): π_ref
            start = _dpo_start_params(run, None, tokenizer)  # again, from where the stage's start came from
            ref_params = build.reference_params(start, config.model.reference_dtype)
            for key, p in (("dpo_initial", start), ("dpo", params)):
                results[key]["samples/kl"] = run.evaluator(p, ref_params)[0]["kl"]
        results["samples"] = {
            who: {name.removeprefix("samples/"): value for name, value in results[key].items()
                  if name.startswith("samples/")}
            for who, key in (("reference", "dpo_initial"), ("policy", "dpo"))
        }
    print(before_after_table(results))
    return results


def _dpo_start_params(run: RunContext, params: Any, tokenizer=None) -> Any:
    """The params DPO starts from, which are π_ref: the SFT stage's final ones (mode sft_then_dpo, read back from
    this workdir), dpo.reference_workdir's, or else `params` (config.model's; rebuilt when None)."""
    config = run.config
    workdir = run.workdir if config.mode == "sft_then_dpo" else config.dpo.reference_workdir
    if run.lora_base is not None and params is not None:  # the base with its adapters, built at the start
        return params
    if workdir:
        abstract = sharding.abstract_params(models.abstract_model(run.model_config)[1], run.family, run.mesh)
        with user_errors("config.dpo.reference_workdir" if workdir != run.workdir else "the sft stage's checkpoint"):
            return checkpoint.load_final_params(workdir, "sft", abstract)
    if params is None:
        params = build.build_model(config, tokenizer, run.mesh)[1]
    elif not config.model.path:
        logging.warning("mode=dpo without dpo.reference_workdir or model.path: π_ref is a random model")
    return params


def reference_key(run: RunContext, tokenizer, params: Any) -> dict[str, str]:
    """The reference cache key of this run's data, tokenizer, length settings and π_ref (`params`, the DPO start)."""
    config = run.config
    lengths = {k: config.data[k] for k in ("max_length", "max_prompt_length", "truncation_mode")}
    return reference_cache.cache_key(
        data=run.data.fingerprint, tokenizer=reference_cache.tokenizer_fingerprint(tokenizer), lengths=lengths,
        reference=(reference_cache.params_fingerprint(params) if run.lora_base is None
                   else run.lora_base["fingerprint"]), reference_dtype=config.model.reference_dtype,
        compute_dtype=run.model_config.dtype,
    )


def build_reference_cache(run: RunContext, tokenizer, params: Any) -> dict[str, str]:
    """π_ref's log-probs of every train and eval pair (one completion-only forward each, in the run's layout),
    written to ref.cache by process 0; returns the cache's key."""
    config = run.config
    key = reference_key(run, tokenizer, params)
    ref_params = (build.reference_params(params, config.model.reference_dtype) if run.lora_base is None
                  else lora.reference_params(params))
    pair_logps = make_pair_logps(run.graphdef, config.train.logprob_chunk_size)
    forward = jax.jit(lambda p, batch: pair_logps(p, batch, "reference"), out_shardings=sharding.replicated(run.mesh))
    layout = dataclasses.replace(run.data.layout, completion_only=True)
    values = {}
    for split in reference_cache.SPLITS:
        examples = getattr(run.data, split)
        batches = data.eval_batches(examples, config.train.eval_batch_size, run.data.buckets, run.data.pad_id, layout)
        values[split] = reference_cache.compute(
            (lambda batch: jax.device_get(forward(ref_params, sharding.whole_batch(batch, run.mesh)))),
            batches, len(examples))
    if sharding.is_main_process():
        reference_cache.write(config.ref.cache, key, values)
    sharding.sync_processes("reference cache written")
    return key


def use_reference_cache(run: RunContext, tokenizer, params: Any) -> RunContext:
    """`run` with its train and eval examples carrying π_ref's cached log-probs: ref.cache read (built first if
    absent), refused with StaleReferenceCache if its key is not this run's."""
    directory = run.config.ref.cache
    if reference_cache.exists(directory):
        with user_errors("config.ref.cache"):
            reference_cache.check_key(directory, reference_key(run, tokenizer, params))
        logging.info("π_ref's log-probs from %s", directory)
    else:
        logging.info("ref.cache %s is absent: computing π_ref's log-probs over the train and eval pairs", directory)
        build_reference_cache(run, tokenizer, params)
    attached = {split: reference_cache.attach(directory, split, getattr(run.data, split))
                for split in reference_cache.SPLITS}
    return dataclasses.replace(run, data=dataclasses.replace(run.data, **attached))


def before_after_table(summary: dict) -> str:
    """π_ref (before DPO) against the DPO policy (after) on held-out pairs and, if sampled, on samples."""
    before, after, samples = summary["dpo_initial"], summary["dpo"], summary.get("samples")
    rows = [
        ("eval reward accuracy", before["rewards/accuracies"], after["rewards/accuracies"]),
        ("eval mean margin", before["rewards/margins"], after["rewards/margins"]),
    ]
    if samples and "reward" in samples["policy"]:
        rows.append(("reward of samples", samples["reference"]["reward"], samples["policy"]["reward"]))
    if samples:
        rows.append(("KL(policy || reference) of samples", samples["reference"]["kl"], samples["policy"]["kl"]))
    lines = [f"{'':36s}{'before (reference)':>20s}{'after (DPO)':>14s}"]
    lines += [f"{name:36s}{initial:>20.3f}{final:>14.3f}" for name, initial, final in rows]
    return "\n".join(lines)
