"""The embedded demo: Preferred-FT then DPO on built-in synthetic sentiment reviews, on a CPU.

    python -m dpo_jax.main --config=configs/demo.py --workdir=/tmp/dpo_demo

No download: the data (prompts that open a review, completions whose ground-truth reward counts
positive minus negative words), the word tokenizer and a tiny Llama-style decoder are built in.
Everything else keeps the paper's defaults from `dpo_jax.config.base_config` (β=0.1, 64 pairs a
step, RMSprop, 150 warmup steps then constant, clip 10) except what a 77k-parameter model needs:
larger learning rates, a short warmup for Preferred-FT, and the DPO loss with a small NLL term on the
chosen completions (`rpo`), which keeps plain DPO's likelihood displacement from emptying the greedy
samples at some seeds (docs/demo.md; `--config.loss.name=dpo` shows it). Finishes in about a
minute on 2 CPU cores.
"""

from dpo_jax.config import base_config


def get_config(arg: str | None = None):
    """`arg='smoke'` shrinks the run further (tests, quick checks)."""
    config = base_config()
    config.model.update(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        tie_embeddings=True,
    )
    config.data.update(num_train_pairs=2048, num_eval_pairs=256, num_eval_prompts=128, max_length=24, max_prompt_length=12)
    # A tiny model from scratch needs learning rates ~100-1000x the paper's 1e-6 for 6B-parameter models.
    config.sft.update(num_steps=300, learning_rate=1e-3, warmup_steps=20)
    # DPO keeps the paper's RMSprop and its 150 warmup steps: RMSprop has no bias correction, so its first
    # steps are ~10x the learning rate.
    config.dpo.update(num_steps=300, learning_rate=1e-4)
    # Plain DPO lowers the chosen log-prob along with the rejected one, and the freed probability goes to EOS,
    # which neither completion has before its fifth word, so greedy samples end early: 1 of seeds 0-9 passes.
    # RPO (Pang et al., 2024) adds α·NLL(y_w)/|y_w|, which pushes EOS down wherever y_w has a word; α=0.2
    # passes all ten seeds. α=1 holds π so close to the chosen data that greedy samples stay π_ref's.
    # Measured in experiments/demo_seeds/study.py; docs/demo.md has the figures.
    config.loss.update(name="rpo", alpha=0.2)
    config.train.update(eval_batch_size=128, log_every=10, eval_every=50, checkpoint_every=50)
    config.eval.update(max_new_tokens=10)
    if arg == "smoke":
        config.sft.num_steps, config.dpo.num_steps = 200, 200
        config.data.update(num_eval_pairs=128, num_eval_prompts=32)
        config.train.update(eval_every=40, checkpoint_every=40)
    elif arg:
        raise ValueError(f"configs/demo.py: unknown argument {arg!r}; valid: 'smoke' or none")
    return config
