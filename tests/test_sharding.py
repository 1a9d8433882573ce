"""Sharding: the partition rules cover every family and fail loudly, indivisible dimensions stay unsharded, and on 8
simulated CPU devices (subprocesses: the device count is fixed when JAX starts) sharded steps equal one device,
checkpoints move between meshes, and 2 processes × 4 devices through jax.distributed equal 1 process × 8."""

from __future__ import annotations

import json
import os
import shutil
import socket
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from conftest import make_short_config
from dpo_jax import build, checkpoint, data, dry_run, models, run, sharding
from dpo_jax.config import ConfigError
from dpo_jax.step import TrainState

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def launch(args, env=None, timeout=600):
    """Start `python tests/mesh_checks.py ARGS` (not waiting)."""
    environment = {**os.environ, **(env or {}), "PYTHONPATH": os.path.join(REPO, "tests")}
    return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "mesh_checks.py"), *args], cwd=REPO,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def mesh_checks(*args, env=None):
    return finish(launch(args, env))


@pytest.mark.parametrize("family", sorted(models.MODEL_FAMILIES))
def test_partition_rules_cover_every_parameter_and_optimizer_slot_of_every_family(family):
    model_config = models.read_hf_config(os.path.join(REPO, "tests", "fixtures", "hf", family))
    _, abstract = models.abstract_model(model_config)
    for tx in (optax.rmsprop(1e-3), optax.adamw(1e-3)):
        state = jax.eval_shape(lambda p: TrainState.create(p, optax.chain(optax.clip_by_global_norm(1.0), tx)), abstract)
        specs = sharding.partition_specs(state, family)
        flat_specs = {sharding.path_string(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, P))[0]}
        params_specs = {k: v for k, v in flat_specs.items() if k.startswith("params/")}
        assert len(params_specs) == len(jax.tree.leaves(abstract))
        # every optimizer slot shaped like a parameter is sharded like it
        for path, spec in flat_specs.items():
            for prefix in ("opt_state/1/0/nu/", "opt_state/1/0/mu/"):
                if path.startswith(prefix):
                    assert spec == flat_specs["params/" + path[len(prefix):]], path
        assert flat_specs["step"] == P()


def test_a_parameter_without_a_rule_and_a_rule_without_a_parameter_are_errors(monkeypatch):
    _, abstract = models.abstract_model(models.read_hf_config(os.path.join(REPO, "tests", "fixtures", "hf", "llama")))
    rules = sharding.PARTITION_RULES["llama"]
    monkeypatch.setitem(sharding.PARTITION_RULES, "llama", tuple(r for r in rules if "down_proj/kernel" not in r.pattern))
    with pytest.raises(ValueError, match=r"no partition rule of family 'llama' matches layers/0/mlp/down_proj/kernel"):
        sharding.partition_specs(abstract, "llama")
    monkeypatch.setitem(sharding.PARTITION_RULES, "llama", rules + (sharding.Rule("mlp/gate_proj/kernal", P()),))
    with pytest.raises(ValueError, match=r"the partition rule\(s\) \['mlp/gate_proj/kernal'\] of family 'llama' match"):
        sharding.partition_specs(abstract, "llama")


def test_a_dimension_its_axis_does_not_divide_stays_unsharded_on_that_axis():
    mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES)
    # GPT-2's vocabulary of 50257 on tensor = 4: the vocabulary stays whole, the hidden dimension still splits.
    assert sharding.fit_spec(sharding.EMBEDDING, (50257, 768), mesh) == P(None, "fsdp")
    assert sharding.fit_spec(sharding.EMBEDDING, (50260, 768), mesh) == P("tensor", "fsdp")
    assert sharding.fit_spec(sharding.COLUMN, (768, 25 * 64 + 2), mesh) == P("fsdp")
    assert sharding.fit_spec(P(("data", "fsdp")), (6, 3), mesh) == P(("data", "fsdp"))
    assert sharding.fit_spec(P(("data", "fsdp")), (5, 3), mesh) == P()


def test_mesh_shape_fills_in_the_rest_and_names_what_does_not_fit():
    assert sharding.mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    assert sharding.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"needs 4 devices; there are 8"):
        sharding.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match=r"8 devices are not divisible by the fixed axes' 3"):
        sharding.mesh_shape(dict(data=3, fsdp=-1, tensor=1), 8)


