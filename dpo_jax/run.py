"""The loop around the pure step: build the model and data, run each stage (resuming what the workdir holds),
log, checkpoint, evaluate, and keep the run safe: one process per workdir, preemption saves the current step,
non-finite steps are skipped and limited, failed saves are retried, corrupt checkpoints are stepped past.

What stops a run, and its exit status, is in errors.py; the faults and the tests that inject them are in
docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from dpo_jax import checkpoint, data, evaluate, losses, models, reference_cache, rewards, sharding
from dpo_jax import config as config_lib
from dpo_jax.errors import NonFiniteTraining, user_errors
from dpo_jax.guards import PreemptionSignals, WorkdirLock
from dpo_jax.metrics_writer import MetricsWriter, NullWriter, plot_training_curves
from dpo_jax.optimizer import make_optimizer
from dpo_jax.sampling import SamplingSettings
from dpo_jax.step import (
    StepShardings, TrainState, make_eval_step, make_loss_fn, make_sequence_logps, make_train_step,
)

STAGE_DATA_STREAMS = {"sft": 0, "dpo": 1}  # each stage's batch order: seed + this
DATA_REPORT = "data_report.json"  # what the scan of each split kept, truncated and skipped (with origins)


@dataclasses.dataclass
class Data:
    """A run's tokenised data: the train and eval examples, the eval prompts for sampling, and how batches pad."""

    train: data.Examples
    eval: data.Examples
    prompt_tokens: np.ndarray  # [N, max_prompt_length], right-padded
    prompt_lengths: np.ndarray  # [N]
    buckets: tuple[int, ...]
    pad_id: int
    layout: data.Layout
    fingerprint: str = ""  # of the records (for a reference cache's key; computed only when ref.cache is set)


@dataclasses.dataclass
class Run:
    """What every stage of one run shares."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: Any
    model_config: Any
    data: Data
    writer: MetricsWriter | NullWriter  # process 0 writes metrics; the others a NullWriter
    signals: PreemptionSignals
    evaluator: evaluate.SampleEvaluator | None = None  # samples at each evaluation (None: data.num_eval_prompts = 0)

    @property
    def family(self) -> str:
        return models.family_of(self.model_config).name


def examples_for(loss_name: str, examples: data.Examples, source: str = "the data") -> data.Examples:
    """The examples a loss trains on: as they are, or pairs split into desirable/undesirable ones for KTO."""
    if losses.takes(loss_name, examples.paired):
        return examples
    if examples.paired:
        return data.split_pairs(examples)
    raise ValueError(f"loss {loss_name!r} needs paired data (chosen and rejected); {source} gives unpaired records")


def evaluate_pairs(
    eval_step: Callable, params: Any, ref_params: Any, examples: data.Examples, batch_size: int, run_data: Data,
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
    """Metrics over every held-out example exactly once (padding rows carry weight 0)."""
    totals: dict[str, float] = {}
    weight_total = 0.0
    for batch in data.eval_batches(examples, batch_size, run_data.buckets, run_data.pad_id, run_data.layout):
        metrics, weight = jax.device_get(eval_step(params, ref_params, sharding.whole_batch(batch, mesh)))
        weight_total += float(weight)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * float(weight)
    return {name: total / weight_total for name, total in totals.items()}


class NonFiniteSteps:
    """Counts the steps the train step skipped for a non-finite loss or gradient, reading each step's flag only
    once the device has moved on (so the host never waits), and stops the run after `limit` in a row."""

    def __init__(self, stage: str, limit: int, total: int = 0):
        self.stage, self.limit, self.total = stage, limit, total
        self.in_a_row = 0
        self._unread: list[tuple[int, jax.Array]] = []

    def add(self, step: int, skipped: jax.Array) -> None:
        """Record step `step`'s `skipped` flag (a device scalar) for a later `settle`."""
        self._unread.append((step, skipped))

    def settle(self, keep_latest: bool = False) -> None:
        """Read the recorded flags (all but the newest with `keep_latest`); log skips; raise past the limit."""
        ready = self._unread[:-1] if keep_latest else self._unread
        self._unread = self._unread[len(ready):]
        for step, flag in zip([s for s, _ in ready], jax.device_get([f for _, f in ready])):
            if not flag:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.total += 1
            logging.warning("%s step %d: loss or gradient not finite; the step was skipped (params and optimizer "
                            "state unchanged), %d in a row", self.stage, step, self.in_a_row)
            if self.in_a_row >= self.limit:
                raise NonFiniteTraining(
                    f"{self.stage}: {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}) had a "
                    f"non-finite loss or gradient (train.max_nonfinite_steps = {self.limit}); stopping. No "
                    "checkpoint was written during them: lower the learning rate and rerun to resume from the last"
                )


