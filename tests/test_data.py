"""Tests for dpo_jax.data: tokenizer, synthetic task, tokenisation rules, batching."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HF_FIXTURES
from dpo_jax import data
from dpo_jax.data import BadRecord, WordTokenizer, collate, encode_prompts, encode_record, ground_truth_reward

TOK = data.get_tokenizer("synthetic_words")
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_specials():
    text = "review of the film : great really and loved the"
    ids = TOK.encode(text)
    assert len(ids) == len(text.split()) and min(ids) > TOK.unk_token_id
    assert TOK.decode(ids) == text
    assert TOK.decode(ids + [EOS, PAD, PAD]) == text
    assert (TOK.pad_token_id, TOK.eos_token_id, TOK.unk_token_id) == (0, 1, 2)
    assert TOK.vocab_size == len(data.WORDS) + 3 < 100


def test_tokenizer_unknown_word_is_unk():
    assert TOK.encode("great zyzzyva") == [TOK.encode("great")[0], TOK.unk_token_id]
    assert WordTokenizer(["a", "b"]).encode("b c a") == [4, 2, 3]


def test_unknown_tokenizer_name_lists_valid_names():
    with pytest.raises(ValueError, match="synthetic_words"):
        data.get_tokenizer("nope")
    assert "synthetic_words" in data.tokenizer_names()


# --- synthetic task ----------------------------------------------------------------------------


def test_ground_truth_reward_by_hand():
    assert ground_truth_reward("great food and loved it") == 2.0
    assert ground_truth_reward("boring plot awful and great") == -1.0


def test_pairs_labelled_by_ground_truth_and_deterministic():
    pairs = data.make_preference_pairs(300, seed=0)
    assert all(ground_truth_reward(p["chosen"]) > ground_truth_reward(p["rejected"]) for p in pairs)
    assert pairs == data.make_preference_pairs(300, seed=0)
    assert pairs != data.make_preference_pairs(300, seed=1)
    vocab = set(data.WORDS)
    assert all(set(" ".join(p.values()).split()) <= vocab for p in pairs)
    # The base distribution mixes sentiment: negative chosen and positive rejected both occur.
    assert any(ground_truth_reward(p["chosen"]) < 0 for p in pairs)
    assert any(ground_truth_reward(p["rejected"]) > 0 for p in pairs)


def test_prompts_and_source_registry():
    prompts = data.make_prompts(20, seed=3)
    assert prompts == data.make_prompts(20, seed=3) and all(p.endswith(":") for p in prompts)
    train = data.load_split("synthetic_sentiment", "train", num_records=5, seed=2)
    assert [{k: r[k] for k in data.PAIRED_FIELDS} for r in train] == data.make_preference_pairs(5, 2)
    assert train[1]["origin"] == "synthetic_sentiment/train 1" and train[1]["problem"] == ""
    held_out = data.load_split("synthetic_sentiment", "eval", num_records=5, seed=2)  # the next seed's stream
    assert [r["chosen"] for r in held_out] == [p["chosen"] for p in data.make_preference_pairs(5, 3)]
    with pytest.raises(ValueError, match="synthetic_sentiment"):
        data.load_split("nope", "train")
    assert data.source_names() == ["synthetic_sentiment", "file", "tldr", "hh", "shp", "imdb"]


# --- encode_record: the reference rules ----------------------------------------------------------


def encode(example, tokenizer=TOK, **kwargs):
    kwargs.setdefault("max_length", 12)
    kwargs.setdefault("max_prompt_length", 6)
    return encode_record(example, tokenizer, **kwargs)


def rows(encoded, length):
    """The padded chosen/rejected rows and masks of one encoded pair, as batches carry them."""
    return collate([encoded], buckets=(length,), pad_id=PAD)


def test_encoded_pair_mask_eos_padding():
    ex = {"prompt": "review of the film :", "chosen": "great was", "rejected": "awful and boring"}
    out = encode(ex)
    p = TOK.encode(ex["prompt"])
    assert not out["truncated"] and out["prompt"].tolist() == p
    batch = rows(out, 12)
    for key, text in (("chosen", ex["chosen"]), ("rejected", ex["rejected"])):
        tokens, mask = getattr(batch, key).tokens_BxT[0], getattr(batch, key).loss_mask_BxT[0]
        assert tokens.dtype == np.int32 and mask.dtype == np.float32 and tokens.shape == mask.shape == (12,)
        c = TOK.encode(text) + [EOS]
        n = len(p) + len(c)
        np.testing.assert_array_equal(tokens[:n], p + c)
        np.testing.assert_array_equal(mask[:n], [0] * len(p) + [1] * len(c))
        assert (tokens[n:] == PAD).all() and (mask[n:] == 0).all()


def test_keep_end_and_keep_start_truncate_long_prompt():
    words = data.WORDS[:10]
    ex = {"prompt": " ".join(words), "chosen": "great", "rejected": "awful"}
    end = encode(ex, max_length=6, max_prompt_length=4, truncation_mode="keep_end")
    start = encode(ex, max_length=6, max_prompt_length=4, truncation_mode="keep_start")
    assert end["truncated"] and start["truncated"]
    assert TOK.decode(end["prompt"]) == " ".join(words[-4:]) and TOK.decode(start["prompt"]) == " ".join(words[:4])
    assert end["chosen"].tolist() == TOK.encode("great") + [EOS]


def test_completion_truncation_keeps_at_least_one_token():
    ex = {"prompt": "review of the film :", "chosen": "great really and loved the", "rejected": "awful"}
    out = encode(ex, max_length=7, max_prompt_length=5)
    assert out["truncated"] and TOK.decode(out["chosen"]) == "great really" and EOS not in out["chosen"]
    assert out["rejected"].tolist() == TOK.encode("awful") + [EOS]
    assert len(encode(ex, max_length=6, max_prompt_length=5)["chosen"]) == 1


def test_completions_cut_to_max_length_minus_max_prompt_length_as_reference_code():
    # Prompt of 3 tokens (under max_prompt_length 5) + 7-token completion > max_length 8: the reference
    # code leaves the prompt alone and cuts completions to 8 − 5 = 3 tokens (not 8 − 3).
    ex = {"prompt": "review of the", "chosen": "great really and loved the was", "rejected": "awful"}
    out = encode(ex, max_length=8, max_prompt_length=5)
    assert TOK.decode(out["prompt"]) == "review of the" and TOK.decode(out["chosen"]) == "great really and"
    assert rows(out, 8).chosen.loss_mask_BxT[0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert len(out["rejected"]) == 2 and out["truncated"]


GOOD = {"prompt": "review of the film :", "chosen": "great", "rejected": "awful", "origin": "f.jsonl:3", "problem": ""}


@pytest.mark.parametrize("record, reason, detail", [
    ({**GOOD, "chosen": "   "}, "empty_completion", "'chosen' is empty"),
    ({**GOOD, "prompt": ""}, "empty_prompt", "the prompt is empty"),
    ({k: v for k, v in GOOD.items() if k != "rejected"}, "missing_field", "no 'rejected'"),
    ({**GOOD, "rejected": 3}, "not_a_string", "'rejected' is a int"),
    ({**GOOD, "rejected": "great"}, "identical_completions", "chosen and rejected encode to the same tokens"),
    ({**GOOD, "problem": "invalid_utf8: byte 0xff at 12"}, "invalid_utf8", "byte 0xff at 12"),
    ({"prompt": "a", "completion": "great", "label": 1, "origin": "f.jsonl:3"}, "bad_label", "label is 1"),
])
def test_bad_records_name_reason_and_origin(record, reason, detail):
    with pytest.raises(BadRecord, match=rf"^f\.jsonl:3: {reason}: {detail}") as caught:
        encode(record)
    assert caught.value.reason == reason and caught.value.origin == "f.jsonl:3"


def test_bad_lengths_and_mode_raise():
    ex = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode(ex, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="truncation_mode"):
        encode(ex, max_length=8, max_prompt_length=4, truncation_mode="middle")


_word = st.sampled_from(data.WORDS)


@settings(max_examples=150, deadline=None)
@given(
    prompt=st.lists(_word, min_size=1, max_size=12),
    chosen=st.lists(_word, min_size=1, max_size=12),
    rejected=st.lists(_word, min_size=1, max_size=12),
    max_length=st.integers(2, 20),
    data_=st.data(),
    mode=st.sampled_from(data.TRUNCATION_MODES),
)
def test_mask_property(prompt, chosen, rejected, max_length, data_, mode):
    max_prompt_length = data_.draw(st.integers(1, max_length - 1))
    ex = {"prompt": " ".join(prompt), "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
    if chosen == rejected:
        with pytest.raises(BadRecord, match="identical_completions"):
            encode(ex, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
        return
    out = encode(ex, max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
    batch = rows(out, max_length)
    longer = max(len(chosen), len(rejected)) + 1
    kept = len(prompt) if len(prompt) + longer <= max_length else min(len(prompt), max_prompt_length)
    for key, words in (("chosen", chosen), ("rejected", rejected)):
        tokens, mask = getattr(batch, key).tokens_BxT[0], getattr(batch, key).loss_mask_BxT[0]
        n = int(mask.sum())
        fits = kept + longer <= max_length
        assert n == (len(words) + 1 if fits else min(len(words) + 1, max_length - max_prompt_length)) >= 1
        assert (mask[:kept] == 0).all() and (mask[kept : kept + n] == 1).all() and (mask[kept + n :] == 0).all()
        under = tokens[mask > 0].tolist()
        assert TOK.decode(under) == " ".join(words[: len(under)])
        assert (under[-1] == EOS) == (n == len(words) + 1)
    assert out["truncated"] == (len(prompt) + longer > max_length)


def test_encode_prompts():
    prompts = ["review of the film :", "a b c d e f"]
    tokens, lengths = encode_prompts(prompts, TOK, max_prompt_length=4, truncation_mode="keep_end")
    assert tokens.shape == (2, 4) and tokens.dtype == np.int32 and lengths.tolist() == [4, 4]
    assert TOK.decode(tokens[0]) == "of the film :"
    tokens, lengths = encode_prompts(["great"], TOK, max_prompt_length=3)
    assert tokens.tolist() == [[TOK.encode("great")[0], PAD, PAD]] and lengths.tolist() == [1]
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty_prompt"):
        encode_prompts(["great", ""], TOK, max_prompt_length=3)


# --- Hugging Face tokenizers: BOS, the boundary, chat templates -----------------------------------


def hf_tokenizer(name):
    return data.get_tokenizer("model", f"{HF_FIXTURES}/{name}")


@pytest.mark.parametrize("name, prefix", [("gpt2", ()), ("llama", (1,)), ("qwen2", ())])
def test_special_prefix_once_on_the_prompt_never_on_completions(name, prefix):
    tok = hf_tokenizer(name)
    assert tok.special_prefix == prefix
    ex = {"prompt": "review of the film :", "chosen": " great loved", "rejected": " awful"}
    out = encode(ex, tok, max_length=64, max_prompt_length=32)
    inner = tok.tokenizer.encode(ex["prompt"], add_special_tokens=False)
    assert out["prompt"].tolist() == [*prefix, *inner]
    # Each text tokenised alone: no merge across the boundary, no special token inside a completion but EOS.
    assert out["chosen"].tolist() == [*tok.tokenizer.encode(" great loved", add_special_tokens=False), tok.eos_token_id]
    assert not set(out["chosen"][:-1].tolist()) & tok.special_ids
    # keep_end truncation keeps the BOS.
    long = encode({**ex, "prompt": "review of the film : " * 8}, tok, max_length=12, max_prompt_length=6)
    assert len(long["prompt"]) == 6 and long["prompt"][: len(prefix)].tolist() == list(prefix)


def test_llama_chat_template_bos_is_not_duplicated_and_its_eos_ends_the_completion():
    tok = hf_tokenizer("llama")
    messages = [{"role": "user", "content": "what is the capital of France?"}]
    out = encode({"prompt": messages, "chosen": [{"role": "assistant", "content": "Paris"}],
                  "rejected": [{"role": "assistant", "content": "France"}]}, tok, max_length=64, max_prompt_length=48)
    rendered = tok.render_chat(messages, add_generation_prompt=True)
    assert rendered.startswith("<s>[INST]")
    assert out["prompt"].tolist() == tok.tokenizer.encode(rendered, add_special_tokens=False)  # one BOS, the template's
    assert out["prompt"].tolist().count(tok.tokenizer.bos_token_id) == 1
    assert tok.tokenizer.convert_ids_to_tokens(out["chosen"].tolist()) == ["▁Paris", "▁", "</s>"]  # one EOS


def test_chatml_completion_ends_at_its_eos_without_the_trailing_newline():
    tok = hf_tokenizer("qwen2")
    out = encode({"prompt": [{"role": "user", "content": "what is the capital of France?"}],
                  "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": "France"}, tok,
                 max_length=64, max_prompt_length=48)
    assert tok.tokenizer.decode(out["prompt"]).endswith("<|im_start|>assistant\n")
    assert tok.tokenizer.decode(out["chosen"]) == "Paris<|im_end|>" and out["chosen"][-1] == tok.eos_token_id
    with pytest.raises(BadRecord, match="bad_messages: 'chosen' is chat messages but the prompt is plain text"):
        encode({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, tok,
               max_length=64, max_prompt_length=48)
    with pytest.raises(ValueError, match="has no chat template"):
        encode({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, hf_tokenizer("gpt2"),
               max_length=64, max_prompt_length=48)


# --- scan, batches ------------------------------------------------------------------------------


def records(n, seed=0):
    return data.load_split("synthetic_sentiment", "train", num_records=n, seed=seed)


def scanned(n=10, **kwargs):
    return data.scan(records(n), TOK, max_length=16, max_prompt_length=8, name="test", **kwargs)


def test_scan_skips_and_counts_bad_records_or_stops_on_the_first_when_strict(caplog):
    good = records(6)
    bad = good[:2] + [{**good[0], "chosen": "", "origin": "x:3"}, {"prompt": "x", "origin": "x:4"},
                      {**good[0], "rejected": good[0]["chosen"], "origin": "x:5"}] + good[2:]
    with pytest.raises(ValueError, match=r"^test: x:3: empty_completion: 'chosen' is empty \(data.strict = True\)$"):
        data.scan(bad, TOK, max_length=16, max_prompt_length=8, name="test", strict=True)
    caplog.clear()
    examples = data.scan(bad, TOK, max_length=16, max_prompt_length=8, name="test")
    assert len(examples) == 6 and examples.paired
    assert examples.report == {
        "records": 9, "examples": 6, "truncated": 0,
        "skipped": {"empty_completion": 1, "identical_completions": 1, "missing_field": 1},
        "skipped_examples": {"empty_completion": ["x:3: 'chosen' is empty"],
                             "identical_completions": ["x:5: chosen and rejected encode to the same tokens"],
                             "missing_field": ["x:4: neither 'chosen' and 'rejected' (paired) nor 'completion' (unpaired)"]},
    }
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "test: 9 records, 6 kept, 3 skipped" in caplog.records[0].getMessage()
    long = [{"prompt": "great " * 20, "chosen": "great", "rejected": "awful"}] + records(6)
    assert data.scan(long, TOK, max_length=16, max_prompt_length=8).report["truncated"] == 1
    with pytest.raises(ValueError, match="no usable records among 1"):
        data.scan([{"prompt": "x"}], TOK, max_length=16, max_prompt_length=8)


def ids(batch):
    """Each batch row as a hashable key."""
    return [r.tobytes() + s.tobytes() for r, s in zip(batch.chosen.tokens_BxT, batch.rejected.tokens_BxT)]


def test_train_batches_deterministic_epochs_resumable_and_sharded():
    examples = scanned(10)
    batches = data.TrainBatches(examples, batch_size=4, seed=7, buckets=(16,), pad_id=PAD)
    assert ids(batches.batch_at(3)) == ids(data.TrainBatches(examples, batch_size=4, seed=7, buckets=(16,),
                                                              pad_id=PAD).batch_at(3))
    assert ids(batches.batch_at(3)) != ids(data.TrainBatches(examples, batch_size=4, seed=8, buckets=(16,),
                                                              pad_id=PAD).batch_at(3))
    # 4-row batches straddle epochs of 10: each epoch is a permutation, a new one each time.
    order = [key for k in range(15) for key in ids(batches.batch_at(k))]
    epochs = [order[e * 10:(e + 1) * 10] for e in range(6)]
    assert all(len(set(epoch)) == 10 for epoch in epochs) and epochs[0] != epochs[1]
    # The iterator yields batch_at(0), batch_at(1), ...; its state after k batches resumes at batch k.
    iterator = batches.iterator()
    first = [ids(next(iterator)) for _ in range(5)]
    state = iterator.get_state()
    assert first == [ids(batches.batch_at(k)) for k in range(5)]
    resumed = batches.iterator(state)
    assert [ids(next(resumed)) for _ in range(3)] == [ids(batches.batch_at(k)) for k in (5, 6, 7)]
    # Two processes each take half of every global batch; together they give the single-process batches.
    shards = [data.TrainBatches(examples, batch_size=4, seed=7, buckets=(16,), pad_id=PAD, process_index=p,
                                process_count=2) for p in range(2)]
    for step in range(6):
        halves = [ids(shard.batch_at(step)) for shard in shards]
        assert all(len(h) == 2 for h in halves) and sorted(halves[0] + halves[1]) == sorted(ids(batches.batch_at(step)))


def test_batches_pad_to_the_smallest_bucket_that_fits():
    assert data.length_buckets(512) == (128, 256, 512) and data.length_buckets(24) == (8, 16, 24)
    assert data.length_buckets(64, (16, 100)) == (16, 64)
    short = encode({"prompt": "review of the film :", "chosen": "great", "rejected": "awful"}, max_length=16)
    long = encode({"prompt": "review of the film :", "chosen": "great " * 9, "rejected": "awful"}, max_length=16)
    assert collate([short, short], (8, 16), PAD).chosen.tokens_BxT.shape == (2, 8)
    assert collate([short, long], (8, 16), PAD).chosen.tokens_BxT.shape == (2, 16)
    with pytest.raises(ValueError, match="longer than the longest length bucket 8"):
        collate([short, long], (8,), PAD)


def test_eval_batches_cover_each_example_once_by_weight():
    examples = scanned(10)
    batches = list(data.eval_batches(examples, 4, (16,), PAD))
    assert len(batches) == 3 and all(b.chosen.tokens_BxT.shape == (4, 16) for b in batches)
    expected = ids(collate(examples.encoded, (16,), PAD))
    seen = [key for b in batches for key, w in zip(ids(b), b.weight) if w]
    assert seen == expected
    assert batches[-1].weight.tolist() == [1, 1, 0, 0] and batches[-1].weight.dtype == np.float32
    with pytest.raises(ValueError, match="batch_size"):
        list(data.eval_batches(examples, 11, (16,), PAD))
    with pytest.raises(ValueError, match="batch_size"):
        data.TrainBatches(examples, batch_size=11, seed=0, buckets=(16,), pad_id=PAD)


def test_unpaired_batches_and_pairs_split_for_kto():
    unpaired = data.split_pairs(scanned(3))
    assert not unpaired.paired and len(unpaired) == 6 and [e["label"] for e in unpaired.encoded[:2]] == [True, False]
    batch = collate(unpaired.encoded[:3], (16,), PAD)
    assert isinstance(batch, data.UnpairedBatch) and batch.label.tolist() == [1.0, 0.0, 1.0]
    # kl row i pairs prompt i with completion i + 1 (mod 3).
    for i in range(3):
        prompt_length, completion = len(unpaired.encoded[i]["prompt"]), unpaired.encoded[(i + 1) % 3]["completion"]
        np.testing.assert_array_equal(batch.kl.tokens_BxT[i, prompt_length:prompt_length + len(completion)],
                                      completion)
        assert batch.kl.loss_mask_BxT[i].sum() == len(completion)


@pytest.mark.parametrize("layout, paired, batch_type, fields", [
    (data.Layout(), True, data.PairedBatch, ("chosen", "rejected")),
    (data.Layout(completion_only=True), True, data.PairedBatch, ("chosen", "rejected")),
    (data.Layout("shared_prompt"), True, data.SharedPromptBatch, ("rows",)),
    (data.Layout(), False, data.UnpairedBatch, ("completion", "kl")),
    (data.Layout("shared_prompt"), False, data.UnpairedBatch, ("completion", "kl")),  # unpaired rows never share
])
def test_collate_gives_each_layout_its_batch_type_with_the_batch_axis_first(layout, paired, batch_type, fields):
    examples = scanned(5) if paired else data.split_pairs(scanned(3))
    batch = next(data.eval_batches(examples, 5, data.length_buckets(16, pack=layout.pack), PAD, layout))
    assert type(batch) is batch_type and batch.weight.shape == (5,)
    for name in fields:
        rows = getattr(batch, name)
        assert rows.completion_only == layout.completion_only
        assert (rows.loss_mask_BxT is None) == (layout.pack == "shared_prompt" and paired)  # shared rows: the block
        shared = batch_type is data.SharedPromptBatch
        assert (rows.positions_BxT is not None) == (rows.branch_ids_BxT is not None) == shared
    leaves = jax.tree.leaves(batch)
    assert leaves and all(isinstance(x, np.ndarray) and x.shape[0] == 5 for x in leaves)
    # Cached π_ref log-probs ride with paired examples into their batches.
    if paired:
        cached = data.with_reference_logps(examples.encoded, np.arange(5.0), -np.arange(5.0))
        batch = collate(cached, (16, 32), PAD, layout=layout)
        assert batch.reference_chosen.tolist() == [0, 1, 2, 3, 4] and batch.reference_rejected.dtype == np.float32
        assert batch.reference_rejected.tolist() == [0, -1, -2, -3, -4]
        with pytest.raises(ValueError, match="4 chosen and 5 rejected values for 5 examples"):
            data.with_reference_logps(examples.encoded, np.zeros(4), np.zeros(5))
    else:
        with pytest.raises(ValueError, match="for paired examples"):
            data.with_reference_logps(examples.encoded, np.zeros(6), np.zeros(6))


_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\n", "great", " loved it", "<|im_end|>", "</s>", "<s>", "<|endoftext|>", "é ü 中"]),
)
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": _text}),
                     max_size=3)
_value = st.one_of(_text, _messages, st.none(), st.integers(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(
    record=st.fixed_dictionaries({}, optional={"prompt": _value, "chosen": _value, "rejected": _value,
                                               "completion": _value, "label": _value}),
    name=st.sampled_from(["synthetic", "gpt2", "llama", "qwen2"]),
    max_length=st.integers(2, 24),
    data_=st.data(),
)
def test_fuzzed_records_encode_or_raise_bad_record_never_an_empty_completion(record, name, max_length, data_):
    """Whatever a record holds, tokenisation gives completions with a token of their own, or a BadRecord."""
    tokenizer = TOK if name == "synthetic" else hf_tokenizer(name)
    max_prompt_length = data_.draw(st.integers(1, max_length - 1))
    try:
        out = encode_record(record, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    except BadRecord as bad:
        assert bad.reason in data.REASONS
        return
    except ValueError as error:  # the one whole-data error: chat messages for a tokenizer without a template
        assert "has no chat template" in str(error)
        return
    completions = [out[k] for k in ("chosen", "rejected", "completion") if k in out]
    assert completions and len(out["prompt"]) >= 1
    for ids in completions:
        assert len(ids) >= 1 and not set(ids.tolist()) <= tokenizer.special_ids
        assert len(out["prompt"]) + len(ids) <= max_length


def test_two_processes_resume_exactly_where_one_would():
    """Each of 2 processes saves its iterator state at step 3 and resumes from it; the global batches (the two
    halves together) equal the single-process order throughout."""
    examples = scanned(10)
    single = data.TrainBatches(examples, batch_size=4, seed=5, buckets=(16,), pad_id=PAD)
    shards = [data.TrainBatches(examples, batch_size=4, seed=5, buckets=(16,), pad_id=PAD, process_index=p,
                                process_count=2) for p in range(2)]
    iterators = [shard.iterator() for shard in shards]
    before = [sorted(ids(next(iterators[0])) + ids(next(iterators[1]))) for _ in range(3)]
    states = [iterator.get_state() for iterator in iterators]
    resumed = [shard.iterator(state) for shard, state in zip(shards, states)]
    after = [sorted(ids(next(resumed[0])) + ids(next(resumed[1]))) for _ in range(3)]
    assert before + after == [sorted(ids(single.batch_at(k))) for k in range(6)]