def test_sharded_steps_equal_one_device_and_arrays_are_sharded_as_the_rules_say(tmp_path):
    mesh_checks("steps", str(tmp_path), env=EIGHT_DEVICES)
    with open(tmp_path / "shardings.json") as f:
        found = json.load(f)
    one = np.load(tmp_path / "one_device.npz")
    for name in ("data8", "fsdp8", "data2_fsdp2_tensor2", "packed_data8"):  # packed: the same pairs, packed rows
        other = np.load(tmp_path / f"{name}.npz")
        np.testing.assert_allclose(other["losses"], one["losses"], atol=1e-5, rtol=0)
        for key in one.files:
            np.testing.assert_allclose(other[key], one[key], atol=1e-5, rtol=0, err_msg=f"{name}: {key}")
    assert one["losses"][-1] < one["losses"][0]  # the steps did train
    # [in, out] kernels: column-parallel splits (in, out) over (fsdp, tensor), row-parallel the reverse; the
    # optimizer slot follows its parameter; data parallelism alone keeps every parameter whole.
    q, down = "params/layers/0/self_attn/q_proj/kernel", "params/layers/0/mlp/down_proj/kernel"
    nu = "opt_state/1/0/nu/layers/0/self_attn/q_proj/kernel"
    assert found["data2_fsdp2_tensor2"][q]["spec"] == ["fsdp", "tensor"]
    assert found["data2_fsdp2_tensor2"][q]["shard_shape"] == [s // 2 for s in found["data2_fsdp2_tensor2"][q]["shape"]]
    assert found["data2_fsdp2_tensor2"][down]["spec"] == ["tensor", "fsdp"]
    assert found["fsdp8"][q]["shard_shape"] == [found["fsdp8"][q]["shape"][0] // 8, found["fsdp8"][q]["shape"][1]]
    assert found["fsdp8"][nu] == found["fsdp8"][q]
    assert found["data8"][q]["shard_shape"] == found["data8"][q]["shape"]
    assert found["uneven_batch_error"] == (
        "config.train.eval_batch_size = 12 is invalid: each (micro-)batch of 12 rows must split evenly over "
        "mesh.data × mesh.fsdp = 8 devices and 1 processes")


def final_params(workdir, stage="sft"):
    """The params of `stage`'s latest checkpoint in `workdir`, on this process's one device."""
    config = make_short_config()
    mesh = build.make_mesh(config)
    _, params, _ = build.build_model(config, data.get_tokenizer(config.data.tokenizer), mesh)
    restored = checkpoint.load_final_params(workdir, stage, checkpoint.abstract(params))
    return {sharding.path_string(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


SFT = ["mode='sft'", "sft.num_steps=30", "train.checkpoint_every=15", "train.eval_every=15"]
STEPS, HALF = 30, 15  # the runs' SFT steps, and the step of their first checkpoint


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
    """30 SFT steps on one process with mesh fsdp = 8, checkpoints at 15 and 30: the run the others must equal."""
    workdir = str(tmp_path_factory.mktemp("fsdp8") / "run")
    mesh_checks("train", workdir, *SFT, "mesh.fsdp=8", env=EIGHT_DEVICES)
    return workdir


@pytest.fixture(scope="module")
def fsdp8_halfway(fsdp8_run, tmp_path_factory):
    """fsdp8_run as it stood after its step-15 checkpoint (a copy without the step-30 one), read-only: where the
    cross-mesh resumes start from, and what a 15-step run on other meshes must end at (the schedule is constant,
    so step 15 of a 30-step run is the end of a 15-step one)."""
    workdir = str(tmp_path_factory.mktemp("fsdp8_halfway") / "run")
    shutil.copytree(fsdp8_run, workdir)
    shutil.rmtree(os.path.join(workdir, "sft", "checkpoints", str(STEPS)))
    assert os.listdir(os.path.join(workdir, "sft", "checkpoints")) == [str(HALF)]
    return workdir


def test_a_checkpoint_saved_on_one_mesh_resumes_on_another_or_one_device(fsdp8_run, fsdp8_halfway, tmp_path):
    moved, alone = str(tmp_path / "moved"), str(tmp_path / "alone")
    for workdir in (moved, alone):
        shutil.copytree(fsdp8_halfway, workdir)  # saved on mesh fsdp = 8, resumed from step 15
    resumed = [launch(["train", moved, *SFT, "mesh.fsdp=4", "mesh.tensor=2"], EIGHT_DEVICES),
               launch(["train", alone, *SFT, "mesh.fsdp=-1"])]  # 1 device
    for process, change in zip(resumed, ("mesh.fsdp: 8 -> 4; mesh.tensor: 1 -> 2", "mesh.fsdp: 8 -> -1")):
        output = finish(process)
        assert f"sft: resuming a run whose config differed: {change}\n" in output, output[-3000:]
    expected = final_params(fsdp8_run)
    for workdir in (moved, alone):
        got = final_params(workdir)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-6, rtol=0, err_msg=f"{workdir}: {key}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_two_processes(workdir):
    """Processes 0 and 1 of a jax.distributed run on localhost, 4 CPU devices each, one workdir: 15 SFT steps."""
    port = free_port()
    return [
        launch(["train", workdir, *SFT, f"sft.num_steps={HALF}", "mesh.fsdp=-1"], {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(index)})
        for index in range(2)
    ]


def logged_steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def assert_equals_one_process(workdir, fsdp8_halfway):
    expected, got = final_params(fsdp8_halfway), final_params(workdir)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5, rtol=0, err_msg=key)
    # one metrics file (process 0's), each step once: what the preempted launch logged past its save is rewritten
    assert logged_steps(workdir) == list(range(1, HALF + 1))
    # the samples drawn across processes are the one process's (greedy, so equal params give equal completions)
    assert completions(workdir) == completions(fsdp8_halfway) and len(completions(workdir)) == 4


def completions(workdir):
    with open(os.path.join(workdir, "samples", "sft", f"step_{HALF}.jsonl")) as f:
        return [json.loads(line)["completion"] for line in f]


def test_two_processes_equal_one_and_survive_a_sigterm_to_one_of_them(fsdp8_halfway, tmp_path):
    """2 processes × 4 devices (jax.distributed on localhost), one sent SIGTERM: both save the same step and exit
    143; relaunched, they end where one process with 8 devices does (fsdp8_run at step 15), with one metrics file."""
    workdir = str(tmp_path / "two")
    processes = launch_two_processes(workdir)
    while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(logged_steps(workdir)) >= 3):
        assert all(p.poll() is None for p in processes), processes[0].communicate()[0][-3000:]
        time.sleep(0.02)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [143, 143], outputs[0][-2000:] + outputs[1][-2000:]
    stops = [re.search(r"stopped: SIGTERM at sft step (\d+) \(resumes from sft step (\d+)\)", o) for o in outputs]
    assert all(stops), outputs
    step = int(stops[0].group(1))
    assert 3 <= step < HALF and all(m.groups() == (str(step), str(step)) for m in stops)  # both saved that step
    assert str(step) in os.listdir(os.path.join(workdir, "sft", "checkpoints"))
    for process in launch_two_processes(workdir):
        finish(process)
    assert_equals_one_process(workdir, fsdp8_halfway)
    assert max(int(name) for name in os.listdir(os.path.join(workdir, "sft", "checkpoints"))) == HALF


GPTJ_6B = {  # EleutherAI/gpt-j-6b's config.json: the dry run needs the architecture, not the weights
    "architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": 50400, "n_positions": 2048,
    "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64, "n_inner": None, "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05, "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
}


def test_dry_run_sizes_gptj_6b_per_device_without_weights_or_allocation(tmp_path):
    from configs import tldr

    checkpoint_dir = tmp_path / "gpt-j-6b"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "config.json").write_text(json.dumps(GPTJ_6B))
    config = tldr.get_config()
    config.model.path = str(checkpoint_dir)
    config.mesh.update(fsdp=8, device_memory_gb=16.0)  # a mesh larger than this machine
    config.dry_run = True
    text = dry_run.report(config)  # nothing loaded: the checkpoint directory holds only config.json
    num_params = 6_050_882_784
    assert f"GPTJConfig with {num_params:,} parameters, 64 pairs × 512 tokens" in text
    assert "{'data': 1, 'fsdp': 8, 'tensor': 1} = 8 devices" in text
    # every GPT-J dimension divides by 8: float32 params, RMSprop's one slot, gradients 1/8 each; π_ref in bfloat16
    per_device = {name.strip(): float(value.split()[0]) for name, value in
                  (line.rsplit("  ", 1) for line in text.splitlines() if line.startswith("  "))}
    assert per_device["params (float32)"] == per_device["optimizer state"] == round(4 * num_params / 8 / 2**30, 2)
    assert per_device["reference params (bfloat16)"] == round(2 * num_params / 8 / 2**30, 2)
    assert text.splitlines()[-1].startswith("fits 16 GiB per device: yes")
    config.model.update(remat="none", reference_dtype="float32")
    assert dry_run.report(config).splitlines()[-1].startswith("fits 16 GiB per device: NO")
    # A mesh this machine has: the compiled step's own memory analysis too, still from shapes alone.
    small = make_short_config()
    assert "compiled step temporaries (XLA, this machine)" in dry_run.report(small)
    small.dry_run = True  # the loop refuses it: a dry run is dispatched by python -m dpo_jax.main, and trains nothing
    with pytest.raises(ConfigError, match="config.dry_run"):
        run.train_and_evaluate(small, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_mesh_and_batch_settings_that_cannot_work_are_config_errors():
    from dpo_jax.config import ConfigError, validate

    config = make_short_config()
    config.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"config.mesh = .* is invalid: expected at most one axis of -1"):
        validate(config)
    config.mesh.update(data=0, fsdp=-1)
    with pytest.raises(ConfigError, match=r"config.mesh.data = 0 is invalid: expected a positive number of devices"):
        validate(config)
    config.mesh.update(data=2, fsdp=1)  # this process has one device
    with pytest.raises(ConfigError, match=r"needs 2 devices; there are 1"):
        build.make_mesh(config)
