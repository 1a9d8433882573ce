"""Rewards that score generated samples: `make_reward(spec, source)` -> `reward(prompts, completions)` -> scores.

`spec` is the config key `eval.reward`, in one of three forms:
- "" or "task": the data source's own ground truth (`data.ground_truth_reward_fn(source)`), which scores the
  completion alone. "" gives None when the source has none (human-labelled data); "task" then fails.
- "hf:PATH" or "hf:PATH#LABEL": a local Hugging Face `<Family>ForSequenceClassification` checkpoint directory
  (a sentiment classifier, a TRL reward model) of one of our decoder families, run in JAX on `prompt + completion`
  tokenised by its own tokenizer (special tokens included; a text longer than the model's positions keeps its
  last ones, with a warning), pooled at the last token. One label: the score is its logit (a reward model).
  Several: the softmax probability of LABEL from config.json's id2label (default: the label named POSITIVE, in
  any case, else the last one), as the DPO paper's IMDb reward is a classifier's P(positive).
- "python:package.module:function": an importable `function(texts: list[str]) -> one float per text`, called on
  the `prompt + completion` texts.
Every reward returns float64 scores [N] and raises ValueError on a non-finite score, naming the spec and the text.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dpo_jax import data
from dpo_jax.models import MODEL_FAMILIES, apply_model
from dpo_jax.models.hf import CONFIG_FILE, load_hf_body

Reward = Callable[[list[str], list[str]], np.ndarray]  # (prompts, completions) -> float64 scores [N]

TASK, HF_PREFIX, PYTHON_PREFIX = "task", "hf:", "python:"
FORMS = '"" or "task" (the source\'s ground truth), "hf:PATH[#LABEL]" (a local sequence-classification ' \
        'checkpoint), "python:package.module:function" (a function of texts)'
SCORE_TENSOR = "score.weight"  # HF's ForSequenceClassification head: [num_labels, D], no bias
DEFAULT_BATCH_SIZE = 16
MIN_BUCKET = 32  # padded lengths are powers of two from here up to the model's max positions


def make_reward(
    spec: str, source: str, *, batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "float32"
) -> Reward | None:
    """The reward `spec` names (see the module docstring) for samples of data source `source`; None for "" when the
    source has no ground truth. HF checkpoints load now (batches of `batch_size` texts, compute in `dtype`)."""
    if spec in ("", TASK):
        return task_reward(spec, source)
    if spec.startswith(HF_PREFIX):
        path, _, label = spec[len(HF_PREFIX):].partition("#")
        return checked(spec, classifier_reward(path, label or None, batch_size=batch_size, dtype=dtype))
    if spec.startswith(PYTHON_PREFIX):
        return checked(spec, text_reward(import_function(spec)))
    raise ValueError(f"unknown reward {spec!r}; valid forms: {FORMS}")


def check_reward_spec(spec: str, source: str) -> None:
    """ValueError unless `spec` has one of the three forms (and "task" a source with ground truth): the config
    check, which loads and imports nothing."""
    if spec in ("", TASK):
        task_reward(spec, source)
    elif spec.startswith(HF_PREFIX):
        if not spec[len(HF_PREFIX):].partition("#")[0]:
            raise ValueError(f"reward {spec!r} names no checkpoint directory; expected hf:PATH or hf:PATH#LABEL")
    elif spec.startswith(PYTHON_PREFIX):
        split_function_spec(spec)
    else:
        raise ValueError(f"unknown reward {spec!r}; valid forms: {FORMS}")


def checked(spec: str, reward: Reward) -> Reward:
    """`reward` with its output checked: float64 [N] for N (prompt, completion) pairs, every score finite."""

    def checked_reward(prompts: list[str], completions: list[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"reward {spec!r}: {len(prompts)} prompts but {len(completions)} completions")
        scores = reward(list(prompts), list(completions))
        try:
            scores = np.asarray(scores, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"reward {spec!r}: its output is not one float per text: {error}") from error
        if scores.shape != (len(prompts),):
            raise ValueError(f"reward {spec!r}: gave scores of shape {scores.shape} for {len(prompts)} texts")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise ValueError(f"reward {spec!r}: score {scores[bad[0]]} of text {bad[0]} is not finite")
        return scores

    return checked_reward


def task_reward(spec: str, source: str) -> Reward | None:
    """The source's ground truth on each completion alone; None for "" and ValueError for "task" if it has none."""
    reward_fn = data.ground_truth_reward_fn(source)
    if reward_fn is None:
        if spec == TASK:
            raise ValueError(f"reward {TASK!r}: data source {source!r} has no ground-truth reward; name a reward "
                             f"model instead ({FORMS})")
        return None
    return checked(spec or TASK, lambda prompts, completions: [reward_fn(c) for c in completions])


