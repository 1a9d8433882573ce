"""The KL to π_ref of a run's evaluation samples where the trainer could not compute it.

A loss without a reference (Unlikelihood, Preferred-FT) trains with no π_ref in memory, so the trainer's samples
of its evaluations carry a reward but no KL (it computes the final one only). This adds the KL afterwards, from
the checkpoint of each evaluated step (the pipeline keeps them all): the run's own evaluator samples again with
its fixed rng, which reproduces the recorded samples exactly (checked), and measures the same Σ_t KL as the
trainer does for the other losses.
"""

from __future__ import annotations

import ml_collections

from dpo_jax import build, checkpoint, data
from dpo_jax.metrics_writer import stage_sample_files
from experiments.sentiment.jsonl import read_jsonl, write_jsonl


def missing_kl_steps(workdir: str) -> list[tuple[int, str]]:
    """(step, samples file) of the DPO-stage evaluations in `workdir` whose samples have no 'kl'."""
    return [(step, path) for step, path in stage_sample_files(workdir, "dpo")
            if any("kl" not in record for record in read_jsonl(path))]


def fill_missing_kl(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Add each sample's 'kl' to the samples files of `workdir` (a finished run of `config`) that lack it; returns
    how many files it completed. ValueError if a re-drawn sample differs from the recorded one."""
    missing = missing_kl_steps(workdir)
    if not missing:
        return 0
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    mesh = build.make_mesh(config)
    graphdef, params, _ = build.build_model(config, tokenizer, mesh)
    evaluator = build.make_evaluator(config, graphdef, build.build_data(config, tokenizer), tokenizer, mesh)
    abstract = checkpoint.abstract(params)
    reference = (checkpoint.load_final_params(config.dpo.reference_workdir, "sft", abstract)
                 if config.dpo.reference_workdir else params)  # else π_ref is config.model's checkpoint itself
    for step, path in missing:
        params = reference if step == 0 else checkpoint.load_final_params(workdir, "dpo", abstract, step=step)
        _, redrawn = evaluator(params, reference)
        recorded = read_jsonl(path)
        if [r["completion"] for r in redrawn] != [r["completion"] for r in recorded]:
            raise ValueError(f"{path}: the samples drawn again from step {step}'s checkpoint differ from the "
                             "recorded ones; cannot attribute a KL to them")
        write_jsonl(path, [{**r, "kl": again["kl"]} for r, again in zip(recorded, redrawn)])
    return len(missing)
