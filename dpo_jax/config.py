"""The base config (the paper's defaults) and the one validation of every key.

Config files in configs/ start from `base_config()` and override what their task needs, so each
default is written once, here. `validate(config)` runs before anything is built or compiled and
names the offending key and what is allowed.
"""

from __future__ import annotations

import math
import os

import ml_collections

from dpo_jax import data, lora, losses, metrics_writer, models, rewards, sharding
from dpo_jax.errors import UserError

MODES = ("sft", "dpo", "sft_then_dpo", "precompute_ref", "iterative_dpo")
LOGPROBS = ("completion_only", "all_positions")
OPTIMIZERS = ("rmsprop", "adamw")
SCHEDULES = ("constant", "cosine")
STAGES = ("sft", "dpo")


def base_config() -> ml_collections.ConfigDict:
    """The paper's settings (Rafailov et al., 2023, App. B) and the reference code's truncation."""
    config = ml_collections.ConfigDict()
    # sft: Preferred-FT only; dpo: from an SFT checkpoint; both in turn; precompute_ref: write ref.cache and stop.
    config.mode = "sft_then_dpo"
    config.seed = 0

    # With `path` (a Hugging Face checkpoint directory or repo id), the architecture and weights come from the
    # checkpoint and only `dtype` below applies; without it, a random model of `family` with these sizes.
    config.model = ml_collections.ConfigDict(
        dict(
            path="",
            family="llama",
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            head_dim=64,
            intermediate_size=768,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_embeddings=False,
            # Params and optimizer state are always float32; `dtype` is the compute dtype (bfloat16 on TPU/GPU).
            # Log-probs and the loss are float32 either way.
            dtype="float32",
            reference_dtype="float32",  # the frozen π_ref's storage: bfloat16 halves its memory
            remat="none",  # recompute activations in the backward pass: none, block (keep matmuls), full
            # Blocks stacked and run in one lax.scan, so compile time does not grow with depth; None (auto): from
            # 8 layers on. Same weights and checkpoints either way (a checkpoint of one form restores into the other).
            scan_layers=ml_collections.config_dict.placeholder(bool),
            # A config.json (the file, or a directory holding only it) whose architecture the dry run sizes, without
            # weights or tokenizer, so a run is sized offline before its checkpoint is at hand; '' : model.path's.
            config_path="",
            # LoRA (docs/lora.md): train low-rank adapters alpha/rank·A·B on the dense layers whose module path
            # matches `targets` (a regex; '' = every dense layer of the blocks); π_ref = the base, adapters off.
            # base_quantization stores the frozen base as int8 or NF4 (QLoRA), dequantised in each matmul.
            lora=ml_collections.ConfigDict(
                dict(enabled=False, rank=16, alpha=32.0, targets="", base_quantization="none")
            ),
        )
    )
    # Devices: a Mesh of data × fsdp × tensor (-1: the rest of the devices); see sharding.py.
    config.mesh = ml_collections.ConfigDict(
        dict(
            data=1,
            fsdp=-1,
            tensor=1,
            distributed="auto",  # jax.distributed: auto (when JAX_COORDINATOR_ADDRESS is set), on, off
            device_memory_gb=0.0,  # dry_run: say whether the run fits this much memory per device (0: not asked)
        )
    )
    config.dry_run = False  # print each device's memory for params, optimizer, π_ref, activations; then exit
    config.data = ml_collections.ConfigDict(
        dict(
            # synthetic_sentiment (embedded), file (data.path), or the paper's datasets: tldr, hh, shp, imdb.
            source="synthetic_sentiment",
            tokenizer="synthetic_words",  # or "model" (the checkpoint's own), or "hf:<directory or repo id>"
            # synthetic: how many pairs to generate; other sources: the most records to read (0: all).
            num_train_pairs=4096,
            num_eval_pairs=256,
            num_eval_prompts=64,  # eval prompts sampled from at evaluation (0: no evaluation on samples)
            max_length=512,  # reference code: pairs truncated to 512 tokens ...
            max_prompt_length=256,  # ... prompts to 256, keeping the END of the prompt.
            truncation_mode="keep_end",
            path="",  # source=file: a JSONL / JSON / Parquet preference file
            eval_path="",  # source=file: held-out records; '' splits off data.eval_fraction of data.path, seeded
            eval_fraction=0.05,
            tfds_data_dir="",  # where TFDS prepares the paper's datasets ('' : ~/tensorflow_datasets)
            download=True,  # fetch raw data from its original location when not prepared yet
            raw_dir="",  # or prepare the paper's datasets from a local copy of their raw files (original layout)
            strict=False,  # a bad record stops the run (True) or is skipped and counted in data_report.json
            length_buckets=(),  # padded lengths of rows; () : max_length / 4, / 2, max_length (see data.length_buckets)
            num_threads=8,  # Grain threads tokenising the records at start
            # source = "hf:ORG/NAME": a Hugging Face Hub dataset (docs/hub_datasets.md); its config, split, held-out
            # split ('' : a seeded data.eval_fraction of hf_split), revision and cache ('' : HF_HUB_CACHE's).
            hf_config="",
            hf_split="train",
            hf_eval_split="",
            hf_revision="",
            hf_cache_dir="",
            # The source's column holding each of our fields ('' : the field's own name; a.b for a nested one).
            columns=ml_collections.ConfigDict(dict(prompt="", chosen="", rejected="", completion="", label="")),
            # source = "mixture": ((spec, weight), ...) sampled by weight (Grain's mix, seeded and resumable); a spec
            # is a source name, "hf:ORG/NAME[?split=..]" or "file:PATH" (pairs, as ConfigDict keys cannot hold dots).
            mixture=(),
        )
    )
    config.loss = ml_collections.ConfigDict(
        dict(
            name="dpo",
            beta=0.1,  # paper: 0.1 (0.5 for TL;DR)
            label_smoothing=0.0,
            reference_free=False,
            alpha=1.0,
            gamma=0.5,
            orpo_lambda=0.1,
            desirable_weight=1.0,  # kto λ_D
            undesirable_weight=1.0,  # kto λ_U
            dpop_lambda=50.0,  # dpop λ >= 0: weight of the penalty on log π(y_w) falling below π_ref's (paper: 50)
            discopop_tau=0.05,  # discopop τ > 0: temperature of its logistic/exponential mix (paper: 0.05)
            exo_epsilon=1e-3,  # exo_pair ε in (0, 1): the target's mass on the rejected completion (TRL: 1e-3)
            # LD-DPO α in [0, 1]: the policy's log-probs of tokens past the shorter completion's length weigh α
            # (TRL's ld_alpha; the paper tunes it per model, e.g. 0.5); 1: plain sums. Paired losses only.
            ld_alpha=1.0,
        )
    )
    config.optimizer = ml_collections.ConfigDict(
        dict(
            name="rmsprop",  # paper: RMSprop, as torch.optim.RMSprop defaults (decay 0.99, eps 1e-8).
            schedule="constant",  # paper: linear warmup then constant.
            max_grad_norm=10.0,
            weight_decay=0.0,
        )
    )
    # Each stage has its own length and learning rate; Preferred-FT usually wants a larger one.
    config.sft = ml_collections.ConfigDict(dict(num_steps=1000, learning_rate=1e-6, warmup_steps=150))
    config.dpo = ml_collections.ConfigDict(
        dict(
            num_steps=1000,
            learning_rate=1e-6,
            warmup_steps=150,
            # mode=dpo: the workdir of an SFT run (its sft/checkpoints) whose final params become
            # both π_ref and the policy's start. Empty: the freshly initialised params.
            reference_workdir="",
        )
    )
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=64,  # pairs per optimizer step (paper: 64)
            grad_accum_steps=1,  # micro-batches per step; same update as the full batch
            eval_batch_size=64,
            log_every=10,
            eval_every=100,
            checkpoint_every=100,
            keep_checkpoints=2,
            logprob_chunk_size=128,  # positions per logits chunk: bounds [B, chunk, V] memory
            # shared_prompt: a row [prompt | chosen | rejected] per pair, the prompt run once; packed: several such
            # pairs in each row of 2 · max_length tokens (no padding between them); none: a row per completion.
            # completion_only: the LM head runs at completion tokens only; all_positions: everywhere.
            pack="shared_prompt",
            logprobs="completion_only",
            progress_bar=True,
            # Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
            max_nonfinite_steps=10,
            # A failed checkpoint save is retried at the next interval; this many in a row stop the run.
            max_save_failures=3,
            # Tracking backends written from metrics.jsonl (docs/tracking.md): tensorboard, wandb (pip install
            # 'dpo_jax[wandb]'; the run id is kept with the checkpoints, so a resumed run continues its W&B run).
            loggers=("tensorboard",),
            wandb_project="dpo_jax",
            wandb_entity="",  # '' : W&B's default entity
        )
    )
    # π_ref's log-probs cached in a directory (written by mode=precompute_ref, or by the first DPO run that finds it
    # absent): the DPO stage then skips π_ref's forward and holds no π_ref params. Keyed by data, tokenizer,
    # lengths and π_ref; a cache whose key differs is refused. '' : π_ref runs in every step.
    # TR-DPO: every ref.sync_every DPO steps π_ref <- α·π + (1 − α)·π_ref, α = ref.mixup_alpha (1: a hard copy;
    # TRL's defaults 512 and 0.6); the moving π_ref is part of the train state. 0: π_ref stays frozen.
    config.ref = ml_collections.ConfigDict(dict(cache="", sync_every=0, mixup_alpha=0.6))
    config.eval = ml_collections.ConfigDict(
        dict(
            max_new_tokens=16,
            temperature=0.0,  # 0: greedy, as the paper's headline TL;DR numbers
            top_p=1.0,
            top_k=0,  # 0: no limit
            stop=[],  # stop strings: a row stops after one, and its text is cut before it
            # The reward of samples at each evaluation: '' (the data source's ground truth, if it has one),
            # 'task' (the same, required), 'hf:PATH[#LABEL]' (a sequence classifier / reward model checkpoint),
            # or 'python:module:function' (texts -> scores). See dpo_jax/rewards.py.
            reward="",
            # The forgetting check (docs/tracking.md): a UTF-8 text file (or 'hf:ORG/NAME?split=..', its `text`
            # column) whose perplexity under the policy and under π_ref is logged at each evaluation
            # (eval/perplexity/...), in windows of data.max_length tokens, at most perplexity_windows of them (0: all).
            perplexity_path="",
            perplexity_windows=32,
        )
    )
    # mode = iterative_dpo (docs/iterative.md): `rounds` rounds of sampling from the current policy, scoring, pairing
    # and a DPO stage of `steps_per_round` steps on the new pairs (dpo_jax/iterative.py).
    config.iterative = ml_collections.ConfigDict(
        dict(
            rounds=3,
            prompts_per_round=64,  # train prompts sampled from in a round (train.batch_size and 1 step: online DPO)
            samples_per_prompt=4,
            steps_per_round=50,
            temperature=1.0,  # the rounds' sampling (eval.* stays the evaluation's); max_new_tokens, stop: eval's
            top_p=1.0,
            top_k=0,
            reward="",  # an eval.reward spec scoring the samples ('' : the source's ground truth), unless `judge`
            judge="",  # 'llm': a pairwise LLM judge (judges.py, verdicts cached) ranks each prompt's samples
            judge_url="https://api.openai.com/v1/chat/completions",
            judge_model="gpt-4",
            judge_task="tldr",  # the paper's judging prompt: tldr or hh
            judge_api_key_env="OPENAI_API_KEY",
            judge_max_retries=6,
            pairs="best_vs_worst",  # or all_pairs (every two samples of a prompt)
            margin=0.0,  # keep a pair only if its score difference is >= margin (ties are always dropped)
            reference="fixed",  # π_ref of each round: fixed (the initial model) or previous (last round's policy)
            optimizer="carry",  # carry: one optimizer and schedule through the rounds; reset: a fresh one per round
            eval_every=1,  # rounds between evaluations on the eval prompts (reward, KL to the initial model)
            keep_round_checkpoints=False,  # False: a round's checkpoints are deleted once the next one is done
        )
    )
    return config


