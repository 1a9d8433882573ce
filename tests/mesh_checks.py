"""Multi-device runs for tests/test_sharding.py, in their own process (the device count is fixed when JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_checks.py steps OUT_DIR
    python tests/mesh_checks.py train WORKDIR [config.key=value ...]

`steps`: three DPO steps of the short config on 1 device and on meshes data=8, fsdp=8 and data=2 × fsdp=2 ×
tensor=2; writes each mesh's losses and final params (OUT_DIR/<mesh>.npz) and the shardings found (shardings.json).
`train`: `run.train_and_evaluate` of the short config with the overrides (values are Python literals), stopping as
the CLI does ("stopped: ...", its exit status); under
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID it is one process of a multi-host run.
"""

from __future__ import annotations

import ast
import json
import os
import sys

import jax
import numpy as np

from conftest import make_short_config
from dpo_jax import build, data, errors, run, sharding
from dpo_jax.config import ConfigError

MESHES = {"one_device": None, "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}
# Leaves whose shardings the test checks: a column- and a row-parallel kernel, the embedding, an optimizer slot.
WATCHED = ("params/layers/0/self_attn/q_proj/kernel", "params/layers/0/mlp/down_proj/kernel",
           "params/embed_tokens/embedding", "opt_state/1/0/nu/layers/0/self_attn/q_proj/kernel")


def flat(tree) -> dict[str, jax.Array]:
    return {sharding.path_string(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def steps(out_dir: str) -> None:
    config = make_short_config()
    config.mode = "dpo"
    tokenizer = data.get_tokenizer(config.data.tokenizer)
    run_data = build.build_data(config, tokenizer)
    batches = data.TrainBatches(run_data.train, batch_size=config.train.batch_size, seed=0,
                                buckets=run_data.buckets, pad_id=run_data.pad_id)
    found = {}
    for name, shape in MESHES.items():
        devices = jax.devices()[:1] if shape is None else jax.devices()
        axes = dict(zip(sharding.MESH_AXES, shape or (1, 1, 1)))
        mesh = sharding.make_mesh(axes, devices)
        graphdef, params, model_config = build.build_model(config, tokenizer, mesh)
        ref_params = build.reference_params(params, "float32")
        state, train_step, _ = build.compile_stage(config, "dpo", graphdef, "llama", mesh, params, ref_params)
        losses = []
        for step in range(3):
            state, metrics = train_step(state, ref_params, sharding.global_batch(batches.batch_at(step), mesh))
            losses.append(float(metrics["loss"]))
        leaves = flat(state)
        found[name] = {
            path: {"spec": [list(a) if isinstance(a, tuple) else a for a in leaves[path].sharding.spec],
                   "shard_shape": list(leaves[path].addressable_shards[0].data.shape),
                   "shape": list(leaves[path].shape)}
            for path in WATCHED
        }
        np.savez(os.path.join(out_dir, f"{name}.npz"), losses=np.asarray(losses),
                 **{path: np.asarray(leaf) for path, leaf in flat(state.params).items()})
    # Packed rows (several pairs each, padded to a multiple of the 8 data-parallel devices) on the data8 mesh.
    packed = make_short_config()
    packed.mode, packed.train.pack = "dpo", "packed"
    packed.mesh.update(data=8, fsdp=1, tensor=1)
    layout = build.layout_of(packed)
    packed_batches = data.TrainBatches(run_data.train, batch_size=packed.train.batch_size, seed=0,
                                       buckets=build.buckets_of(packed), pad_id=run_data.pad_id, layout=layout)
    mesh = build.make_mesh(packed)
    graphdef, params, _ = build.build_model(packed, tokenizer, mesh)
    ref_params = build.reference_params(params, "float32")
    state, train_step, _ = build.compile_stage(packed, "dpo", graphdef, "llama", mesh, params, ref_params)
    losses = []
    for step in range(3):
        batch = packed_batches.batch_at(step)
        assert batch.rows.tokens_BxT.shape[0] % 8 == 0 and batch.rows.tokens_BxT.shape[0] < packed.train.batch_size
        state, metrics = train_step(state, ref_params, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    np.savez(os.path.join(out_dir, "packed_data8.npz"), losses=np.asarray(losses),
             **{path: np.asarray(leaf) for path, leaf in flat(state.params).items()})
    uneven = make_short_config()
    uneven.train.eval_batch_size = 12  # 8 devices split no batch of 12 rows
    try:
        build.make_mesh(uneven)
    except ConfigError as error:
        found["uneven_batch_error"] = str(error)
    with open(os.path.join(out_dir, "shardings.json"), "w") as f:
        json.dump(found, f, indent=1)


def train(workdir: str, overrides: list[str]) -> None:
    config = make_short_config()
    for item in overrides:
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = ast.literal_eval(value)
    try:
        run.train_and_evaluate(config, workdir)
    except errors.RunStopped as stop:  # as python -m dpo_jax.main reports it
        print(f"stopped: {stop}", flush=True)
        sys.exit(stop.exit_status)


if __name__ == "__main__":
    command, target, *rest = sys.argv[1:]
    {"steps": lambda: steps(target), "train": lambda: train(target, rest)}[command]()
