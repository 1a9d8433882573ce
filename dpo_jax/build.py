"""Every config → object constructor of a run, below the loop that uses them (run.py), the dry run and the
evaluation command: the mesh, the model and π_ref, the data, the compiled steps of a stage and the sample evaluator.

Each is a function of the config (and what an earlier one built), so a test, a notebook or a benchmark builds
exactly the pieces a run would.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dpo_jax import config as config_lib
from dpo_jax import checkpoint, data, lora, losses, models, reference_cache, rewards, sharding
from dpo_jax.optimizer import make_optimizer
from dpo_jax.perplexity import PerplexityCheck
from dpo_jax.sample_eval import SampleEvaluator
from dpo_jax.sampling import SamplingSettings
from dpo_jax.step import ReferenceSync, StepShardings, TrainState, make_eval_step, make_loss_fn, make_train_step

STAGE_DATA_STREAMS = {"sft": 0, "dpo": 1}  # each stage's batch order: seed + this


@dataclasses.dataclass
class RunData:
    """A run's tokenised data: the train and eval examples, the eval prompts for sampling, and how batches pad."""

    train: data.Examples
    eval: data.Examples
    prompt_tokens: np.ndarray  # [N, max_prompt_length], right-padded
    prompt_lengths: np.ndarray  # [N]
    buckets: tuple[int, ...]
    pad_id: int
    layout: data.Layout
    fingerprint: str = ""  # of the records (for a reference cache's key; computed only when ref.cache is set)


def stages_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The stages the config's mode trains, in order (precompute_ref prepares the DPO stage's reference)."""
    return {"sft": ("sft",), "dpo": ("dpo",), "sft_then_dpo": ("sft", "dpo"), "precompute_ref": ("dpo",),
            "iterative_dpo": ("dpo",)}[config.mode]


def stage_loss(config: ml_collections.ConfigDict, stage: str) -> str:
    """The loss `stage` trains with: Preferred-FT's likelihood for 'sft', the configured loss for 'dpo'."""
    return "sft" if stage == "sft" else config.loss.name


def loss_params(config: ml_collections.ConfigDict) -> losses.LossParams:
    """The loss hyper-parameters of `config.loss` (all but its name)."""
    fields = config.loss.to_dict()
    fields.pop("name")
    return losses.LossParams(**fields)


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


def model_config_of(config: ml_collections.ConfigDict, vocab_size: int) -> Any:
    """The architecture to train, without allocating it: `config.model.config_path`'s or `config.model.path`'s
    config.json, or a random model of `config.model`'s family and sizes (vocabulary `vocab_size`); compute dtype,
    remat and scan_layers from `config.model`."""
    if config.model.config_path:  # the architecture alone (the dry run): no checkpoint read
        return dataclasses.replace(models.read_hf_config(config.model.config_path, config.model.dtype),
                                   remat=config.model.remat, scan_layers=config.model.scan_layers)
    if not config.model.path:
        return models.config_from_section(config.model, vocab_size=vocab_size)
    defaults = config_lib.base_config().model
    kept = ("path", "dtype", "reference_dtype", "remat", "scan_layers", "lora")
    ignored = sorted(k for k in config.model if k not in kept and config.model[k] != defaults.get(k))
    if ignored:
        logging.warning("model.path is set, so config.model.%s are ignored: the checkpoint's config.json "
                        "defines the architecture", ", ".join(ignored))
    return dataclasses.replace(models.read_hf_config(config.model.path, config.model.dtype), remat=config.model.remat,
                               scan_layers=config.model.scan_layers)


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
        _, params, _ = models.load_hf(config.model.path, shardings=lambda path, _: by_path[path],
                                      scan_layers=model_config.scan_layers)
    else:
        def init():
            return models.split_params(models.model_from_config(model_config, nnx.Rngs(config.seed)))[1]

        # Compiled straight onto the shardings; on one device eagerly, op by op, which keeps the exact values a
        # single-device run has always had (compiled, XLA fuses the initialisers and the last bit can differ).
        params = jax.device_put(init(), shardings) if mesh.size == 1 else jax.jit(init, out_shardings=shardings)()
    logging.info("model: %s", model_config)
    return graphdef, params, model_config


def sft_params(workdir: str, model_config: Any, mesh: jax.sharding.Mesh) -> Any:
    """The final params of `workdir`'s SFT stage, on their shardings (a DPO run's π_ref, or a LoRA run's base)."""
    family = models.family_of(model_config).name
    abstract = sharding.abstract_params(models.abstract_model(model_config)[1], family, mesh)
    return checkpoint.load_final_params(workdir, "sft", abstract)