class ConfigError(UserError, ValueError):
    """A config key holds a value that is not allowed; the message names the key."""


def _check(condition: bool, key: str, expected: str, value) -> None:
    if not condition:
        raise ConfigError(f"config.{key} = {value!r} is invalid: expected {expected}")


def _positive_int(config, key: str, allow_zero: bool = False) -> None:
    value = _get(config, key)
    lower = 0 if allow_zero else 1
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= lower,
        key,
        f"an integer >= {lower}",
        value,
    )


def _number(config, key: str, low: float, high: float, low_open=False, high_open=False) -> None:
    value = _get(config, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if math.isinf(high):
        bound = f" {'>' if low_open else '>='} {low}" if math.isfinite(low) else ""
    else:
        bound = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _check(ok, key, f"a finite number{bound}", value)


def _choice(config, key: str, allowed) -> None:
    value = _get(config, key)
    _check(value in allowed, key, f"one of {', '.join(map(str, allowed))}", value)


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if part not in node:
            raise ConfigError(f"config.{key} is missing")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every key up front; raise ConfigError naming the first bad key and what is allowed."""
    _choice(config, "mode", MODES)
    _positive_int(config, "seed", allow_zero=True)
    _choice(config, "dry_run", (True, False))
    _validate_model(config)
    _validate_mesh(config)
    _validate_data(config)
    _validate_loss_and_optimizer(config)
    _validate_stages(config)
    _validate_train(config)
    _validate_eval(config)
    _validate_iterative(config)


def _wrapped(key: str, check, *args) -> None:
    """Run a check of another module; its error (a bad value, or an unreadable file) becomes a ConfigError naming
    `key`."""
    try:
        check(*args)
    except (OSError, TypeError, ValueError) as error:
        raise ConfigError(f"{key} is invalid: {error}") from error


def _validate_model(config: ml_collections.ConfigDict) -> None:
    _check(isinstance(config.model.path, str), "model.path", "a path or repo id string ('' for none)", config.model.path)
    _check(isinstance(config.model.config_path, str), "model.config_path", "a config.json path ('' for none)",
           config.model.config_path)
    _choice(config, "model.dtype", models.COMPUTE_DTYPES)
    _choice(config, "model.reference_dtype", ("float32", "bfloat16"))
    _choice(config, "model.remat", models.REMAT_MODES)
    _check(config.model.scan_layers is None or isinstance(config.model.scan_layers, bool), "model.scan_layers",
           f"None (auto: from {models.SCAN_LAYERS_FROM} layers on), True or False", config.model.scan_layers)
    if config.model.config_path:
        _check(config.dry_run, "model.config_path", "'' unless config.dry_run = True (it sizes a model; training "
               "loads model.path's checkpoint)", config.model.config_path)
        _check(os.path.exists(config.model.config_path), "model.config_path",
               "an existing config.json, or a directory holding one", config.model.config_path)
        _wrapped(f"config.model.config_path = {config.model.config_path!r}", models.read_hf_config,
                 config.model.config_path, config.model.dtype)
        return  # the architecture is config_path's; model.path (maybe a repo id, maybe offline) is never read
    if config.model.path:
        if models.is_local_path(config.model.path):  # a local checkpoint is checked now; a repo id when fetched
            _wrapped(f"config.model.path = {config.model.path!r}", models.read_hf_config, config.model.path,
                     config.model.dtype)
    else:
        _choice(config, "model.family", models.family_names())
        # The family's own config checks its fields; vocab_size comes from the tokenizer later.
        _wrapped("config.model", models.config_from_section, config.model, 1)
    _validate_lora(config)


def _validate_lora(config: ml_collections.ConfigDict) -> None:
    """model.lora: its values, the modes and reference settings it can serve, and targets that select a layer."""
    section = config.model.lora
    _check(isinstance(section.enabled, bool), "model.lora.enabled", "True or False", section.enabled)
    if not section.enabled:
        return
    _positive_int(config, "model.lora.rank")
    _number(config, "model.lora.alpha", 0, float("inf"), low_open=True)
    _check(isinstance(section.targets, str), "model.lora.targets", "a regex string ('' for every dense layer)",
           section.targets)
    _choice(config, "model.lora.base_quantization", lora.QUANTIZATIONS)
    _check(config.mode in ("dpo", "precompute_ref"), "model.lora.enabled",
           f"False with config.mode = {config.mode!r}: LoRA trains the DPO stage of a base model (mode 'dpo', or "
           "'precompute_ref' for its reference cache), π_ref being the base with the adapters off; for an SFT "
           "base, run mode 'sft' first and give its workdir as dpo.reference_workdir", True)
    _check(config.model.reference_dtype == "float32", "model.lora.enabled",
           f"False with model.reference_dtype = {config.model.reference_dtype!r}: π_ref is the base itself, kept "
           "once (store it smaller with model.lora.base_quantization)", True)
    _check(not config.ref.sync_every, "model.lora.enabled",
           f"False with ref.sync_every = {config.ref.sync_every} (TR-DPO): π_ref is the frozen base with the "
           "adapters off, it cannot move towards the policy", True)
    if config.model.path and not models.is_local_path(config.model.path):
        return  # a repo id: its layers are checked when it is fetched
    model_config = (models.read_hf_config(config.model.path, config.model.dtype) if config.model.path
                    else models.config_from_section(config.model, 1))
    _wrapped("config.model.lora.targets", lora.check_targets, model_config, section.targets)


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
    try:
        sharding.check_mesh_sizes(config.mesh)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _choice(config, "mesh.distributed", ("auto", "on", "off"))
    _number(config, "mesh.device_memory_gb", 0, float("inf"))


def _validate_data(config: ml_collections.ConfigDict) -> None:
    if not data.is_hub_source(config.data.source):
        _choice(config, "data.source", (*data.source_names(), "mixture", "hf:ORG/NAME"))
    for key in ("hf_config", "hf_split", "hf_eval_split", "hf_revision", "hf_cache_dir"):
        _check(isinstance(config.data[key], str), f"data.{key}", "a string", config.data[key])
    _check(bool(config.data.hf_split), "data.hf_split", "a split name", config.data.hf_split)
    for field, column in config.data.columns.items():
        _check(isinstance(column, str), f"data.columns.{field}", "a column name string ('' for the same name)",
               column)
    _check(bool(config.data.mixture) == (config.data.source == "mixture"), "data.mixture",
           "((source spec, weight), ...) exactly when data.source = 'mixture'", config.data.mixture)
    _wrapped(f"config.data.mixture = {config.data.mixture!r}", data.check_mixture, config.data.mixture)
    for spec in [s for s in (config.data.source,) if s != "mixture"] + [spec for spec, _ in config.data.mixture]:
        _wrapped(f"config.data.source = {spec!r}", data.check_source_spec, spec, config.data.hf_config,
                 config.data.hf_split, config.data.hf_eval_split, config.data.hf_revision)
    _wrapped(f"config.data.tokenizer = {config.data.tokenizer!r}", data.check_tokenizer_name, config.data.tokenizer,
             config.model.path)
    for key in ("max_length", "max_prompt_length"):
        _positive_int(config, f"data.{key}")
    synthetic = config.data.source == "synthetic_sentiment"  # generates this many; other sources read at most (0: all)
    for key in ("num_train_pairs", "num_eval_pairs"):
        _positive_int(config, f"data.{key}", allow_zero=not synthetic)
    _positive_int(config, "data.num_eval_prompts", allow_zero=True)
    _check(
        config.data.max_prompt_length < config.data.max_length,
        "data.max_prompt_length",
        f"less than data.max_length ({config.data.max_length})",
        config.data.max_prompt_length,
    )
    _choice(config, "data.truncation_mode", data.TRUNCATION_MODES)
    for key in ("path", "eval_path", "tfds_data_dir", "raw_dir"):
        _check(isinstance(config.data[key], str), f"data.{key}", "a path string", config.data[key])
    if config.data.source == "file":
        for key in ("path", "eval_path"):
            path = config.data[key]
            _check(bool(path) or key == "eval_path", f"data.{key}", "a preference file (data.source = 'file')", path)
            _check(not path or os.path.isfile(path), f"data.{key}", "an existing file", path)
    _check(not config.data.raw_dir or os.path.isdir(config.data.raw_dir), "data.raw_dir", "an existing directory",
           config.data.raw_dir)
    _number(config, "data.eval_fraction", 0, 0.5, low_open=True)
    _choice(config, "data.download", (True, False))
    _choice(config, "data.strict", (True, False))
    _choice(config, "train.pack", data.PACKS)
    _choice(config, "train.logprobs", LOGPROBS)
    _check(config.train.pack == "none" or config.train.logprobs == "completion_only", "train.logprobs",
           f"'completion_only' with train.pack = {config.train.pack!r} (rejected's first token is scored from the "
           "prompt's last position, which only the completion-only block expresses)", config.train.logprobs)
    buckets = config.data.length_buckets
    longest = config.data.max_length * (1 if config.train.pack == "none" else 2)
    _check(
        isinstance(buckets, (tuple, list)) and all(isinstance(b, int) and 0 < b <= longest for b in buckets),
        "data.length_buckets",
        f"a tuple of row lengths in [1, {longest}] (data.max_length, twice that for train.pack = 'shared_prompt' "
        "or 'packed'; or () for the default)",
        buckets,
    )
    _positive_int(config, "data.num_threads")


def _validate_loss_and_optimizer(config: ml_collections.ConfigDict) -> None:
    inf = float("inf")
    _check(isinstance(config.loss.name, str), "loss.name", "a loss name or a weighted combination such as "
           "'dpo+0.5*sft'", config.loss.name)
    _wrapped(f"config.loss.name = {config.loss.name!r}", losses.get_loss, config.loss.name)
    _number(config, "loss.beta", 0, inf, low_open=True)
    _number(config, "loss.label_smoothing", 0, 0.5, high_open=True)
    _choice(config, "loss.reference_free", (True, False))
    for key in ("alpha", "gamma", "orpo_lambda"):
        _number(config, f"loss.{key}", -inf, inf)
    for key in ("desirable_weight", "undesirable_weight", "discopop_tau"):
        _number(config, f"loss.{key}", 0, inf, low_open=True)
    _number(config, "loss.dpop_lambda", 0, inf)
    _number(config, "loss.exo_epsilon", 0, 1, low_open=True, high_open=True)
    _number(config, "loss.ld_alpha", 0, 1)
    _check(config.loss.ld_alpha == 1 or losses.takes(config.loss.name, True), "loss.ld_alpha",
           f"1 with loss.name = {config.loss.name!r}, which trains on unpaired data (LD-DPO weighs the tokens of "
           "the longer completion of a pair past the shorter one's length)", config.loss.ld_alpha)

    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.schedule", SCHEDULES)
    _number(config, "optimizer.max_grad_norm", 0, inf, low_open=True)
    _number(config, "optimizer.weight_decay", 0, inf)


def _validate_stages(config: ml_collections.ConfigDict) -> None:
    """Each stage's length and learning rate, and where DPO's reference comes from (its own params or a cache)."""
    inf = float("inf")
    for stage in STAGES:
        _positive_int(config, f"{stage}.num_steps")
        _number(config, f"{stage}.learning_rate", 0, inf, low_open=True)
        _positive_int(config, f"{stage}.warmup_steps", allow_zero=True)
    _check(
        isinstance(config.dpo.reference_workdir, str),
        "dpo.reference_workdir",
        "a path string ('' for the initial params)",
        config.dpo.reference_workdir,
    )
    _check(
        not config.dpo.reference_workdir or config.mode in ("dpo", "precompute_ref", "iterative_dpo"),
        "dpo.reference_workdir",
        f"'' unless config.mode = 'dpo' or 'precompute_ref' (it is {config.mode!r}, which never reads it; "
        "'iterative_dpo' reads it too)",
        config.dpo.reference_workdir,
    )
    _check(isinstance(config.ref.cache, str), "ref.cache", "a directory path string ('' for none)", config.ref.cache)
    _check(bool(config.ref.cache) or config.mode != "precompute_ref", "ref.cache",
           "the directory to write (config.mode = 'precompute_ref')", config.ref.cache)
    _check(not config.ref.cache or config.mode != "sft", "ref.cache",
           "'' with config.mode = 'sft' (Preferred-FT has no reference)", config.ref.cache)
    if config.ref.cache:
        spec = losses.get_loss(config.loss.name)
        _check(spec.data != "unpaired", "ref.cache", f"'' with loss.name = {config.loss.name!r}: it trains on "
               "unpaired completions, whose π_ref log-probs no cache holds (KTO's reference point also pairs "
               "completions of different examples within each batch)", config.ref.cache)
    _positive_int(config, "ref.sync_every", allow_zero=True)
    _number(config, "ref.mixup_alpha", 0, 1, low_open=True)
    if config.ref.sync_every:
        _check(not config.ref.cache, "ref.sync_every", f"0 with ref.cache = {config.ref.cache!r}: a cached π_ref "
               "cannot move (TR-DPO updates π_ref's weights, so its log-probs change every sync)",
               config.ref.sync_every)
        _check(config.mode in ("dpo", "sft_then_dpo"), "ref.sync_every",
               f"0 with config.mode = {config.mode!r}, which trains no DPO stage", config.ref.sync_every)
        _check(losses.get_loss(config.loss.name).needs_reference and not config.loss.reference_free, "ref.sync_every",
               f"0 with loss.name = {config.loss.name!r} (reference_free = {config.loss.reference_free}): it uses no "
               "π_ref to update", config.ref.sync_every)


def _validate_train(config: ml_collections.ConfigDict) -> None:
    for key in ("batch_size", "grad_accum_steps", "eval_batch_size", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints", "logprob_chunk_size", "max_nonfinite_steps",
                "max_save_failures"):
        _positive_int(config, f"train.{key}")
    _choice(config, "train.progress_bar", (True, False))
    _wrapped(f"config.train.loggers = {config.train.loggers!r}", metrics_writer.check_loggers, config.train.loggers)
    for key in ("wandb_project", "wandb_entity"):
        _check(isinstance(config.train[key], str), f"train.{key}", "a string", config.train[key])
    _check(
        config.train.batch_size % config.train.grad_accum_steps == 0,
        "train.grad_accum_steps",
        f"a divisor of train.batch_size ({config.train.batch_size})",
        config.train.grad_accum_steps,
    )
    _check(config.train.grad_accum_steps == 1 or config.train.pack != "packed", "train.grad_accum_steps",
           "1 with train.pack = 'packed' (a micro-batch splits rows and pairs apart, and a packed row holds pairs of "
           "several micro-batches; use 'shared_prompt' to accumulate gradients)", config.train.grad_accum_steps)
    for key, size in (("train.batch_size", "num_train_pairs"), ("train.eval_batch_size", "num_eval_pairs")):
        if not config.data[size]:  # all of the source: checked against the examples it yields
            continue
        _check(
            _get(config, key) <= config.data[size],
            key,
            f"at most data.{size} ({config.data[size]})",
            _get(config, key),
        )


def _validate_eval(config: ml_collections.ConfigDict) -> None:
    inf = float("inf")
    _positive_int(config, "eval.max_new_tokens")
    _number(config, "eval.temperature", 0, inf)
    _number(config, "eval.top_p", 0, 1, low_open=True)
    _positive_int(config, "eval.top_k", allow_zero=True)
    _check(isinstance(config.eval.stop, (list, tuple)) and all(isinstance(x, str) and x for x in config.eval.stop),
           "eval.stop", "a list of non-empty strings", config.eval.stop)
    _wrapped(f"config.eval.reward = {config.eval.reward!r}", rewards.check_reward_spec, config.eval.reward,
             config.data.source)
    path = config.eval.perplexity_path
    _check(isinstance(path, str) and (not path or data.is_hub_source(path) or os.path.isfile(path)),
           "eval.perplexity_path", "an existing text file, 'hf:ORG/NAME?split=..' (its text column) or ''", path)
    if data.is_hub_source(path):
        _wrapped(f"config.eval.perplexity_path = {path!r}", data.hub.parse_spec, path)
    _positive_int(config, "eval.perplexity_windows", allow_zero=True)


def _validate_iterative(config: ml_collections.ConfigDict) -> None:
    """The iterative section (read with mode = iterative_dpo): its counts, sampling, scorer, pairing and reference."""
    if config.mode != "iterative_dpo":
        return
    section, inf = config.iterative, float("inf")
    for key in ("rounds", "prompts_per_round", "steps_per_round", "eval_every", "judge_max_retries"):
        _positive_int(config, f"iterative.{key}", allow_zero=key == "judge_max_retries")
    _positive_int(config, "iterative.samples_per_prompt")
    _check(section.samples_per_prompt >= 2, "iterative.samples_per_prompt", "an integer >= 2 (a pair needs two "
           "samples of a prompt)", section.samples_per_prompt)
    _number(config, "iterative.temperature", 0, inf, low_open=True)
    _number(config, "iterative.top_p", 0, 1, low_open=True)
    _positive_int(config, "iterative.top_k", allow_zero=True)
    _choice(config, "iterative.pairs", ("best_vs_worst", "all_pairs"))
    _number(config, "iterative.margin", 0, inf)
    _choice(config, "iterative.reference", ("fixed", "previous"))
    _choice(config, "iterative.optimizer", ("carry", "reset"))
    _choice(config, "iterative.keep_round_checkpoints", (True, False))
    _choice(config, "iterative.judge", ("", "llm"))
    if section.judge == "llm":
        _choice(config, "iterative.judge_task", ("tldr", "hh"))
        for key in ("judge_url", "judge_model", "judge_api_key_env"):
            _check(isinstance(section[key], str) and bool(section[key]), f"iterative.{key}", "a non-empty string",
                   section[key])
    else:
        _wrapped(f"config.iterative.reward = {section.reward!r}", rewards.check_reward_spec, section.reward,
                 config.data.source)
        _check(bool(section.reward) or data.ground_truth_reward_fn(config.data.source) is not None,
               "iterative.reward", f"a reward spec ({rewards.FORMS}) or iterative.judge = 'llm': data.source = "
               f"{config.data.source!r} has no ground-truth reward to score samples with", section.reward)
    _check(section.optimizer == "reset" or config.optimizer.schedule == "constant", "iterative.optimizer",
           "'reset' with optimizer.schedule = 'cosine' (a carried schedule is the constant one after warmup)",
           section.optimizer)
    _check(not config.ref.cache, "ref.cache", "'' with config.mode = 'iterative_dpo' (each round's pairs are new; "
           "π_ref runs in every step)", config.ref.cache)
    _check(not config.model.lora.enabled, "model.lora.enabled", "False with config.mode = 'iterative_dpo'",
           config.model.lora.enabled)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:  # a saved config is JSON, where tuples come back as lists
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_keys(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs between two `config.to_dict()`s (added/removed too)."""
    old_flat, new_flat = _flatten(old), _flatten(new)
    missing = object()
    return [
        f"{key}: {old_flat.get(key, '(absent)')!r} -> {new_flat.get(key, '(absent)')!r}"
        for key in sorted(old_flat.keys() | new_flat.keys())
        if old_flat.get(key, missing) != new_flat.get(key, missing)
    ]
