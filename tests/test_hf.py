"""Hugging Face checkpoints: logits equal transformers' for every family, bitwise export round trips, packed rows,
checkpoint layouts published models use, offline repo ids, tokenizers, and an error for every mismatch.

The fixtures in tests/fixtures/hf/ (tiny random checkpoints with golden logits) are written by
tests/fixtures/make_hf_fixtures.py with transformers + torch; torch is needed only to regenerate them.
"""

import dataclasses
import functools
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import HF_FIXTURES
from dpo_jax import data, models
from dpo_jax.models import apply_model, load_hf, save_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = sorted(os.listdir(HF_FIXTURES))
# One fixture per family (llama3 also covers Llama-3 rope scaling and tied embeddings).
ONE_PER_FAMILY = ["gpt2", "gptj", "gpt_neox", "llama3", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3"]
TOLERANCE = 1e-4


def fixture_dir(name):
    return os.path.join(HF_FIXTURES, name)


@functools.lru_cache(maxsize=None)
def load_fixture(name):
    return load_hf(fixture_dir(name))


@functools.lru_cache(maxsize=None)
def forward_fn(graphdef):
    """Jitted (params, tokens, positions, segment ids) -> float32 logits, one compile per model structure."""

    @jax.jit
    def forward(params, tokens, positions=None, segment_ids=None):
        hidden, logits_fn = apply_model(graphdef, params, tokens, positions, segment_ids)
        return logits_fn(hidden)

    return forward


def golden(name):
    with np.load(os.path.join(fixture_dir(name), "golden.npz")) as golden:
        return golden["tokens"], golden["logits"]


def max_logit_diff(graphdef, params, name):
    tokens, expected = golden(name)
    return float(np.abs(np.asarray(forward_fn(graphdef)(params, tokens)) - expected).max())


def checkpoint_tensors(directory):
    """{name: array} of every safetensors file in a checkpoint directory."""
    tensors = {}
    for file in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        tensors.update(load_file(file))
    return tensors


def copy_fixture(name, tmp_path):
    return shutil.copytree(fixture_dir(name), tmp_path / name)


def rewrite_weights(directory, edit):
    """Replace a single-file checkpoint's tensors with `edit(tensors)`."""
    path = os.path.join(directory, "model.safetensors")
    tensors = edit(load_file(path))
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory, edit):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_transformers(name):
    graphdef, params, config = load_fixture(name)
    with open(os.path.join(fixture_dir(name), "config.json")) as f:
        layout = models.family_of(config).hf  # an image-text checkpoint (gemma3_multimodal): its text part
        assert json.load(f)["model_type"] in (layout.model_type, *layout.text_of)
    assert max_logit_diff(graphdef, params, name) <= TOLERANCE


