"""Orbax checkpoints of one training stage: train state + data position, RNG, resolved config and architecture.

Layout: `<workdir>/<stage>/checkpoints/<step>/{state,meta}`. Resume order: the latest checkpoint in the
workdir that restores; a DPO run started elsewhere takes its reference from `load_final_params` of an SFT
workdir. `StageCheckpoints` adds what a long run needs around Orbax: no non-finite state is ever saved, a failed
(asynchronous) save is reported at once and retried at the next interval, a corrupt checkpoint is moved aside for
the previous one, and a checkpoint of another model is refused naming the tensor.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from dpo_jax import models
from dpo_jax.errors import CheckpointSaveFailed, NonFiniteTraining, UserError

PARTIAL_MARKER = ".orbax-checkpoint-tmp"  # Orbax writes here and renames on commit: never a complete checkpoint
CORRUPT_DIRECTORY = "corrupt_checkpoints"


def stage_directory(workdir: str, stage: str) -> str:
    """Where the checkpoints of `stage` ('sft' or 'dpo') live inside a workdir."""
    return os.path.join(os.path.abspath(workdir), stage, "checkpoints")


def make_manager(workdir: str, stage: str, keep: int) -> ocp.CheckpointManager:
    """A CheckpointManager for one stage that keeps the last `keep` steps (and reads each item's metadata)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(stage_directory(workdir, stage), options=options, item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Start saving the train-state pytree and the JSON metadata (data position, RNG, config) at `step`."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )


@jax.jit
def _finite_leaves(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True, tree)


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths ('params/layers/0/...') of the leaves of `tree` that hold a NaN or an infinity."""
    flags = jax.device_get(_finite_leaves(tree))
    return ["/".join(map(str, path)) for path, ok in ocp.tree.to_flat_dict(flags).items() if not ok]


def _shape_mismatches(stored: dict, expected: dict) -> list[str]:
    """What differs between the stored tree's leaves and ours: paths on one side only, or other shapes."""
    lines = [f"{'/'.join(p)} is only in the checkpoint" for p in stored.keys() - expected.keys()]
    lines += [f"{'/'.join(p)} is missing from the checkpoint" for p in expected.keys() - stored.keys()]
    lines += [
        f"{'/'.join(p)} has shape {list(stored[p].shape)} there and {list(expected[p].shape)} here"
        for p in stored.keys() & expected.keys()
        if tuple(stored[p].shape) != tuple(expected[p].shape)
    ]
    return sorted(lines)


def _in_stored_form(stored_tree: Any, target: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(what to restore, how to finish): `target` itself, or, when the checkpoint holds the model's blocks in the
    other form (unrolled layers restoring into stacked ones, or the reverse: `models.form_change`), `target` in the
    stored form and the conversion of what is restored back into `target`'s."""
    change = models.form_change(ocp.tree.to_flat_dict(stored_tree), ocp.tree.to_flat_dict(target))
    if change is None:
        return target, lambda restored: restored

    def finish(restored: Any) -> Any:
        return ocp.tree.from_flat_dict(change.convert(ocp.tree.to_flat_dict(restored)), target=target)

    return ocp.tree.from_flat_dict(change.stored_target, target=stored_tree), finish


def is_closed_loop_noise(error: BaseException | None) -> bool:
    """Whether an unraisable exception is the "Event loop is closed" that Orbax's I/O callbacks raise after a failed
    save or restore has torn its event loop down (noise: the failure itself is reported)."""
    return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


@contextlib.contextmanager
def _quiet_unraisable() -> Iterator[None]:
    """A failing restore leaves coroutines that print "Exception ignored" noise when collected: collect them here
    and log that at debug level instead."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: logging.debug("ignored: %r", unraisable.exc_value)
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


def _brief(error: Exception) -> str:
    """`Type: message` on one line; a long message (TensorStore's embed paths and specs) keeps its start and the
    OS error inside it, named from its code ("File too large [os_error_code=27]"), or else its end."""
    message = " ".join(str(error).split())
    if len(message) > 300:
        os_error = re.search(r"os_error_code='?(\d+)", message)
        tail = f"{os.strerror(int(os_error.group(1)))} [os_error_code={os_error.group(1)}]" if os_error else message[-180:]
        message = f"{message[:120]} ... {tail}"
    return f"{type(error).__name__}: {message}"


def remove_partial_saves(directory: str) -> list[str]:
    """Delete the uncommitted (`*.orbax-checkpoint-tmp*`) directories of a failed or killed save; their names."""
    if not os.path.isdir(directory):
        return []
    partial = sorted(name for name in os.listdir(directory) if PARTIAL_MARKER in name)
    for name in partial:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return partial


class StageCheckpoints:
    """One stage's checkpoints: guarded saves, reported failures, and a resume that heals past corrupt steps.

    Saves are asynchronous; `poll()` after each step notices one that failed (disk full, permission denied),
    reports it in one line, removes its partial files and lets training go on; `max_save_failures` failures in a
    row raise CheckpointSaveFailed. The caller owns the workdir (see guards.WorkdirLock).
    """

    def __init__(self, workdir: str, stage: str, keep: int, max_save_failures: int):
        self.stage, self.workdir = stage, workdir
        self.directory = stage_directory(workdir, stage)
        for name in remove_partial_saves(self.directory):
            logging.warning("%s: removed %s, an unfinished save of an earlier run", self.stage, name)
        self.manager = make_manager(workdir, stage, keep)
        self.max_save_failures = max_save_failures
        self.failures_in_a_row = 0
        self._pending: int | None = None  # the step of the save in flight

    def restore(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """(state, meta) of the latest checkpoint that restores, None if there is none.

        One that fails to read is reported in one line and moved to `<stage>/corrupt_checkpoints/` (kept, not
        deleted), and the previous step is tried. One whose tensors do not fit `abstract_state` (another model
        or optimizer) raises UserError naming them: that is the config's doing, not corruption. One written with the
        model's blocks in the other form (`scan_layers`) is converted.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                stored_tree = self.manager.item_metadata(step)["state"].tree
                stored = ocp.tree.to_flat_dict(stored_tree)
            except Exception as error:  # unreadable metadata: a corrupt step
                self._set_aside(step, error)
                continue
            target, finish = _in_stored_form(stored_tree, abstract_state)
            mismatches = _shape_mismatches(stored, ocp.tree.to_flat_dict(target))
            if mismatches:
                raise UserError(
                    f"{self.directory}/{step} holds another model or optimizer than this config builds: "
                    f"{'; '.join(mismatches[:5])}{' ...' if len(mismatches) > 5 else ''}. Use a new --workdir, "
                    "or the config the checkpoint was written with"
                )
            args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
            with _quiet_unraisable():
                try:
                    restored = self.manager.restore(step, args=args)
                except Exception as error:  # missing or truncated files, garbage metadata
                    self._set_aside(step, error)
                    continue
            return finish(restored["state"]), restored["meta"]
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        destination = os.path.join(os.path.dirname(self.directory), CORRUPT_DIRECTORY, str(step))
        if os.path.exists(destination):
            destination += f".{time.strftime('%Y%m%d-%H%M%S')}"
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), destination)
        self.manager.reload()
        logging.error("%s checkpoint at step %d could not be restored (%s); moved it to %s and trying the "
                      "previous one", self.stage, step, _brief(error), destination)

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving `state` at `step`, after checking every value is finite (else NonFiniteTraining)."""
        self.wait()  # Orbax would wait for the previous save anyway; this reports its outcome first.
        bad = nonfinite_leaves(state)
        if bad:
            raise NonFiniteTraining(
                f"{self.stage} step {step}: the train state holds non-finite values ({', '.join(bad[:3])}"
                f"{' ...' if len(bad) > 3 else ''}); not saving it. The last checkpoint is step "
                f"{self.manager.latest_step()}"
            )
        try:
            save(self.manager, step, state, meta)
        except Exception as error:  # failed before going asynchronous (e.g. cannot create the directory)
            self._failed(step, error)
            return
        self._pending = step

    def poll(self) -> None:
        """Report a finished save that failed; cheap when none is in flight or it is still running."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Wait for the save in flight, then report its outcome."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            self._failed(step, error)
        else:
            self.failures_in_a_row = 0

    def _failed(self, step: int, error: Exception) -> None:
        self.failures_in_a_row += 1
        remove_partial_saves(self.directory)
        logging.error("%s checkpoint at step %d could not be saved (%s); training goes on and the next "
                      "checkpoint interval tries again (%d of %d failures in a row allowed)", self.stage, step,
                      _brief(error), self.failures_in_a_row, self.max_save_failures)
        if self.failures_in_a_row >= self.max_save_failures:
            raise CheckpointSaveFailed(
                f"{self.stage}: {self.failures_in_a_row} checkpoint saves failed in a row, the last at step {step} "
                f"({_brief(error)}); the last saved step is {self.manager.latest_step()}"
            )

    def latest_step(self) -> int | None:
        """The newest committed step."""
        return self.manager.latest_step()

    def close(self) -> None:
        """Finish (and report) the save in flight, then release the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


def _open_existing(workdir: str, stage: str) -> ocp.CheckpointManager:
    directory = stage_directory(workdir, stage)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no {stage} checkpoints under {directory}")
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}  # to read metadata
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False), item_handlers=handlers)


def _pick_step(manager: ocp.CheckpointManager, stage: str, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no {stage} checkpoint under {manager.directory}")
    if step is None:
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no {stage} checkpoint at step {step} under {manager.directory}; steps: {sorted(steps)}")
    return step


def read_meta(workdir: str, stage: str, step: int | None = None) -> tuple[int, dict]:
    """(step, JSON metadata) of `stage`'s checkpoint at `step` (default: the latest) in `workdir`."""
    manager = _open_existing(workdir, stage)
    try:
        step = _pick_step(manager, stage, step)
        return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()


def last_stage(workdir: str) -> str:
    """'dpo' if the run has DPO checkpoints, else 'sft'."""
    return "dpo" if os.path.isdir(stage_directory(workdir, "dpo")) else "sft"


def load_final_params(workdir: str, stage: str, abstract_params: Any, step: int | None = None) -> Any:
    """The params alone of `stage`'s checkpoint at `step` (default: the latest) in `workdir`, e.g. an SFT model
    to use as π_ref, or a run to export.

    A partial restore: the optimizer state on disk is neither read nor required to match ours. Params written with
    the blocks in the other form (`scan_layers`) are converted.
    """
    manager = _open_existing(workdir, stage)
    try:
        step = _pick_step(manager, stage, step)
        stored_tree = {"params": manager.item_metadata(step)["state"].tree["params"]}
        target, finish = _in_stored_form(stored_tree, {"params": abstract_params})
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        return finish(manager.restore(step, args=ocp.args.Composite(state=restore))["state"])["params"]
    finally:
        manager.close()


def check_base(meta: dict, base: dict | None, where: str) -> None:
    """Refuse (UserError) a checkpoint whose recorded LoRA base (`meta["lora_base"]`: path and fingerprint) is not
    `base`, this run's (None: a run without LoRA), so adapters never resume onto weights they were not trained on."""
    stored = meta.get("lora_base")
    if stored == base:
        return
    if stored is None or base is None:
        raise UserError(f"{where}: the checkpoint holds {'full params' if stored is None else 'LoRA adapters'} but "
                        f"this run trains {'LoRA adapters' if stored is None else 'full params'} "
                        "(config.model.lora.enabled differs); use another workdir")
    raise UserError(f"{where}: the checkpoint's LoRA adapters belong to the base {stored['path'] or 'random model'} "
                    f"(fingerprint {stored['fingerprint']}), not this run's {base['path'] or 'random model'} "
                    f"(fingerprint {base['fingerprint']}); resume on that base or use another workdir")


def abstract(tree: Any) -> Any:
    """Shape/dtype skeleton of a pytree, the restore target for Orbax."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