def split_function_spec(spec: str) -> tuple[str, str]:
    """(module, function) of "python:package.module:function"; ValueError naming the spec if it has another shape."""
    module_name, _, function_name = spec[len(PYTHON_PREFIX):].rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise ValueError(f"reward {spec!r}: expected python:package.module:function")
    return module_name, function_name


def import_function(spec: str) -> Callable[[list[str]], Sequence[float]]:
    """The function `python:package.module:function` names; ValueError naming the spec if it cannot be imported."""
    module_name, function_name = split_function_spec(spec)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {spec!r}: cannot import {function_name} from {module_name}: {error}") from error
    if not callable(function):
        raise ValueError(f"reward {spec!r}: {module_name}.{function_name} is not callable")
    return function


def text_reward(function: Callable[[list[str]], Sequence[float]]) -> Reward:
    """A Reward calling `function` on the `prompt + completion` texts."""
    return lambda prompts, completions: function([p + c for p, c in zip(prompts, completions)])


# --- Hugging Face sequence classifiers ---------------------------------------------------------------------------

def classifier_architectures() -> dict[str, str]:
    """{`<Family>ForSequenceClassification`: family name} for every family we run."""
    return {
        re.sub(r"(ForCausalLM|LMHeadModel)$", "ForSequenceClassification", family.hf.architecture): name
        for name, family in MODEL_FAMILIES.items()
    }


def read_classifier_config(path: str) -> dict[str, Any]:
    """config.json of the sequence-classification checkpoint at local directory `path`; ValueError (or
    FileNotFoundError) naming the path and what was expected."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"reward model {path!r}: no such local directory (rewards read local checkpoints "
                                "only; download one first)")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"reward model {path!r}: no {CONFIG_FILE}; expected a Hugging Face "
                                "<Family>ForSequenceClassification checkpoint directory")
    with open(config_path) as f:
        hf_config = json.load(f)
    architecture = (hf_config.get("architectures") or [None])[0]
    supported = classifier_architectures()
    if architecture not in supported:
        raise ValueError(f"reward model {path!r}: config.json's architecture {architecture!r} is not a sequence "
                         f"classifier we run; expected one of {sorted(supported)}")
    return hf_config


def label_index(id2label: dict, label: str | None, path: str) -> int:
    """Index of `label` in config.json's id2label (case-insensitive); default POSITIVE if present, else the last."""
    names = [id2label[key] for key in sorted(id2label, key=int)]
    folded = [name.lower() for name in names]
    if label is None:
        return folded.index("positive") if "positive" in folded else len(names) - 1
    if label in names:
        return names.index(label)
    if label.lower() in folded:
        return folded.index(label.lower())
    raise ValueError(f"reward model {path!r}: label {label!r} is not in config.json's id2label {names}")


def length_buckets(max_positions: int) -> tuple[int, ...]:
    """Padded text lengths: powers of two from MIN_BUCKET, capped at (and ending with) `max_positions`."""
    buckets, length = {max_positions}, MIN_BUCKET
    while length < max_positions:
        buckets.add(length)
        length *= 2
    return tuple(sorted(buckets))


