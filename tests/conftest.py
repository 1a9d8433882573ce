"""Shared fixtures, and one persistent compilation cache for the whole session."""

import os
import shutil
import tempfile

import pytest

from configs import demo

HF_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
_COMPILATION_CACHE = []  # the session's cache directory, removed when the session ends


def pytest_configure(config):
    """Register the markers (`realmodel`: tests on the fetched SmolLM2-135M-Instruct GGUF, in the default run).
    Compile each program once per session: a fresh persistent compilation cache that this process and every
    subprocess it starts (which inherit the environment) read and write. Many tests train the same tiny models, and
    compiling dominates their time; a cached executable computes the same results, so no assertion changes. The
    size limit only turns on JAX's file lock, for processes that share the cache at the same time (subprocesses,
    and pytest-xdist workers, which inherit the controller's directory)."""
    import jax

    config.addinivalue_line("markers", "realmodel: runs SmolLM2-135M-Instruct from its GGUF (python -m dpo_jax.fetch), "
                                       "and Gemma 3 270M when its optional GGUF is present (skipped otherwise)")
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        directory = os.environ["JAX_COMPILATION_CACHE_DIR"]  # a pytest-xdist worker: the controller's cache
    else:
        directory = tempfile.mkdtemp(prefix="dpo_jax_tests_jax_cache_")
        _COMPILATION_CACHE.append(directory)
    settings = {"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**33)}
    os.environ.update(settings)
    for name, value in settings.items():  # JAX may already be imported: its config read the environment then
        jax.config.update(name.lower(), int(value) if name != "JAX_COMPILATION_CACHE_DIR" else value)


def pytest_unconfigure(config):
    for directory in _COMPILATION_CACHE:
        shutil.rmtree(directory, ignore_errors=True)


def make_short_config():
    """The demo config with a handful of steps and a checkpoint every 2: the whole pipeline in seconds."""
    config = demo.get_config("smoke")
    config.loss.name = "dpo"  # the paper's loss: tests check its invariants (log 2 when the policy is π_ref)
    config.data.update(num_train_pairs=64, num_eval_pairs=16, num_eval_prompts=4)
    config.sft.update(num_steps=5, warmup_steps=2)
    config.dpo.update(num_steps=5, warmup_steps=2)
    config.train.update(batch_size=16, eval_batch_size=16, log_every=1, eval_every=5, checkpoint_every=2,
                        keep_checkpoints=2, progress_bar=False)
    config.eval.max_new_tokens = 3
    return config


@pytest.fixture
def short_config():
    return make_short_config()


def make_fault_config():
    """The short config stretched to 12 steps a stage with a checkpoint every 3: room for faults at many moments."""
    config = make_short_config()
    config.sft.num_steps = config.dpo.num_steps = 12
    config.train.update(checkpoint_every=3, eval_every=6)
    return config


class _DieAt:
    """A training-batch iterator that raises `error` instead of yielding batch `step` (an absolute step)."""

    def __init__(self, iterator, step, error):
        self.iterator, self.step, self.error = iterator, step, error

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator.get_state()["next_index"] == self.step:
            raise self.error
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()


def interrupt_stage_at(monkeypatch, seed, step, error):
    """Make the training batches of the stage whose data seed is `seed` raise `error` when batch `step` is due: a
    run killed there, in process (the stage's seed is config.seed + build.STAGE_DATA_STREAMS[stage])."""
    from dpo_jax import data

    original = data.TrainBatches.iterator

    def iterator(self, state=None, prefetch=2):
        batches = original(self, state, prefetch)
        return _DieAt(batches, step, error) if self.seed == seed else batches

    monkeypatch.setattr(data.TrainBatches, "iterator", iterator)