@pytest.mark.parametrize("name, field", [
    ("llama3", "rope_scaling"), ("mistral", "sliding_window"), ("qwen3", "sliding_window"), ("phi3", "sliding_window"),
    ("gemma2", "attn_logit_softcap"), ("gemma2", "final_logit_softcap"), ("gemma2", "sliding_window"),
    ("gemma3", "sliding_rope_theta"), ("gemma3", "rope_scaling"), ("gemma3", "layer_types"),
    ("qwen3_yarn", "rope_scaling"),
])
def test_the_golden_logits_exercise_the_feature(name, field):
    """Without Llama-3 rope scaling, a window, a soft-cap, Gemma 3's local rotary base, its global scaling or its
    layer types the logits are far off: the golden test sees each of them."""
    graphdef, params, config = load_fixture(name)
    assert getattr(config, field) is not None
    without, _ = models.abstract_model(dataclasses.replace(config, **{field: None}))
    assert max_logit_diff(without, params, name) > 100 * TOLERANCE


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_packed_row_gives_each_sequence_its_own_logits(name):
    """[a | b] in one row, with segment ids and positions restarting at b, equals a and b run alone."""
    graphdef, params, _ = load_fixture(name)
    forward = forward_fn(graphdef)
    tokens, _ = golden(name)
    a, b = tokens[0, :9], tokens[1, :11]
    packed = forward(
        params, np.concatenate([a, b])[None],
        np.concatenate([np.arange(9), np.arange(11)])[None], np.array([[1] * 9 + [2] * 11]),
    )[0]
    np.testing.assert_allclose(packed[:9], forward(params, a[None])[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed[9:], forward(params, b[None])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["gpt_neox_sequential"])
def test_save_then_load_is_a_bitwise_round_trip_with_the_original_tensors(name, scan_layers, tmp_path):
    """Either form of the blocks (stacked: each layer's slice under its layer's name) writes the same tensors."""
    graphdef, params, config = load_fixture(name)
    if scan_layers:
        params, config = models.to_form(params, config, scan_layers=True)
    tokenizer = data.get_tokenizer("model", fixture_dir(name))
    out = str(tmp_path / "export")
    save_hf(params, config, out, tokenizer, max_shard_bytes=60_000 if name == "gpt_neox" else 10**9)

    original, exported = checkpoint_tensors(fixture_dir(name)), checkpoint_tensors(out)
    assert sorted(exported) == sorted(original)
    for tensor_name, array in original.items():
        assert exported[tensor_name].dtype == array.dtype and exported[tensor_name].shape == array.shape
        np.testing.assert_array_equal(exported[tensor_name], array, err_msg=tensor_name)
    if name == "gpt_neox":  # above the threshold: shards and an index
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert sorted(index["weight_map"]) == sorted(original) and len(set(index["weight_map"].values())) > 1
        assert not os.path.exists(os.path.join(out, "model.safetensors"))

    _, reloaded, reloaded_config = load_hf(out, scan_layers=scan_layers)
    assert reloaded_config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    with open(os.path.join(fixture_dir(name), "config.json")) as f:
        fixture_config = json.load(f)
    assert written["architectures"] == fixture_config["architectures"] and written["model_type"] == fixture_config["model_type"]
    assert "scan_layers" not in written  # how we run the blocks is not the architecture
    assert written["eos_token_id"] == tokenizer.eos_token_id and written["dtype"] == "float32"
    assert data.get_tokenizer(f"hf:{out}").encode("review of the film") == tokenizer.encode("review of the film")


def test_save_in_another_dtype(tmp_path):
    _, params, config = load_fixture("llama")
    save_hf(params, config, str(tmp_path), dtype="bfloat16")
    assert {str(a.dtype) for a in checkpoint_tensors(str(tmp_path)).values()} == {"bfloat16"}
    _, params16, config16 = load_hf(str(tmp_path), dtype="bfloat16")
    assert config16.dtype == "bfloat16" and {str(x.dtype) for x in jax.tree.leaves(params16)} == {"bfloat16"}
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_either_form_of_rope_settings_in_config_json(tmp_path):
    """transformers 5 writes `rope_parameters`; published checkpoints carry `rope_theta` + `rope_scaling`, and
    Pythia `rotary_pct` + `rotary_emb_base`: each gives the same model."""
    legacy_llama = copy_fixture("llama3", tmp_path)

    def to_legacy_llama(config):
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope

    edit_config(legacy_llama, to_legacy_llama)
    assert models.read_hf_config(str(legacy_llama)) == load_fixture("llama3")[2]
    legacy_neox = copy_fixture("gpt_neox", tmp_path)

    def to_legacy_neox(config):
        rope = config.pop("rope_parameters")
        config.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])

    edit_config(legacy_neox, to_legacy_neox)
    assert models.read_hf_config(str(legacy_neox)) == load_fixture("gpt_neox")[2]