def stage_steps(
    config: ml_collections.ConfigDict, stage: str, graphdef: Any, family: str, mesh: Any, params: Any, ref_params: Any,
) -> tuple[Callable, StepShardings, Callable, Callable]:
    """(create_state, shardings, train step, eval step) of `stage` for `mesh`, from params or their shapes: state and
    π_ref (None: a loss without reference) sharded by the partition rules, batches over the data axes."""
    loss_name = stage_loss(config, stage)
    tx, schedule = make_optimizer(config.optimizer, config[stage])

    def create_state(p):
        return TrainState.create(p, tx)

    shardings = StepShardings(
        state=sharding.tree_shardings(jax.eval_shape(create_state, params), family, mesh),
        ref_params=None if ref_params is None else sharding.tree_shardings(ref_params, family, mesh),
        batch=sharding.batch_sharding(mesh),
        replicated=sharding.replicated(mesh),
    )
    loss_fn = make_loss_fn(graphdef, loss_name, loss_params(config), config.train.logprob_chunk_size)
    train_step = make_train_step(loss_fn, tx, schedule, config.train.grad_accum_steps, shardings)
    return create_state, shardings, train_step, make_eval_step(loss_fn, shardings)


def compile_stage(
    config: ml_collections.ConfigDict, stage: str, graphdef: Any, family: str, mesh: jax.sharding.Mesh, params: Any,
    ref_params: Any, donate_params: bool = False,
) -> tuple[TrainState, Callable, Callable]:
    """(initial TrainState on its shardings, train step, eval step) of `stage`, compiled for `mesh`. With
    `donate_params` the state takes over `params`' buffers (they are deleted) instead of copying them."""
    create_state, shardings, train_step, eval_step = stage_steps(
        config, stage, graphdef, family, mesh, params, ref_params)
    if donate_params:
        state = jax.jit(create_state, out_shardings=shardings.state, donate_argnums=0)(params)
    else:  # A copy: the step donates the state's buffers, and `params` may be π_ref's own.
        state = jax.jit(create_state, out_shardings=shardings.state)(jax.tree.map(jnp.copy, params))
    return state, train_step, eval_step


