"""A sweep's plan: every combination of `--grid` values × seeds as a run with its own validated config and workdir,
and the SFT references those runs share (see the package docstring for the rules)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import urllib.parse
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections.config_flags import config_path

from dpo_jax import config as config_lib
from dpo_jax import errors

# Grid keys in these sections leave the SFT stage's params (so π_ref, and its cached log-probs) unchanged.
SHARED_REFERENCE_SECTIONS = ("loss", "dpo", "eval")
RESERVED_KEYS = {"seed": "set by --seeds", "mode": "one sweep runs one config.mode", "dry_run": "a sweep trains"}
# The types a grid value is parsed to, by the type of the config field it sets (as config_flags parses overrides).
PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser(),
           str: flags.ArgumentParser()}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One `--grid KEY=V1,V2,...`: the key, its values as given and as parsed to the config field's type."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class PlannedRun:
    """One run of a sweep as planned: its grid values (key, text) in grid order, seed, full config and workdir, and
    the SFT reference workdir the sweep trains for it ('' for none)."""

    index: int
    name: str
    values: tuple[tuple[str, str], ...]
    seed: int
    config: ml_collections.ConfigDict
    workdir: str
    reference: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class Sweep:
    """A planned sweep: its workdir, grid axes, runs (grid order, seeds innermost) and SFT references by workdir."""

    workdir: str
    axes: tuple[Axis, ...]
    runs: tuple[PlannedRun, ...]
    references: dict[str, ml_collections.ConfigDict]


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """`text` parsed to the type of config field `key` (int, float, bool or str); UserError naming key and text."""
    try:
        kind = config_path.get_type(key, config)
    except (AttributeError, KeyError, IndexError, ValueError) as error:  # ConfigDict adds "Did you mean ..."
        message: Any = error
        while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(text))
            message = message.args[0]
        hint = " ".join(str(message).splitlines()[1:])
        raise errors.UserError(f"--grid {key}: the config has no key {key!r}" + (f" ({hint})" if hint else ""))
    if kind not in PARSERS:
        raise errors.UserError(f"--grid {key}: config.{key} holds {kind.__name__} values; a grid sets int, float, "
                               "bool or str keys (override others with --config.KEY=VALUE)")
    try:
        return PARSERS[kind].parse(text)
    except ValueError as error:
        raise errors.UserError(f"--grid {key}={text}: config.{key} holds {kind.__name__} values (it is "
                               f"{config_path.get_value(key, config)!r}): {error}") from None


def parse_grid(config: ml_collections.ConfigDict, specs: Sequence[str]) -> tuple[Axis, ...]:
    """The `KEY=V1,V2,...` specs as axes, values parsed to the config's types; UserError for a bad key or value."""
    axes: list[Axis] = []
    for spec in specs:
        key, sep, rest = (part.strip() for part in spec.partition("="))
        texts = tuple(text.strip() for text in rest.split(","))
        if not sep or not key or not all(texts):
            raise errors.UserError(f"--grid {spec!r}: expected KEY=VALUE[,VALUE...] with no empty value")
        if key in RESERVED_KEYS:
            raise errors.UserError(f"--grid {key}: config.{key} is not a grid key ({RESERVED_KEYS[key]})")
        if any(axis.key == key for axis in axes):
            raise errors.UserError(f"--grid {key}: given twice; list all its values in one --grid")
        values = tuple(parse_value(config, key, text) for text in texts)
        for i, value in enumerate(values):
            if value in values[:i]:
                raise errors.UserError(f"--grid {key}: {texts[i]!r} repeats {texts[values.index(value)]!r}")
        axes.append(Axis(key, texts, values))
    return tuple(axes)


def label(pairs: Sequence[tuple[str, Any]]) -> str:
    """'key=value,key=value' (a directory name: '/', ',', '=' and other unsafe characters of values %-escaped)."""
    return ",".join(f"{key}={urllib.parse.quote(str(value), safe='')}" for key, value in pairs)


def shares_reference(key: str) -> bool:
    """Whether grid key `key` leaves the SFT model (π_ref) unchanged, so runs varying it can share one."""
    return key.split(".")[0] in SHARED_REFERENCE_SECTIONS


def _configured(base: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    config = base.copy_and_resolve_references()
    for key, value in values.items():
        config_path.set_value(key, config, value)
    return config


def plan(base_config: ml_collections.ConfigDict, grid: Sequence[str], seeds: Sequence[int], workdir: str,
         sft_seed: int | None = None) -> Sweep:
    """Every combination of `grid` ('KEY=V1,V2' specs) × `seeds` as a run with its validated config and workdir,
    and the SFT references they share (mode sft_then_dpo). UserError naming the run, key and value of a bad one."""
    mode = base_config.mode
    if mode not in ("sft", "dpo", "sft_then_dpo"):
        raise errors.UserError(f"config.mode = {mode!r}: a sweep runs sft, dpo or sft_then_dpo runs")
    if base_config.dry_run:
        raise errors.UserError("config.dry_run = True: a sweep trains (dry-run its config with dpo_jax.main)")
    if not seeds:
        raise errors.UserError("--seeds: a sweep needs at least one seed")
    axes = parse_grid(base_config, grid)
    shared = mode == "sft_then_dpo"
    if shared and any(axis.key == "dpo.reference_workdir" for axis in axes):
        raise errors.UserError("--grid dpo.reference_workdir: with config.mode = 'sft_then_dpo' the sweep trains the "
                               "SFT reference; sweep SFT workdirs with config.mode = 'dpo'")
    references: dict[str, ml_collections.ConfigDict] = {}
    runs: list[PlannedRun] = []
    for combination in itertools.product(*(zip(axis.texts, axis.values) for axis in axes)):
        texts = tuple((axis.key, text) for axis, (text, _) in zip(axes, combination))
        values = {axis.key: value for axis, (_, value) in zip(axes, combination)}
        reference_texts = [(key, text) for key, text in texts if not shares_reference(key)]
        reference = os.path.join(workdir, "sft", *([label(reference_texts)] if reference_texts else []))
        if shared and reference not in references:
            sft = _configured(base_config, {key: values[key] for key, _ in reference_texts})
            sft.mode, sft.seed, sft.ref.cache = "sft", base_config.seed if sft_seed is None else sft_seed, ""
            references[reference] = sft
        for seed in seeds:
            config = _configured(base_config, values)
            config.seed = seed
            if shared:
                config.mode, config.dpo.reference_workdir = "dpo", reference
            if config.ref.cache:  # its key holds the data (seeded) and π_ref: one cache per seed and reference
                config.ref.cache = os.path.join(config.ref.cache, label([*reference_texts, ("seed", seed)]))
            name = label([*texts, ("seed", seed)])
            runs.append(PlannedRun(len(runs), name, texts, seed, config, os.path.join(workdir, "runs", name),
                                   reference if shared else ""))
    for what, config in [*((f"SFT reference {w}", c) for w, c in references.items()),
                         *((f"run {r.index} ({r.name})", r.config) for r in runs)]:
        try:
            config_lib.validate(config)
        except errors.UserError as error:
            raise errors.UserError(f"{what}: {error}") from error
    return Sweep(workdir, axes, tuple(runs), references)
