"""Input throughput: how fast records are tokenised (the scan), and how fast Grain serves training batches of
64 pairs × 512 tokens from them, on this machine.

    python benchmarks/data_throughput.py [--records 4096] [--threads 1 8] [--batches 200]

Records are the dummy TL;DR comparisons of tests/fixtures/tfds/tldr, prepared through the TFDS builder, with
each post repeated 4× (about the length of a real TL;DR post in tokens), tokenised with the GPT-2-style fixture
tokenizer (a 300-id byte-level BPE: more tokens per character than GPT-2's 50k vocabulary, the same per-token
work) under the paper's max_length 512 / max_prompt_length 256: prompts are cut to 256 tokens, so every batch
pads to the 512 bucket.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from dpo_jax import data
from dpo_jax.data.tfds_sources import load_tfds_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(max_length=512, max_prompt_length=256, truncation_mode="keep_end")


def scaled_tldr_records(count: int) -> list[dict]:
    """`count` TL;DR-shaped records: the dummy comparisons, each post repeated 4×."""
    prepared = load_tfds_records("tldr", "train", tempfile.mkdtemp(), download=False,
                                 raw_dir=os.path.join(REPO, "tests", "fixtures", "tfds", "tldr"))
    good = [r for r in prepared if not r["problem"]]
    records = []
    for i in range(count):
        r = good[i % len(good)]
        post_start = r["prompt"].index("POST: ") + len("POST: ")
        prompt = r["prompt"][:post_start] + r["prompt"][post_start:-len("\n\nTL;DR:")] * 4 + "\n\nTL;DR:"
        records.append({"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"],
                        "origin": f"{r['origin']} #{i}", "problem": ""})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    tokenizer = data.get_tokenizer("model", os.path.join(REPO, "tests", "fixtures", "hf", "gpt2"))
    records = scaled_tldr_records(args.records)
    print(f"{os.cpu_count()} CPU cores; {len(records)} records")
    for threads in args.threads:
        started = time.perf_counter()
        examples = data.scan(records, tokenizer, num_threads=threads, name="bench", **SETTINGS)
        seconds = time.perf_counter() - started
        print(f"scan, {threads:2d} thread(s): {len(records) / seconds:8.0f} pairs/s ({seconds:.2f} s)")
    raw = [len(tokenizer.encode(r["prompt"])) for r in records[:64]]
    lengths = [len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"])) for e in examples.encoded]
    print(f"prompt tokens before truncation: mean {sum(raw) / len(raw):.0f}; kept tokens per pair (prompt + longer "
          f"completion): mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")

    batches = data.TrainBatches(examples, batch_size=64, seed=0, buckets=data.length_buckets(512), pad_id=0)
    iterator = batches.iterator()
    first = next(iterator)
    print(f"batch shape: {first.chosen.tokens_BxT.shape} (chosen; rejected the same)")
    started = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    seconds = time.perf_counter() - started
    print(f"Grain iterator: {args.batches / seconds:.1f} batches/s of 64 pairs x 512 tokens "
          f"({64 * args.batches / seconds:.0f} pairs/s)")


if __name__ == "__main__":
    main()
