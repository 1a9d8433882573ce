"""Hugging Face TRL's DPOTrainer on a compare.py workload file; prints one JSON line. Runs in the peer venv (see
docs/speed.md, "Side by side with TRL and Tunix"): imports only torch, transformers, TRL, datasets and numpy.

    /tmp/bench_venv/bin/python benchmarks/peers/trl_dpo.py WORKLOAD.npz

The model is a transformers `LlamaForCausalLM` with the workload's shape (random init, float32, SDPA attention,
untied embeddings); π_ref a copy of it (passed as `ref_model`); `DPOConfig` with the workload's β, lr, weight decay
and clip norm, constant schedule, AdamW (torch's, TRL's default `adamw_torch`), batches in the file's order
(`train_sampling_strategy = "sequential"`). The pairs go in as token ids (`prompt_ids`, `chosen_ids`,
`rejected_ids`); DPOTrainer's tokenization step (`_prepare_dataset`) is skipped since there is no text, and its
collator pads each batch to its longest sequence, as it does by default.

Timing: `trainer.train()` over one warm-up step (batch 0) and then every batch of the file; a callback reads the
clock at each `on_step_end`, so a timed step is everything the Trainer does between two optimizer steps: fetching
and collating the batch, `training_step` (the policy's forward over chosen and rejected concatenated, π_ref's
forward under no_grad, the backward), gradient clipping, AdamW's step and zeroing the gradients.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload")
    args = parser.parse_args()
    spec, pairs = workload_file.load(args.workload)

    import datasets
    import torch
    import transformers
    from importlib.metadata import version
    from tokenizers import Tokenizer, models as tokenizer_models
    from trl import DPOConfig, DPOTrainer

    if spec["dtype"] != "float32":
        raise ValueError(f"trl_dpo.py runs float32 only, the workload asks {spec['dtype']!r}")
    torch.manual_seed(0)
    m = spec["model"]
    config = transformers.LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
        head_dim=m["head_dim"], rms_norm_eps=m["rms_norm_eps"], rope_theta=m["rope_theta"],
        max_position_embeddings=max(4096, 2 * spec["max_length"]), tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    # Token ids only: a stand-in tokenizer for the pad/eos ids DPOTrainer asks for; nothing is tokenized with it.
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tokenizer_models.WordLevel({"<pad>": 0, "<eos>": 1, "<bos>": 2}, "<pad>")),
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")

    batches = workload_file.batches(spec, pairs)
    ordered = batches[0] + [p for b in batches for p in b]  # batch 0 once more as the warm-up step
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": [p["prompt"].tolist() for p in ordered],
        "chosen_ids": [p["chosen"].tolist() for p in ordered],
        "rejected_ids": [p["rejected"].tolist() for p in ordered]})

    class TokenIdsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *unused_args, **unused_kwargs):
            return dataset  # already token ids

    ends = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *unused_args, **unused_kwargs):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as output_dir:
        dpo_config = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], max_steps=len(batches) + 1,
            learning_rate=spec["learning_rate"], weight_decay=spec["weight_decay"],
            max_grad_norm=spec["max_grad_norm"], lr_scheduler_type="constant", warmup_steps=0, beta=spec["beta"],
            max_length=None, train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no",
            report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=0,
            dataloader_num_workers=0)
        trainer = TokenIdsDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=dpo_config,
                                     train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
        started = time.perf_counter()
        trainer.train()
    if len(ends) != len(batches) + 1:
        raise RuntimeError(f"expected {len(batches) + 1} optimizer steps, the Trainer made {len(ends)}")
    shapes = []  # per batch: rows, row length (the batch's longest prompt + completion), LM-head positions per row
    for b in batches:
        length = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in b)
        shapes.append([2 * len(b), length, length])
    print(json.dumps({
        "framework": f"trl {version('trl')}", "seconds_per_step": (ends[-1] - ends[0]) / len(batches),
        "warmup_seconds": ends[0] - started, "timed_steps": len(batches), "padded_shapes": shapes,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__, "attention": model.config._attn_implementation,
    }))


if __name__ == "__main__":
    main()
