"""Export a run's checkpoint as a Hugging Face model that transformers (and vLLM) load unchanged:

    python -m dpo_jax.export --workdir=RUN_DIR --out=HF_DIR [--step=N] [--stage=dpo] [--dtype=bfloat16]
    python -m dpo_jax.export --workdir=LORA_RUN_DIR --out=ADAPTER_DIR --format=peft

Reads the architecture from the checkpoint's own metadata, the params alone (not the optimizer state), and
the run's tokenizer; writes config.json, safetensors and the tokenizer files with `models.save_hf`. A LoRA run's
checkpoint holds adapters only: its base is rebuilt as the run built it (model.path, dpo.reference_workdir's SFT
params, or the seeded random model),
checked against the fingerprint the checkpoint recorded, and either merged (base + alpha/r·A·B, dequantised if
stored quantised: `--format=merged`, the default) or the adapters written as a PEFT adapter directory
(`--format=peft`: adapter_config.json + adapter_model.safetensors) for `peft` to load onto the base.
"""

from __future__ import annotations

import ml_collections
from absl import app, flags, logging

from dpo_jax import build, checkpoint, data, lora, models

FORMATS = ("merged", "peft")

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (what --workdir was for dpo_jax.main).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face checkpoint to.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_STAGE = flags.DEFINE_enum("stage", None, ["sft", "dpo"], "Stage to export (default: dpo if it has checkpoints, else sft).")
_DTYPE = flags.DEFINE_enum("dtype", None, list(models.COMPUTE_DTYPES), "Tensor dtype to write (default: as trained).")
_FORMAT = flags.DEFINE_enum("format", "merged", list(FORMATS), "A LoRA run's export: the merged model, or a PEFT "
                            "adapter directory.")


def export_checkpoint(
    workdir: str, out_dir: str, *, stage: str | None = None, step: int | None = None, dtype: str | None = None,
    export_format: str = "merged",
) -> tuple[str, int]:
    """Write `stage`'s checkpoint at `step` (defaults: the last stage, its latest step) to `out_dir`; (stage, step).
    A LoRA checkpoint is written merged into its base, or with `export_format='peft'` as a PEFT adapter."""
    stage = stage or checkpoint.last_stage(workdir)
    step, meta = checkpoint.read_meta(workdir, stage, step)
    if "model" not in meta:
        raise ValueError(f"{checkpoint.stage_directory(workdir, stage)}/{step}: its metadata records no model "
                         "architecture (written by an older dpo_jax); it cannot be exported")
    model_config = models.config_from_dict(meta["model"])
    run = meta["config"]
    tokenizer = data.get_tokenizer(run["data"]["tokenizer"], run["model"]["path"])
    if "lora_base" in meta:
        params = _lora_params(workdir, stage, step, meta, model_config, tokenizer, out_dir, export_format)
        if params is None:
            return stage, step
    else:
        if export_format != "merged":
            raise ValueError(f"--format={export_format}: {workdir}'s {stage} checkpoint holds full params, not "
                             "LoRA adapters; only --format=merged applies")
        _, abstract_params = models.abstract_model(model_config)
        params = checkpoint.load_final_params(workdir, stage, abstract_params, step)
    models.save_hf(params, model_config, out_dir, tokenizer, dtype=dtype)
    return stage, step


def _lora_params(workdir, stage, step, meta, model_config, tokenizer, out_dir, export_format):
    """A LoRA checkpoint's merged float32 params; or, for `export_format='peft'`, its adapters written (None)."""
    config = ml_collections.ConfigDict(meta["config"])
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.train.update(batch_size=1, grad_accum_steps=1, eval_batch_size=1)  # the mesh check only
    mesh = build.make_mesh(config)
    graphdef, plain, _ = build.build_model(config, tokenizer, mesh)
    if config.dpo.reference_workdir:  # the base: that run's final SFT params
        plain = build.sft_params(config.dpo.reference_workdir, model_config, mesh)
    settings = lora.LoraSettings.from_config(config.model.lora)
    fingerprint = lora.base_fingerprint(plain, settings)
    checkpoint.check_base(meta, {"path": config.model.path, "fingerprint": fingerprint},
                          f"{checkpoint.stage_directory(workdir, stage)}/{step} (exporting)")
    adapted, base, abstract_adapters = lora.attach(graphdef, plain, settings, config.seed)
    adapters = checkpoint.load_final_params(workdir, stage, checkpoint.abstract(abstract_adapters), step)
    if export_format == "peft":
        lora.save_peft(adapters, model_config, settings, out_dir, config.model.path)
        return None
    return lora.merged_params(base, adapters, adapted, checkpoint.abstract(plain))


def main(argv):
    del argv
    stage, step = export_checkpoint(_WORKDIR.value, _OUT.value, stage=_STAGE.value, step=_STEP.value,
                                    dtype=_DTYPE.value, export_format=_FORMAT.value)
    logging.info("exported %s step %d of %s to %s", stage, step, _WORKDIR.value, _OUT.value)
    print(f"exported {stage} step {step} of {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