def encode_texts(tokenizer: Any, texts: Sequence[str], max_positions: int, path: str) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens (as the classifier saw them in training),
    truncated on the left to `max_positions` with a warning; ValueError for a text with no tokens."""
    ids = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    empty = next((i for i, row in enumerate(ids) if not row), None)
    if empty is not None:
        raise ValueError(f"reward model {path!r}: text {empty} ({texts[empty]!r}) has no tokens to score")
    long = [i for i, row in enumerate(ids) if len(row) > max_positions]
    if long:
        logging.warning("reward model %s: %d of %d texts are longer than its %d positions (the longest: %d tokens); "
                        "scored on their last %d tokens", path, len(long), len(ids), max_positions,
                        max(len(ids[i]) for i in long), max_positions)
    return [row[-max_positions:] for row in ids]


def make_logits_fn(graphdef: Any, params: Any, score_LxD: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A jitted `(tokens_BxT, last_B) -> logits_BxL`: the hidden state at each row's `last` position times the score
    head. Params left abstract (the LM head a classifier lacks) are zeros inside the jit, so never allocated."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    absent = {i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)}
    present = [leaf for i, leaf in enumerate(leaves) if i not in absent]

    @jax.jit
    def logits(present, score_LxD, tokens_BxT, last_B):
        loaded = iter(present)
        full = [jnp.zeros(leaf.shape, leaf.dtype) if i in absent else next(loaded) for i, leaf in enumerate(leaves)]
        hidden_BxTxD, _ = apply_model(graphdef, treedef.unflatten(full), tokens_BxT)
        pooled_BxD = jnp.take_along_axis(hidden_BxTxD, last_B[:, None, None], axis=1)[:, 0]
        return pooled_BxD.astype(jnp.float32) @ score_LxD.T

    score_LxD = jnp.asarray(score_LxD, jnp.float32)
    return lambda tokens_BxT, last_B: np.asarray(logits(present, score_LxD, tokens_BxT, last_B))


def classifier_reward(path: str, label: str | None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                      dtype: str = "float32") -> Reward:
    """The reward of the sequence classifier at local directory `path` (see the module docstring): loads it now."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"reward model {path!r}: batch_size must be a positive int, got {batch_size!r}")
    hf_config = read_classifier_config(path)
    id2label = hf_config.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf_config.get("num_labels", 2))}
    index = label_index(id2label, label, path)
    try:
        graphdef, params, config, head = load_hf_body(path, [SCORE_TENSOR], dtype=dtype)
    except ValueError as error:
        raise ValueError(f"reward model {path!r}, a {hf_config['architectures'][0]}: {error}") from error
    score_LxD = head[SCORE_TENSOR]
    if score_LxD.shape != (len(id2label), config.hidden_size):
        raise ValueError(f"reward model {path!r}: {SCORE_TENSOR} has shape {list(score_LxD.shape)}, expected "
                         f"[num_labels={len(id2label)}, hidden_size={config.hidden_size}] as config.json describes")
    tokenizer = data.get_tokenizer(HF_PREFIX + path)
    logits_fn = make_logits_fn(graphdef, params, score_LxD)
    buckets = length_buckets(config.max_position_embeddings)

    def reward(prompts: list[str], completions: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        ids = encode_texts(tokenizer, [p + c for p, c in zip(prompts, completions)], buckets[-1], path)
        if max(max(row) for row in ids) >= config.vocab_size:
            raise ValueError(f"reward model {path!r}: its tokenizer gives ids beyond the model's "
                             f"vocab_size {config.vocab_size}")
        logits_NxL = batched_logits(logits_fn, ids, batch_size, buckets, tokenizer.pad_token_id)
        if logits_NxL.shape[1] == 1:
            return logits_NxL[:, 0]
        return softmax(logits_NxL)[:, index]

    return reward


def softmax(logits_NxL: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (numpy: JAX would compute it in float32)."""
    exp_NxL = np.exp(logits_NxL - logits_NxL.max(axis=-1, keepdims=True))
    return exp_NxL / exp_NxL.sum(axis=-1, keepdims=True)


def batched_logits(logits_fn: Callable, ids: list[list[int]], batch_size: int, buckets: Sequence[int],
                   pad_id: int) -> np.ndarray:
    """float64 logits [N, L] of token rows, run in fixed-size batches of similar lengths, right-padded to a bucket
    (causal attention: padding after a text never changes its last token's hidden state)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = next(b for b in buckets if b >= max(len(ids[i]) for i in rows))
        tokens_BxT = np.full((batch_size, length), pad_id, np.int32)
        last_B = np.zeros(batch_size, np.int32)
        for b, i in enumerate(rows):
            tokens_BxT[b, :len(ids[i])] = ids[i]
            last_B[b] = len(ids[i]) - 1
        for i, row_logits in zip(rows, logits_fn(tokens_BxT, last_B)):
            logits[i] = row_logits
    return np.asarray(logits, np.float64).reshape(len(ids), -1)