def attach_lora(config: ml_collections.ConfigDict, graphdef: Any, params: Any, family: str,
                mesh: jax.sharding.Mesh) -> tuple[Any, Any, str]:
    """`config.model.lora`'s adapted model of (graphdef, params): (its graphdef, its params — the base, quantised as
    asked, and the adapters — on their shardings, the base's fingerprint, which its checkpoints record)."""
    settings = lora.LoraSettings.from_config(config.model.lora)
    fingerprint = lora.base_fingerprint(params, settings)
    graphdef, base, adapters = lora.attach(graphdef, params, settings, config.seed)
    params = lora.combine(base, adapters)
    logging.info("LoRA: %d adapter and %d base parameters", sum(x.size for x in jax.tree.leaves(adapters)),
                 sum(x.size for x in jax.tree.leaves(base)))
    return graphdef, jax.device_put(params, sharding.tree_shardings(params, family, mesh)), fingerprint


def reference_params(params: Any, dtype: str) -> Any:
    """π_ref as stored: `params` themselves, or a copy cast to `dtype` (bfloat16 halves its memory; the model still
    computes in its compute dtype and log-probs stay float32), on the same shardings."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=jax.tree.map(lambda x: x.sharding, params))(params)


def build_data(config: ml_collections.ConfigDict, tokenizer) -> RunData:
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
        download=config.data.download, raw_dir=config.data.raw_dir, columns=config.data.columns.to_dict(),
        **{key: config.data[key] for key in ("hf_config", "hf_split", "hf_eval_split", "hf_revision", "hf_cache_dir")},
    )
    # A mixture's sources are read and scanned one by one (num_*_pairs caps each), then concatenated (mixture.py).
    parts = tuple(config.data.mixture) if config.data.source == "mixture" else ((config.data.source, 1.0),)
    splits, records = {}, {}
    for split, num_records in (("train", config.data.num_train_pairs), ("eval", config.data.num_eval_pairs)):
        scanned, records[split] = [], []
        for spec, weight in parts:
            part = data.load_split(spec, split, num_records=num_records, **source)
            records[split].extend(part)
            scanned.append((spec, weight, data.scan(
                part, tokenizer, strict=config.data.strict, name=f"{spec}/{split}", num_threads=config.data.num_threads,
                **settings)))
        splits[split] = scanned[0][2] if config.data.source != "mixture" else data.concatenate(scanned)
    for stage in stages_of(config):
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
    return RunData(
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
    """How the config's batches lay out pairs: train.pack, train.logprobs = completion_only, and for packed rows
    their count a multiple of this process's data-parallel devices (so the rows split evenly over them)."""
    data_parallel, fsdp, _ = sharding.mesh_shape(config.mesh, jax.device_count())
    row_multiple = max(1, data_parallel * fsdp // jax.process_count())
    return data.Layout(config.train.pack, completion_only=config.train.logprobs == "completion_only",
                       row_multiple=row_multiple if config.train.pack == "packed" else 1)


def examples_for(loss_name: str, examples: data.Examples, source: str = "the data") -> data.Examples:
    """The examples a loss trains on: as they are, or pairs split into desirable/undesirable ones for KTO."""
    if losses.takes(loss_name, examples.paired):
        return examples
    if examples.paired:
        return data.split_pairs(examples)
    raise ValueError(f"loss {loss_name!r} needs paired data (chosen and rejected); {source} gives unpaired records")


def train_batches(config: ml_collections.ConfigDict, stage: str, run_data: RunData, loss_name: str) -> data.TrainBatches:
    """This process's endless, resumable training batches of `stage` (its own seeded order: STAGE_DATA_STREAMS)."""
    return data.TrainBatches(
        examples_for(loss_name, run_data.train), batch_size=config.train.batch_size,
        seed=config.seed + STAGE_DATA_STREAMS[stage], buckets=run_data.buckets, pad_id=run_data.pad_id,
        process_index=jax.process_index(), process_count=jax.process_count(), layout=run_data.layout,
    )


def reference_sync(config: ml_collections.ConfigDict, stage: str) -> ReferenceSync | None:
    """TR-DPO's π_ref updates of `stage` (ref.sync_every, ref.mixup_alpha), None where π_ref stays frozen."""
    if stage != "dpo" or not config.ref.sync_every:
        return None
    return ReferenceSync(config.ref.sync_every, config.ref.mixup_alpha)


def stage_steps(
    config: ml_collections.ConfigDict, stage: str, graphdef: Any, family: str, mesh: Any, params: Any, ref_params: Any,
) -> tuple[Callable, StepShardings, Callable, Callable]:
    """(create_state, shardings, train step, eval step) of `stage` for `mesh`, from params or their shapes: state and
    π_ref (None: a loss without reference) sharded by the partition rules, batches over the data axes.
    `create_state(params, reference)` takes π_ref too when it moves with the state (TR-DPO), else None."""
    loss_name = stage_loss(config, stage)
    tx, schedule = make_optimizer(config.optimizer, config[stage])
    sync = reference_sync(config, stage)

    def create_state(p, reference=None):
        return TrainState.create(p, tx, losses.init_loss_state(loss_name), reference)

    moving_reference = ref_params if sync is not None else None
    shardings = StepShardings(
        state=sharding.tree_shardings(jax.eval_shape(create_state, params, moving_reference), family, mesh),
        ref_params=None if ref_params is None else sharding.tree_shardings(ref_params, family, mesh),
        batch=sharding.batch_sharding(mesh),
        replicated=sharding.replicated(mesh),
    )
    loss_fn = make_loss_fn(graphdef, loss_name, loss_params(config), config.train.logprob_chunk_size)
    if config.model.lora.enabled:  # of (adapters, base): the policy with the adapters, π_ref without
        loss_fn = lora.wrap_loss_fn(loss_fn)
    train_step = make_train_step(loss_fn, tx, schedule, config.train.grad_accum_steps, shardings, sync)
    return create_state, shardings, train_step, make_eval_step(loss_fn, shardings)


def compile_stage(
    config: ml_collections.ConfigDict, stage: str, graphdef: Any, family: str, mesh: jax.sharding.Mesh, params: Any,
    ref_params: Any, donate_params: bool = False,
) -> tuple[TrainState, Callable, Callable]:
    """(initial TrainState on its shardings, train step, eval step) of `stage`, compiled for `mesh`. With
    `donate_params` the state takes over `params`' buffers (they are deleted) instead of copying them. TR-DPO's
    moving π_ref starts as a copy of `ref_params`, which stay the stage's initial π_ref."""
    create_state, shardings, train_step, eval_step = stage_steps(
        config, stage, graphdef, family, mesh, params, ref_params)
    reference = None
    if reference_sync(config, stage) is not None:
        reference = jax.tree.map(jnp.copy, ref_params)
    if donate_params:
        state = jax.jit(create_state, out_shardings=shardings.state, donate_argnums=0)(params, reference)
    else:  # A copy: the step donates the state's buffers, and `params` may be π_ref's own.
        state = jax.jit(create_state, out_shardings=shardings.state)(jax.tree.map(jnp.copy, params), reference)
    return state, train_step, eval_step


def make_perplexity(config: ml_collections.ConfigDict, graphdef: Any, tokenizer,
                    mesh: jax.sharding.Mesh) -> PerplexityCheck | None:
    """The forgetting check of eval.perplexity_path (None without one): its text in windows of data.max_length."""
    if not config.eval.perplexity_path:
        return None
    tokens, mask = data.text_windows(config.eval.perplexity_path, tokenizer, config.data.max_length,
                                     config.eval.perplexity_windows, config.data.hf_cache_dir)
    return PerplexityCheck(graphdef, tokens, mask, batch_size=config.train.eval_batch_size,
                           chunk_size=config.train.logprob_chunk_size, mesh=mesh)


def make_evaluator(config: ml_collections.ConfigDict, graphdef: Any, run_data: RunData, tokenizer,
                   mesh: jax.sharding.Mesh) -> SampleEvaluator | None:
    """What evaluates samples of the config's eval prompts (None without any): its `eval` settings and reward."""
    if not len(run_data.prompt_lengths):
        return None
    return SampleEvaluator(
        graphdef, run_data.prompt_tokens, run_data.prompt_lengths, tokenizer,
        settings=SamplingSettings.from_config(config.eval),
        reward=rewards.make_reward(config.eval.reward, config.data.source),
        rng=jax.random.key(config.seed), batch_size=config.train.eval_batch_size, mesh=mesh,
        chunk_size=config.train.logprob_chunk_size,
    )