def train_stage(
    run: Run, stage: str, params: Any, ref_params: Any, evaluate_start: bool = False, donate_params: bool = False,
) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Run (or resume) one stage, 'sft' or 'dpo', to its last step (`donate_params`: the stage takes `params`'
    buffers over; no copy of them stays in device memory).

    Returns (final params, eval metrics of the initial params if `evaluate_start` else {}, final eval metrics).
    """
    config, stage_config = run.config, run.config[stage]
    loss_name = stage_loss(config, stage)
    if not losses.uses_reference(loss_name, loss_params(config)):
        ref_params = None
    state, train_step, eval_step = compile_stage(
        config, stage, run.graphdef, run.family, run.mesh, params, ref_params, donate_params)
    batch_size, data_seed = config.train.batch_size, config.seed + STAGE_DATA_STREAMS[stage]
    train_examples = examples_for(loss_name, run.data.train)
    eval_examples = examples_for(loss_name, run.data.eval)
    batches = data.TrainBatches(
        train_examples, batch_size=batch_size, seed=data_seed, buckets=run.data.buckets, pad_id=run.data.pad_id,
        process_index=jax.process_index(), process_count=jax.process_count(), layout=run.data.layout,
    )

    def evaluate_params(p, step):
        """Held-out pair metrics; with an evaluator, also samples' means (`samples/...`), the samples written."""
        metrics = evaluate_pairs(eval_step, p, ref_params, eval_examples, config.train.eval_batch_size, run.data,
                                 run.mesh)
        if run.evaluator is not None:
            sample_means, records = run.evaluator(p, ref_params if stage == "dpo" else None)
            metrics.update({f"samples/{name}": value for name, value in sample_means.items()})
            run.writer.write_samples(stage, step, records)
        return metrics

    # The state starts from `params`; for DPO these are π_ref's, so its step-0 samples are π_ref's.
    initial_eval = evaluate_params(state.params, 0) if evaluate_start else {}
    checkpoints = checkpoint.StageCheckpoints(
        run.workdir, stage, config.train.keep_checkpoints, config.train.max_save_failures
    )
    progress = None
    try:
        restored = checkpoints.restore(checkpoint.abstract(state))
        nonfinite = NonFiniteSteps(stage, config.train.max_nonfinite_steps)
        data_state = None
        if restored is not None:
            state, meta = restored
            data_state = meta["data_state"]
            nonfinite.total = meta.get("skipped_steps", 0)
            logging.info("%s: resumed from step %d (data position %d)", stage, int(state.step), meta["data_position"])
            changes = config_lib.changed_keys(meta["config"], config.to_dict())
            if changes:
                logging.warning("%s: resuming a run whose config differed: %s", stage, "; ".join(changes))
        first_step, num_steps = int(state.step), stage_config.num_steps
        writer = run.writer
        writer.truncate(stage, first_step)  # what a killed run logged after its checkpoint is logged again
        train_iterator = batches.iterator(data_state)

        def save(step):
            meta = {
                "stage": stage,
                "data_position": step * batch_size,
                "data_seed": data_seed,
                "data_state": train_iterator.get_state(),  # Grain's: where the next batch comes from
                "rng_seed": config.seed,
                "skipped_steps": nonfinite.total,
                "config": config.to_dict(),
                "model": models.config_to_dict(run.model_config),  # the architecture, so a checkpoint exports alone
            }
            checkpoints.save(step, state, meta)

        eval_metrics: dict[str, float] = {}
        progress = tqdm(range(first_step, num_steps), initial=first_step, total=num_steps, desc=stage,
                        disable=not (config.train.progress_bar and is_main_process()), dynamic_ncols=True)
        last_time, last_step = time.perf_counter(), first_step
        for step in progress:
            batch = sharding.global_batch(next(train_iterator), run.mesh)
            state, metrics = train_step(state, ref_params, batch)
            done = step + 1
            nonfinite.add(done, metrics["skipped"])
            nonfinite.settle(keep_latest=True)  # earlier steps' flags: the device is busy with this one
            checkpoints.poll()
            stop_now = run.signals.should_stop(stage, done)  # once: a signal during this step's logging stops next
            log_now = done % config.train.log_every == 0 or done == num_steps
            save_now = done % config.train.checkpoint_every == 0 or done == num_steps or stop_now
            if not (log_now or save_now):
                continue
            nonfinite.settle()
            if log_now:
                host = {name: float(value) for name, value in jax.device_get(metrics).items()}
                now = time.perf_counter()
                host["examples_per_second"] = (done - last_step) * batch_size / (now - last_time)
                host["skipped_steps"] = float(nonfinite.total)
                if done % config.train.eval_every == 0 or done == num_steps:
                    eval_metrics = evaluate_params(state.params, done)
                    host.update({f"eval/{k}": v for k, v in eval_metrics.items()})
                writer.write(stage, done, host)
                progress.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['rewards/accuracies']:.2f}",
                                     margin=f"{host['rewards/margins']:.3f}")
                last_time, last_step = time.perf_counter(), done  # Eval and I/O time stay out of the rate.
            if save_now:
                if nonfinite.in_a_row:  # params are those of the last finite step; its data position is earlier
                    logging.warning("%s step %d: not saved, its step was skipped as non-finite", stage, done)
                else:
                    save(done)
            if stop_now:
                checkpoints.wait()
                writer.flush()
                run.signals.stop(f"{stage} step {done} (resumes from {stage} step {checkpoints.latest_step()})")
        checkpoints.wait()
    finally:  # Also when interrupted: complete and report the save in flight.
        if progress is not None:
            progress.close()
        checkpoints.close()

    if not eval_metrics:  # Resumed at the end: nothing ran, evaluate the restored params.
        eval_metrics = evaluate_params(state.params, int(state.step))
    return state.params, initial_eval, eval_metrics