def test_published_tensor_names_load_the_same(tmp_path):
    """GPT-2's original files: no `transformer.` prefix, and causal-mask buffers; Pythia's head as `lm_head`."""
    gpt2 = copy_fixture("gpt2", tmp_path)

    def to_original_gpt2(tensors):
        renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        return renamed

    rewrite_weights(gpt2, to_original_gpt2)
    neox = copy_fixture("gpt_neox_sequential", tmp_path)
    rewrite_weights(neox, lambda t: {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in t.items()})
    for directory, name in ((gpt2, "gpt2"), (neox, "gpt_neox_sequential")):
        _, params, _ = load_hf(str(directory))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(load_fixture(name)[1])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_mismatch_is_an_error_that_names_it(tmp_path):
    unsupported = tmp_path / "t5"
    unsupported.mkdir()
    (unsupported / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match=r"t5/config.json: model_type 't5' is not supported; supported: gemma2, gemma3, gemma3_text, gpt2"):
        load_hf(str(unsupported))

    missing = copy_fixture("llama", tmp_path / "missing")
    rewrite_weights(missing, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\], unexpected tensors \[\]"):
        load_hf(str(missing))

    unexpected = copy_fixture("llama", tmp_path / "unexpected")
    rewrite_weights(unexpected, lambda t: {**t, "model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match=r"missing tensors \[\], unexpected tensors \['model.layers.0.self_attn.q_norm.weight'\]"):
        load_hf(str(unexpected))

    misshaped = copy_fixture("llama", tmp_path / "misshaped")
    rewrite_weights(misshaped, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \[32, 32\], expected \[16, 32\]"):
        load_hf(str(misshaped))

    shard_lost = copy_fixture("gpt_neox", tmp_path / "shard_lost")
    os.remove(shard_lost / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors: missing safetensors shard named by "
                                                r"model.safetensors.index.json for 10 tensors \(embed_out.weight, gpt_neox.layers.1"):
        load_hf(str(shard_lost))

    no_weights = copy_fixture("llama", tmp_path / "no_weights")
    os.rename(no_weights / "model.safetensors", no_weights / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json \(found: \['pytorch_model.bin'\]\)"):
        load_hf(str(no_weights))

    dynamic = copy_fixture("llama", tmp_path / "dynamic")
    edit_config(dynamic, lambda c: c["rope_parameters"].update(rope_type="dynamic", factor=4.0))
    with pytest.raises(ValueError, match=r"config.json: rope_type 'dynamic' is not supported; supported: default, linear, "
                                         r"llama3, yarn"):
        load_hf(str(dynamic))

    tied_gptj = copy_fixture("gptj", tmp_path / "tied_gptj")
    edit_config(tied_gptj, lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"gptj with tie_word_embeddings=True is not supported \(only False\)"):
        load_hf(str(tied_gptj))

    with pytest.raises(FileNotFoundError, match=r"model path '/no/such/dir': no such directory"):
        load_hf("/no/such/dir")

    _, params, config = load_fixture("llama")
    with pytest.raises(ValueError, match=r"has no Llama checkpoint form: Llama has one attention_bias"):
        save_hf(params, dataclasses.replace(config, qkv_bias=True), str(tmp_path / "qkv_bias"))
    assert not (tmp_path / "qkv_bias").exists()


def test_tokenizers_of_checkpoints_and_the_word_tokenizer(tmp_path):
    tokenizer = data.get_tokenizer("model", fixture_dir("llama"))
    assert isinstance(tokenizer, data.HFTokenizer)
    # Llama-2 style: <unk>, <s>, </s> = 0, 1, 2 and no pad token, so padding uses EOS
    assert tokenizer.tokenizer.pad_token_id is None and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert tokenizer.tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size <= load_fixture("llama")[2].vocab_size
    ids = tokenizer.encode("review of the film : great")
    assert ids and tokenizer.eos_token_id not in ids  # no special tokens added
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]) == "review of the film : great"
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'hf:/no/such/dir'"):
        data.get_tokenizer("hf:/no/such/dir")

    words = data.get_tokenizer("synthetic_words")
    words.save_pretrained(str(tmp_path))
    reloaded = data.get_tokenizer(f"hf:{tmp_path}")
    assert reloaded.encode("my thoughts on this cafe : zzz dull") == words.encode("my thoughts on this cafe : zzz dull")
    ids = words.encode("review of the film : great loved")
    assert reloaded.encode("review of the film : great loved") == ids
    assert reloaded.decode(ids + [1, 0]) == words.decode(ids + [1, 0]) == "review of the film : great loved"
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.vocab_size) == (0, 1, words.vocab_size)


def run_python(code, env=None, timeout=300):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_repo_id_from_the_local_cache_offline(tmp_path):
    """A repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1; an uncached one fails clearly."""
    revision = "0" * 40
    snapshot = tmp_path / "hub" / "models--dpo-jax--tiny-qwen2" / "snapshots" / revision
    shutil.copytree(fixture_dir("qwen2"), snapshot)
    (tmp_path / "hub" / "models--dpo-jax--tiny-qwen2" / "refs").mkdir()
    (tmp_path / "hub" / "models--dpo-jax--tiny-qwen2" / "refs" / "main").write_text(revision)
    out = run_python(
        """
        from dpo_jax import data, models
        _, _, config = models.load_hf("dpo-jax/tiny-qwen2")
        print(type(config).__name__, data.get_tokenizer("model", "dpo-jax/tiny-qwen2").vocab_size)
        try:
            models.load_hf("dpo-jax/not-cached")
        except FileNotFoundError as error:
            print(error)
        """,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
    )
    assert out.startswith("Qwen2Config 300\n")
    assert "model path 'dpo-jax/not-cached' is not a local directory, and the Hugging Face Hub gave no copy of it " \
           "(HF_HUB_OFFLINE=1)" in out


def test_load_onto_a_mesh_of_8_devices():
    """`shardings` places each tensor directly on its sharding (stacked blocks: each layer stack); the sharded model
    computes the same logits."""
    out = run_python(
        f"""
        import numpy as np, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from dpo_jax.models import apply_model, load_hf
        mesh = Mesh(np.array(jax.devices()).reshape(8), ("model",))
        def shard_last_axis(path, target):
            spec = P(*[None] * (len(target.shape) - 1), "model") if target.shape[-1] % 8 == 0 else P()
            return NamedSharding(mesh, spec)
        graphdef, params, _ = load_hf({fixture_dir("llama")!r}, shardings=shard_last_axis)
        q = params["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
        print(q.sharding.spec, len(q.addressable_shards), q.addressable_shards[0].data.shape)
        golden = np.load({os.path.join(fixture_dir("llama"), "golden.npz")!r})
        @jax.jit
        def logits(params, tokens):
            hidden, logits_fn = apply_model(graphdef, params, tokens)
            return logits_fn(hidden)
        print(float(np.abs(np.asarray(logits(params, golden["tokens"])) - golden["logits"]).max()))
        graphdef, params, _ = load_hf({fixture_dir("llama")!r}, shardings=shard_last_axis, scan_layers=True)
        q = params["layers"]["self_attn"]["q_proj"]["kernel"][...]
        print(q.sharding.spec, len(q.addressable_shards), q.addressable_shards[0].data.shape)
        print(float(np.abs(np.asarray(logits(params, golden["tokens"])) - golden["logits"]).max()))
        """,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"},
    )
    spec_line, diff_line, stacked_spec_line, stacked_diff_line = out.strip().splitlines()[-4:]
    assert spec_line == "P(None, 'model') 8 (32, 4)" and stacked_spec_line == "P(None, None, 'model') 8 (2, 32, 4)"
    assert float(diff_line) <= TOLERANCE and float(stacked_diff_line) <= TOLERANCE
