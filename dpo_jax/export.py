"""Export a run's checkpoint as a Hugging Face model that transformers (and vLLM) load unchanged:

    python -m dpo_jax.export --workdir=RUN_DIR --out=HF_DIR [--step=N] [--stage=dpo] [--dtype=bfloat16]

Reads the architecture from the checkpoint's own metadata, the params alone (not the optimizer state), and
the run's tokenizer; writes config.json, safetensors and the tokenizer files with `models.save_hf`.
"""

from __future__ import annotations

from absl import app, flags, logging

from dpo_jax import checkpoint, data, models

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (what --workdir was for dpo_jax.main).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_STAGE = flags.DEFINE_enum("stage", None, ["sft", "dpo"], "Stage to export (default: dpo if it has checkpoints, else sft).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(models.COMPUTE_DTYPES), "Tensor dtype to write (default: as trained).")


def export_checkpoint(
    workdir: str, out_dir: str, *, stage: str | None = None, step: int | None = None, dtype: str | None = None
) -> tuple[str, int]:
    """Write `stage`'s checkpoint at `step` (defaults: the last stage, its latest step) to `out_dir`; (stage, step)."""
    stage = stage or checkpoint.last_stage(workdir)
    step, meta = checkpoint.read_meta(workdir, stage, step)
    if "model" not in meta:
        raise ValueError(f"{checkpoint.stage_directory(workdir, stage)}/{step}: its metadata records no model "
                         "architecture (written by an older dpo_jax); it cannot be exported")
    model_config = models.config_from_dict(meta["model"])
    _, abstract_params = models.abstract_model(model_config)
    params = checkpoint.load_final_params(workdir, stage, abstract_params, step)
    run = meta["config"]
    tokenizer = data.get_tokenizer(run["data"]["tokenizer"], run["model"]["path"])
    models.save_hf(params, model_config, out_dir, tokenizer, dtype=dtype)
    return stage, step


def main(argv):
    del argv
    stage, step = export_checkpoint(_WORKDIR.value, _OUT.value, stage=_STAGE.value, step=_STEP.value, dtype=_DTYPE.value)
    logging.info("exported %s step %d of %s to %s", stage, step, _WORKDIR.value, _OUT.value)
    print(f"exported {stage} step {step} of {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