def stage_loss(config: ml_collections.ConfigDict, stage: str) -> str:
    """The loss `stage` trains with: Preferred-FT's likelihood for 'sft', the configured loss for 'dpo'."""
    return "sft" if stage == "sft" else config.loss.name


def loss_params(config: ml_collections.ConfigDict) -> losses.LossParams:
    """The loss hyper-parameters of `config.loss` (all but its name)."""
    fields = config.loss.to_dict()
    fields.pop("name")
    return losses.LossParams(**fields)


def model_config_of(config: ml_collections.ConfigDict, vocab_size: int) -> Any:
    """The architecture to train, without allocating it: `config.model.path`'s config.json, or a random model of
    `config.model`'s family and sizes (vocabulary `vocab_size`); compute dtype and remat from `config.model`."""
    if not config.model.path:
        return models.config_from_section(config.model, vocab_size=vocab_size)
    defaults = config_lib.base_config().model
    ignored = sorted(k for k in config.model if k not in ("path", "dtype", "reference_dtype", "remat")
                     and config.model[k] != defaults.get(k))
    if ignored:
        logging.warning("model.path is set, so config.model.%s are ignored: the checkpoint's config.json "
                        "defines the architecture", ", ".join(ignored))
    return dataclasses.replace(models.read_hf_config(config.model.path, config.model.dtype), remat=config.model.remat)


