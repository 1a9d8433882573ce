"""LoRA and QLoRA (dpo_jax/lora.py): π_ref is the base with the adapters off, only adapters train and checkpoint, a
checkpoint belongs to its base, the merged export computes the adapted model, and bad settings fail clearly."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from conftest import HF_FIXTURES, interrupt_stage_at, make_short_config
from dpo_jax import build, checkpoint, data, dry_run, export, lora, losses, models, run, sharding, step
from dpo_jax.config import ConfigError, validate
from dpo_jax.errors import UserError
from test_step import random_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 17
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)
LORA_OVERRIDES = dict(enabled=True, rank=4, alpha=8.0)
FIXTURE = os.path.join(HF_FIXTURES, "llama")  # the base: a tiny Llama checkpoint with its BPE tokenizer
PEFT_FIXTURE = os.path.join(REPO, "tests", "fixtures", "lora_peft")  # tests/fixtures/make_lora_peft_fixture.py
PEFT_TOKENS = np.asarray([[1, 5, 9, 200, 33, 7, 64, 2], [3, 100, 12, 4, 90, 11, 8, 250]], np.int32)


def fixture_adapter():
    """(model config, settings, adapted graphdef, base, adapters): a rank-2 adapter on the q, v and down projections
    of the Llama fixture with B moved off zero (seeded), the adapter the PEFT fixture holds."""
    graphdef, params, model_config = models.load_hf(FIXTURE)
    settings = lora.LoraSettings(rank=2, alpha=4.0, targets=r"(self_attn/[qv]_proj|mlp/down_proj)$")
    adapted, base, adapters = lora.attach(graphdef, params, settings, seed=0)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
    return model_config, settings, adapted, base, adapters


def tiny_model(scan_layers=False, seed=0):
    config = models.make_config("llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                                head_dim=32, intermediate_size=128, scan_layers=scan_layers)
    return models.split_params(models.model_from_config(config, nnx.Rngs(seed)))


def flat(tree):
    return {sharding.path_string(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def lora_config():
    config = make_short_config()
    config.mode = "dpo"
    config.model.path = FIXTURE
    config.data.update(tokenizer="model", max_length=48, max_prompt_length=24)
    config.model.lora.update(**LORA_OVERRIDES)
    return config


@pytest.mark.parametrize("scan_layers", [False, True])
def test_first_step_policy_is_reference_and_loss_is_log_2(scan_layers):
    graphdef, params = tiny_model(scan_layers)
    adapted, base, adapters = lora.attach(graphdef, params, SETTINGS, seed=0)
    assert all(np.all(v == 0) for k, v in flat(adapters).items() if k.endswith("lora_b"))
    assert any(np.any(v != 0) for k, v in flat(adapters).items() if k.endswith("lora_a"))
    loss_fn = lora.wrap_loss_fn(step.make_loss_fn(adapted, "dpo", losses.LossParams(), 4))
    loss, (metrics, _) = jax.jit(loss_fn)(adapters, base, random_batch())
    assert float(loss) == pytest.approx(np.log(2), abs=1e-7)
    assert float(metrics["rewards/chosen"]) == 0 and float(metrics["rewards/rejected"]) == 0  # policy == π_ref
    # The adapted model with the adapters off computes the base's function, exactly.
    tokens = jnp.arange(12)[None] % VOCAB
    np.testing.assert_array_equal(models.apply_model(graphdef, params, tokens)[0],
                                  models.apply_model(adapted, lora.reference_params(lora.combine(base, adapters)),
                                                     tokens)[0])


def test_a_step_trains_the_adapters_alone_and_leaves_the_base_bitwise():
    graphdef, params = tiny_model()
    adapted, base, adapters = lora.attach(graphdef, params, SETTINGS, seed=0)
    base_before, adapter_shapes = flat(base), {p.shape for p in flat(adapters).values()}
    loss_fn = lora.wrap_loss_fn(step.make_loss_fn(adapted, "dpo", losses.LossParams(), 4))
    tx = optax.adam(1e-2)
    train_step = step.make_train_step(loss_fn, tx, lambda count: 1e-2)
    state = step.TrainState.create(adapters, tx)
    for seed in range(2):
        state, metrics = train_step(state, base, random_batch(seed))
    assert float(metrics["loss"]) != pytest.approx(np.log(2))
    # the state holds adapters only: params and optimizer slots
    for path in flat(state.params):
        assert path.endswith(("lora/lora_a", "lora/lora_b")), path
    assert {p.shape for p in flat(state.opt_state).values() if p.ndim} <= adapter_shapes
    assert any(np.any(v != 0) for k, v in flat(state.params).items() if k.endswith("lora_b"))
    for key, value in flat(base).items():
        np.testing.assert_array_equal(value, base_before[key], err_msg=key)


def test_targets_select_layers_by_path_and_the_rest_stay_plain():
    graphdef, params = tiny_model()
    _, _, adapters = lora.attach(graphdef, params, lora.LoraSettings(4, 8.0, targets=r"self_attn/[qv]_proj$"), 0)
    adapted = sorted({k.rsplit("/lora/", 1)[0] for k in flat(adapters)})
    assert adapted == ["layers/0/self_attn/q_proj", "layers/0/self_attn/v_proj", "layers/1/self_attn/q_proj",
                       "layers/1/self_attn/v_proj"]


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_is_stored_small_and_dequantised_to_the_nearest_level(kind):
    kernel = jax.random.normal(jax.random.key(0), (128, 8)) * 0.02
    codes, scale = lora.quantize(kernel, kind)
    restored = np.asarray(lora.dequantize(codes, scale, kind))
    w = np.asarray(kernel)
    if kind == "int8":
        assert codes.dtype == jnp.int8 and scale.shape == (8,)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127, rtol=1e-6)
        assert np.all(np.abs(restored - w) <= scale / 2 + 1e-9)
    else:  # one absmax per block of 64 inputs; each weight the NF4 level nearest to it (hand-computed here)
        assert codes.dtype == jnp.uint4 and scale.shape == (2, 8)
        absmax = np.abs(w.reshape(2, 64, 8)).max(axis=1)
        normalised = w.reshape(2, 64, 8) / absmax[:, None, :]
        nearest = lora.NF4_LEVELS[np.abs(normalised[..., None] - lora.NF4_LEVELS).argmin(-1)]
        np.testing.assert_allclose(restored, (nearest * absmax[:, None, :]).reshape(128, 8), rtol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_runs_close_to_full_precision_and_adapters_off_is_still_its_own_reference(kind):
    graphdef, params = tiny_model(scan_layers=True)
    adapted, base, adapters = lora.attach(graphdef, params, lora.LoraSettings(4, 8.0, base_quantization=kind), 0)
    assert {v.dtype for k, v in flat(base).items() if k.endswith("proj/kernel")} == {np.dtype(jnp.dtype(
        "int8" if kind == "int8" else "uint4"))}
    tokens = jnp.arange(12)[None] % VOCAB
    full = models.apply_model(graphdef, params, tokens)[0]
    quantised = models.apply_model(adapted, lora.combine(base, adapters), tokens)[0]
    assert 0 < float(jnp.abs(full - quantised).max()) < (0.1 if kind == "int8" else 1.0)


def test_adapter_factors_take_their_kernels_sharding_on_the_shared_dimension():
    for scan_layers, lead in ((False, ()), (True, (None,))):
        graphdef, params = tiny_model(scan_layers)
        _, base, adapters = lora.attach(graphdef, params,
                                        lora.LoraSettings(4, 8.0, base_quantization="int8"), 0)
        specs = {sharding.path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            sharding.partition_specs(adapters, "llama"), is_leaf=lambda x: isinstance(x, P))[0]}
        layer = "layers/" if scan_layers else "layers/0/"
        assert specs[layer + "self_attn/q_proj/lora/lora_a"] == P(*lead, "fsdp", None)  # COLUMN kernel [in, out]
        assert specs[layer + "self_attn/q_proj/lora/lora_b"] == P(*lead, None, "tensor")
        assert specs[layer + "mlp/down_proj/lora/lora_a"] == P(*lead, "tensor", None)  # ROW kernel
        assert specs[layer + "mlp/down_proj/lora/lora_b"] == P(*lead, None, "fsdp")
        base_specs = {sharding.path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            sharding.partition_specs(base, "llama"), is_leaf=lambda x: isinstance(x, P))[0]}
        assert base_specs[layer + "self_attn/q_proj/kernel_scale"] == P(*lead, "tensor")  # int8: one per output


@pytest.mark.parametrize("key, value, message", [
    ("model.lora.rank", 0, "config.model.lora.rank = 0 is invalid: expected an integer >= 1"),
    ("model.lora.rank", -2, "config.model.lora.rank = -2 is invalid"),
    ("model.lora.targets", "attention/query$", "matches no dense layer of this model; its dense layers' paths look "
                                               "like: layers/N/mlp/down_proj"),
    ("model.lora.targets", "([", "is not a regular expression"),
    ("model.lora.base_quantization", "int4", "config.model.lora.base_quantization = 'int4' is invalid"),
    ("mode", "sft_then_dpo", "config.model.lora.enabled = True is invalid: expected False with config.mode = "
                             "'sft_then_dpo'"),
    ("ref.sync_every", 2, "expected False with ref.sync_every = 2 (TR-DPO)"),
    ("model.reference_dtype", "bfloat16", "expected False with model.reference_dtype = 'bfloat16'"),
])
def test_bad_lora_settings_fail_validation_naming_the_key(key, value, message):
    config = lora_config()
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=None) as error:
        validate(config)
    assert message in str(error.value)


# End to end: one LoRA DPO run (5 steps, checkpoints at 2 and 4 and 5) shared by the tests below.

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    return workdir, run.train_and_evaluate(lora_config(), workdir)


def final_state(workdir, step=None):
    directory = checkpoint.stage_directory(workdir, "dpo")
    step = step or max(int(name) for name in os.listdir(directory) if name.isdigit())
    return step, ocp.tree.to_flat_dict(ocp.PyTreeCheckpointer().restore(os.path.join(directory, str(step), "state")))


def test_a_lora_run_starts_at_log_2_and_checkpoints_adapters_with_their_base(lora_run):
    workdir, summary = lora_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["loss"] == pytest.approx(np.log(2), abs=1e-7) and first["rewards/margins"] == 0
    assert summary["dpo_initial"]["rewards/margins"] == 0 and summary["dpo"]["rewards/margins"] != 0
    _, state = final_state(workdir)
    params = [k for k in state if k[0] == "params"]
    assert params and all("lora" in k for k in params)
    assert all("lora" in k for k in state if k[0] == "opt_state" and np.ndim(state[k]))
    _, meta = checkpoint.read_meta(workdir, "dpo")
    assert meta["lora_base"]["path"] == FIXTURE and len(meta["lora_base"]["fingerprint"]) > 8


def test_a_lora_run_resumes_bitwise(lora_run, tmp_path, monkeypatch):
    config, resumed = lora_config(), str(tmp_path / "resumed")

    class Interrupted(Exception):
        pass

    with monkeypatch.context() as patch:  # killed after the step-2 checkpoint
        interrupt_stage_at(patch, config.seed + build.STAGE_DATA_STREAMS["dpo"], 3, Interrupted())
        with pytest.raises(Interrupted):
            run.train_and_evaluate(config, resumed)
    run.train_and_evaluate(config, resumed)
    (step_a, a), (step_b, b) = final_state(lora_run[0]), final_state(resumed)
    assert step_a == step_b == 5 and a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_a_lora_checkpoint_is_refused_on_another_base(lora_run, tmp_path):
    other = str(tmp_path / "other_base")  # the fixture with one weight changed: same shapes, another model
    shutil.copytree(FIXTURE, other)
    tensors = load_file(os.path.join(other, "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01
    save_file(tensors, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    for name, change in (("other", lambda c: c.model.update(path=other)),
                         ("int8", lambda c: c.model.lora.update(base_quantization="int8"))):
        workdir = str(tmp_path / name)
        shutil.copytree(lora_run[0], workdir)
        config = lora_config()
        change(config)
        with pytest.raises(UserError, match=f"LoRA adapters belong to the base {FIXTURE} "):
            run.train_and_evaluate(config, workdir)
    workdir = str(tmp_path / "full")
    shutil.copytree(lora_run[0], workdir)
    config = lora_config()
    config.model.lora.enabled = False
    with pytest.raises(UserError, match="lora/lora_a/value is only in the checkpoint"):  # the structure check
        run.train_and_evaluate(config, workdir)


def test_merged_export_computes_the_adapted_model_and_peft_export_holds_the_adapters(lora_run, tmp_path):
    workdir = lora_run[0]
    config = lora_config()
    tokenizer = data.get_tokenizer(config.data.tokenizer, config.model.path)
    mesh = build.make_mesh(config)
    graphdef, plain, model_config = build.build_model(config, tokenizer, mesh)
    adapted, base, abstract_adapters = lora.attach(graphdef, plain, lora.LoraSettings.from_config(config.model.lora),
                                                   config.seed)
    adapters = checkpoint.load_final_params(workdir, "dpo", checkpoint.abstract(abstract_adapters))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, tokenizer.vocab_size, (2, 10)), jnp.int32)
    hidden, logits_fn = models.apply_model(adapted, lora.combine(base, adapters), tokens)
    expected = logits_fn(hidden)

    export.export_checkpoint(workdir, str(tmp_path / "merged"))
    exported_graphdef, exported, _ = models.load_hf(str(tmp_path / "merged"))
    hidden, logits_fn = models.apply_model(exported_graphdef, exported, tokens)
    np.testing.assert_allclose(logits_fn(hidden), expected, atol=1e-5)
    assert np.abs(np.asarray(expected) - np.asarray(
        (lambda h, f: f(h))(*models.apply_model(graphdef, plain, tokens)))).max() > 1e-4  # the adapters matter

    export.export_checkpoint(workdir, str(tmp_path / "peft"), export_format="peft")
    with open(tmp_path / "peft" / "adapter_config.json") as f:
        adapter_config = json.load(f)
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0 and adapter_config["peft_type"] == "LORA"
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = flat(adapters)
    assert len(tensors) == len(ours)
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                                  ours["layers/1/self_attn/q_proj/lora/lora_a"].T)  # [r, in]
    np.testing.assert_array_equal(tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"],
                                  ours["layers/0/mlp/down_proj/lora/lora_b"].T)  # [out, r]


def test_a_lora_run_with_a_reference_cache_keys_it_by_the_base(lora_run, tmp_path):
    config = lora_config()
    config.ref.cache = str(tmp_path / "cache")
    summary = run.train_and_evaluate(config, str(tmp_path / "cached"))
    with open(os.path.join(config.ref.cache, "key.json")) as f:
        key = json.load(f)
    _, meta = checkpoint.read_meta(lora_run[0], "dpo")
    assert meta["lora_base"]["fingerprint"] in json.dumps(key)
    for name in ("loss", "rewards/margins", "rewards/accuracies"):
        assert summary["dpo"][name] == pytest.approx(lora_run[1]["dpo"][name], abs=1e-4), name


def test_lora_adapters_saved_on_one_device_resume_on_a_mesh(lora_run, tmp_path):
    workdir = str(tmp_path / "moved")
    shutil.copytree(lora_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "dpo", "checkpoints", "5"))  # resume from step 4 on fsdp 4 × tensor 2
    overrides = ["mode='dpo'", f"model.path={FIXTURE!r}", "data.tokenizer='model'", "data.max_length=48",
                 "data.max_prompt_length=24", "model.lora.enabled=True", "model.lora.rank=4", "model.lora.alpha=8.0",
                 "mesh.fsdp=4", "mesh.tensor=2"]
    environment = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
                   "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "tests"), REPO])}
    process = subprocess.run([sys.executable, os.path.join(REPO, "tests", "mesh_checks.py"), "train", workdir,
                              *overrides], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, (process.stdout + process.stderr)[-4000:]
    assert "mesh.fsdp: -1 -> 4; mesh.tensor: 1 -> 2" in process.stderr  # resumed with the config change logged
    graphdef, abstract = models.abstract_model(models.read_hf_config(FIXTURE))
    _, _, abstract_adapters = lora.attach(graphdef, abstract, SETTINGS, 0)
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), abstract_adapters)
    expected, got = (flat(checkpoint.load_final_params(w, "dpo", target)) for w in (lora_run[0], workdir))
    assert checkpoint.read_meta(workdir, "dpo")[0] == 5 and expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, rtol=0, err_msg=key)


def test_the_dry_run_counts_the_adapters_alone_as_trained_and_the_base_once():
    config = make_short_config()
    config.update(mode="dpo", dry_run=True)
    config.model.lora.update(enabled=True, rank=16, base_quantization="int8")
    text = dry_run.report(config)
    # per layer Σ (in + out)·r over q, k, v, o (64→64, 64→32, 64→32, 64→64) and gate, up, down (64→128 ×2, 128→64)
    assert "LoRA: 32,768 trainable parameters" in text  # 2 layers × 1024 × 16, counted by hand
    assert "base params (int8; also π_ref)" in text and "reference params" not in text
    assert "optimizer state (adapters)" in text and "gradients (adapters, float32)" in text


def test_peft_loads_our_adapter_export_to_the_same_model(tmp_path):
    """peft (in the fixture script, with torch) loaded our PEFT export onto the base; its logits are the golden ones."""
    model_config, settings, adapted, base, adapters = fixture_adapter()
    lora.save_peft(adapters, model_config, settings, str(tmp_path), "tests/fixtures/hf/llama")
    exported = load_file(str(tmp_path / "adapter_model.safetensors"))
    committed = load_file(os.path.join(PEFT_FIXTURE, "adapter_model.safetensors"))
    assert exported.keys() == committed.keys()
    for name in committed:
        np.testing.assert_array_equal(exported[name], committed[name], err_msg=name)
    with open(tmp_path / "adapter_config.json") as f, open(os.path.join(PEFT_FIXTURE, "adapter_config.json")) as g:
        assert json.load(f) == json.load(g)
    golden = np.load(os.path.join(PEFT_FIXTURE, "golden.npz"))
    assert int(golden["num_adapted"]) == 6  # q, v, down of 2 layers: peft adapted exactly these
    hidden, logits_fn = models.apply_model(adapted, lora.combine(base, adapters), jnp.asarray(PEFT_TOKENS))
    np.testing.assert_allclose(logits_fn(hidden), golden["logits"], atol=1e-4)


def test_a_lora_run_takes_its_base_from_an_sft_workdir(tmp_path):
    sft_config = make_short_config()
    sft_config.mode = "sft"
    sft = str(tmp_path / "sft")
    run.train_and_evaluate(sft_config, sft)
    config = make_short_config()
    config.update(mode="dpo")
    config.dpo.reference_workdir = sft
    config.model.lora.update(**LORA_OVERRIDES)
    summary = run.train_and_evaluate(config, str(tmp_path / "dpo"))
    assert summary["dpo_initial"]["rewards/margins"] == 0 and summary["dpo"]["rewards/margins"] != 0
    _, meta = checkpoint.read_meta(str(tmp_path / "dpo"), "dpo")
    assert meta["lora_base"]["path"] == sft
    # π_ref is the SFT model: its eval log-probs at DPO step 0 are the SFT stage's final ones
    sft_final = [json.loads(line) for line in open(os.path.join(sft, "metrics.jsonl"))]
    dpo_initial = summary["dpo_initial"]["logps/chosen"]
    assert dpo_initial == pytest.approx([r for r in sft_final if "eval/logps/chosen" in r][-1]["eval/logps/chosen"],
                                        abs=1e-4)