def build_model(config: ml_collections.ConfigDict, tokenizer, mesh: jax.sharding.Mesh) -> tuple[Any, Any, Any]:
    """(graphdef, float32 params, model config) to start from, each parameter created or loaded straight onto its
    sharding (never whole on one device): the checkpoint at `config.model.path`, or a random model."""
    model_config = model_config_of(config, tokenizer.vocab_size)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer {config.data.tokenizer!r} has {tokenizer.vocab_size} ids but the model's vocabulary has "
            f"{model_config.vocab_size}: its ids would index past the embedding table"
        )
    graphdef, abstract = models.abstract_model(model_config)
    shardings = sharding.tree_shardings(abstract, models.family_of(model_config).name, mesh)
    if config.model.path:
        by_path = {models.param_path(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
        _, params, _ = models.load_hf(config.model.path, shardings=lambda path, _: by_path[path])
    else:
        def init():
            return models.split_params(models.model_from_config(model_config, nnx.Rngs(config.seed)))[1]

        # Compiled straight onto the shardings; on one device eagerly, op by op, which keeps the exact values a
        # single-device run has always had (compiled, XLA fuses the initialisers and the last bit can differ).
        params = jax.device_put(init(), shardings) if mesh.size == 1 else jax.jit(init, out_shardings=shardings)()
    logging.info("model: %s", model_config)
    return graphdef, params, model_config


def reference_params(params: Any, dtype: str) -> Any:
    """π_ref as stored: `params` themselves, or a copy cast to `dtype` (bfloat16 halves its memory; the model still
    computes in its compute dtype and log-probs stay float32), on the same shardings."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


def build_data(config: ml_collections.ConfigDict, tokenizer) -> Data:
    """The config's data: each split's records from its source, scanned (tokenised once; bad records skipped and
    counted, or with data.strict stopping the run), the eval prompts for sampling, and the length buckets."""
    settings = dict(
        max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length,
        truncation_mode=config.data.truncation_mode,
    )
    source = dict(
        seed=config.seed, path=config.data.path, eval_path=config.data.eval_path,
        eval_fraction=config.data.eval_fraction, tfds_data_dir=config.data.tfds_data_dir,
        download=config.data.download, raw_dir=config.data.raw_dir,
    )
    splits, records = {}, {}
    for split, num_records in (("train", config.data.num_train_pairs), ("eval", config.data.num_eval_pairs)):
        records[split] = data.load_split(config.data.source, split, num_records=num_records, **source)
        splits[split] = data.scan(
            records[split], tokenizer, strict=config.data.strict, name=f"{config.data.source}/{split}",
            num_threads=config.data.num_threads, **settings,
        )
    for stage in _stages(config):
        loss_name = stage_loss(config, stage)
        for split, batch_size, key in (("train", config.train.batch_size, "batch_size"),
                                       ("eval", config.train.eval_batch_size, "eval_batch_size")):
            examples = examples_for(loss_name, splits[split], f"data.source = {config.data.source!r}")
            if batch_size > len(examples):
                raise ValueError(f"config.train.{key} = {batch_size} is more than the {len(examples)} {split} "
                                 f"examples of data.source = {config.data.source!r}")
    prompts = list(dict.fromkeys(tuple(e["prompt"].tolist()) for e in splits["eval"].encoded))
    prompts = prompts[: config.data.num_eval_prompts]
    prompt_tokens = np.full((len(prompts), config.data.max_prompt_length), tokenizer.pad_token_id, np.int32)
    for i, prompt in enumerate(prompts):
        prompt_tokens[i, : len(prompt)] = prompt
    return Data(
        train=splits["train"], eval=splits["eval"], prompt_tokens=prompt_tokens,
        prompt_lengths=np.asarray([len(p) for p in prompts], np.int32),
        buckets=buckets_of(config),
        pad_id=tokenizer.pad_token_id,
        layout=layout_of(config),
        fingerprint=reference_cache.records_fingerprint(records) if config.ref.cache else "",
    )


def buckets_of(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The padded row lengths of the config's batches (data.length_buckets for its max_length, buckets and pack)."""
    return data.length_buckets(config.data.max_length, tuple(config.data.length_buckets), config.train.pack)


def layout_of(config: ml_collections.ConfigDict) -> data.Layout:
    """How the config's batches lay out pairs: train.pack, and train.logprobs = completion_only."""
    return data.Layout(config.train.pack, completion_only=config.train.logprobs == "completion_only")


def _stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return {"sft": ("sft",), "dpo": ("dpo",), "sft_then_dpo": ("sft", "dpo"), "precompute_ref": ("dpo",)}[config.mode]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the config's mode in `workdir` (resuming what is there); write summary.json and the plot.

    Raises errors.RunStopped subclasses for the stops the CLI reports in one line: UserError (bad config, data,
    checkpoint or a workdir in use), NonFiniteTraining, CheckpointSaveFailed, Preempted (after saving).
    """
    config_lib.validate(config)
    if config.dry_run:  # shapes only: nothing is allocated, loaded or written
        from dpo_jax import dry_run

        with user_errors("dry run"):
            text = dry_run.report(config)
        print(text)
        return {"dry_run": text}
    started = time.perf_counter()
    sharding.initialize_distributed(config.mesh.distributed)
    mesh = make_mesh(config)
    main = is_main_process()
    os.makedirs(workdir, exist_ok=True)
    # One launch per workdir: process 0 holds the lock for all of a multi-host run's processes.
    with WorkdirLock(workdir) if main else contextlib.nullcontext(), PreemptionSignals() as signals:
        if main:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
        with user_errors(f"config.data.tokenizer = {config.data.tokenizer!r}"):
            tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
        with user_errors("data"):
            run_data = build_data(config, tokenizer)
        if main:
            with open(os.path.join(workdir, DATA_REPORT), "w") as f:
                json.dump({"train": run_data.train.report, "eval": run_data.eval.report}, f, indent=2)
        with user_errors(f"config.model.path = {config.model.path!r}" if config.model.path else "config.model"):
            graphdef, params, model_config = build_model(config, tokenizer, mesh)
        writer = MetricsWriter(workdir) if main else NullWriter()
        with user_errors(f"config.eval.reward = {config.eval.reward!r}"):
            evaluator = make_evaluator(config, graphdef, run_data, tokenizer, mesh)
        run = Run(config, workdir, mesh, graphdef, model_config, run_data, writer, signals, evaluator)
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


def make_evaluator(config: ml_collections.ConfigDict, graphdef: Any, run_data: Data, tokenizer,
                   mesh: jax.sharding.Mesh) -> evaluate.SampleEvaluator | None:
    """What evaluates samples of the config's eval prompts (None without any): its `eval` settings and reward."""
    if not len(run_data.prompt_lengths):
        return None
    return evaluate.SampleEvaluator(
        graphdef, run_data.prompt_tokens, run_data.prompt_lengths, tokenizer,
        settings=SamplingSettings.from_config(config.eval),
        reward=rewards.make_reward(config.eval.reward, config.data.source),
        rng=jax.random.key(config.seed), batch_size=config.train.eval_batch_size, mesh=mesh,
        chunk_size=config.train.logprob_chunk_size,
    )


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes metrics, TensorBoard, plots, reports and the progress bar."""
    return jax.process_index() == 0


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's Mesh over every device, checked against the batch sizes it must split (ConfigError names them)."""
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from error
    rows = sharding.batch_rows(mesh)
    for key, value, size in (
        ("batch_size", config.train.batch_size, config.train.batch_size // config.train.grad_accum_steps),
        ("eval_batch_size", config.train.eval_batch_size, config.train.eval_batch_size),
    ):
        if size % rows or size % jax.process_count():
            raise config_lib.ConfigError(
                f"config.train.{key} = {value} is invalid: each (micro-)batch of {size} rows must split evenly over "
                f"mesh.data × mesh.fsdp = {rows} devices and {jax.process_count()} processes")
    logging.info("mesh: %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
    return mesh


def _run_stages(run: Run, params: Any, tokenizer) -> dict[str, Any]:
    """The config's mode: Preferred-FT, DPO, or both in turn, then samples of π_ref and the policy; or
    precompute_ref: π_ref's log-probs into ref.cache."""
    config, results = run.config, {}
    if config.mode in ("sft", "sft_then_dpo"):
        params, _, results["sft"] = train_stage(run, "sft", params, None)
        run.signals.stop(f"sft step {config.sft.num_steps}, the end of the stage (saved)")
    else:
        params = _dpo_start_params(run, params)
    if config.mode == "precompute_ref":
        started = time.perf_counter()
        key = build_reference_cache(run, tokenizer, params)
        results["reference_cache"] = {"path": config.ref.cache, "key": key, "seconds": time.perf_counter() - started,
                                      "examples": {"train": len(run.data.train), "eval": len(run.data.eval)}}
        print(f"reference log-probs of {len(run.data.train)} train and {len(run.data.eval)} eval pairs written to "
              f"{config.ref.cache} in {results['reference_cache']['seconds']:.1f} s")
    if config.mode not in ("dpo", "sft_then_dpo"):
        return results

    cached = bool(config.ref.cache) and losses.uses_reference(config.loss.name, loss_params(config))
    if cached:  # π_ref's log-probs ride in the batches; its params are dropped (the policy takes their buffers)
        run = use_reference_cache(run, tokenizer, params)
        params, results["dpo_initial"], results["dpo"] = train_stage(run, "dpo", params, None, True, donate_params=True)
    else:  # Frozen: the step never updates it, and it is no part of the train state.
        ref_params = reference_params(params, config.model.reference_dtype)
        params, results["dpo_initial"], results["dpo"] = train_stage(run, "dpo", params, ref_params, True)
    run.signals.stop(f"dpo step {config.dpo.num_steps}, the end of the stage (saved)")
    if run.evaluator is not None:
        if "samples/kl" not in results["dpo"]:  # the stage held no π_ref (cached, or a loss without one): π_ref
            start = _dpo_start_params(run, None, tokenizer)  # again, from where the stage's start came from
            ref_params = reference_params(start, config.model.reference_dtype)
            for key, p in (("dpo_initial", start), ("dpo", params)):
                results[key]["samples/kl"] = run.evaluator(p, ref_params)[0]["kl"]
        results["samples"] = {
            who: {name.removeprefix("samples/"): value for name, value in results[key].items()
                  if name.startswith("samples/")}
            for who, key in (("reference", "dpo_initial"), ("policy", "dpo"))
        }
    print(before_after_table(results))
    return results


def _dpo_start_params(run: Run, params: Any, tokenizer=None) -> Any:
    """The params DPO starts from, which are π_ref: the SFT stage's final ones (mode sft_then_dpo, read back from
    this workdir), dpo.reference_workdir's, or else `params` (config.model's; rebuilt when None)."""
    config = run.config
    workdir = run.workdir if config.mode == "sft_then_dpo" else config.dpo.reference_workdir
    if workdir:
        abstract = sharding.abstract_params(models.abstract_model(run.model_config)[1], run.family, run.mesh)
        with user_errors("config.dpo.reference_workdir" if workdir != run.workdir else "the sft stage's checkpoint"):
            return checkpoint.load_final_params(workdir, "sft", abstract)
    if params is None:
        params = build_model(config, tokenizer, run.mesh)[1]
    elif not config.model.path:
        logging.warning("mode=dpo without dpo.reference_workdir or model.path: π_ref is a random model")
    return params


def reference_key(run: Run, tokenizer, params: Any) -> dict[str, str]:
    """The reference cache key of this run's data, tokenizer, length settings and π_ref (`params`, the DPO start)."""
    config = run.config
    lengths = {k: config.data[k] for k in ("max_length", "max_prompt_length", "truncation_mode")}
    return reference_cache.cache_key(
        data=run.data.fingerprint, tokenizer=reference_cache.tokenizer_fingerprint(tokenizer), lengths=lengths,
        reference=reference_cache.params_fingerprint(params), reference_dtype=config.model.reference_dtype,
        compute_dtype=run.model_config.dtype,
    )


def build_reference_cache(run: Run, tokenizer, params: Any) -> dict[str, str]:
    """π_ref's log-probs of every train and eval pair (one completion-only forward each, in the run's layout),
    written to ref.cache by process 0; returns the cache's key."""
    config = run.config
    key = reference_key(run, tokenizer, params)
    ref_params = reference_params(params, config.model.reference_dtype)
    sequence_logps = make_sequence_logps(run.graphdef, config.train.logprob_chunk_size)
    forward = jax.jit(lambda p, batch: sequence_logps(p, batch, ("chosen", "rejected"), "reference"),
                      out_shardings=sharding.replicated(run.mesh))
    layout = dataclasses.replace(run.data.layout, completion_only=True)
    values = {}
    for split in reference_cache.SPLITS:
        examples = getattr(run.data, split)
        batches = data.eval_batches(examples, config.train.eval_batch_size, run.data.buckets, run.data.pad_id, layout)
        values[split] = reference_cache.compute(
            (lambda batch: jax.device_get(forward(ref_params, sharding.whole_batch(batch, run.mesh)))),
            batches, len(examples))
    if is_main_process():
        reference_cache.write(config.ref.cache, key, values)
    sharding.sync_processes("reference cache written")
    return key


def use_reference_cache(run: Run, tokenizer, params: Any) -> Run:
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

