"""GGUF files (llama.cpp's format) as a model source: the transformers config and the weights, by Hugging Face name.

`read_gguf_config` turns the file's metadata into the transformers config a config.json would give, and
`gguf_tensors` maps each GGUF tensor to its Hugging Face name with a reader that dequantises it (gguf-py, numpy)
into nn.Linear's [out, in] layout and undoes llama.cpp's rotary row permutation of Q and K; `hf.py` loads them as
it loads safetensors. The metadata is parsed once per file version (seconds: gguf-py reads the whole vocabulary);
tensors are read from a memory map that lives only while they are loaded. Only what we can reproduce exactly is accepted: the Llama architecture, the tensor types in
`SUPPORTED_TYPES`, rotary without scaling or with linear scaling, one-file models. Anything else is a ValueError
naming it. The tokenizer of the same file is read by data/gguf_tokenizer.py (data/ does not import models/).

Gemma 3 (`gemma3`, e.g. Gemma 3 270M) differs from Llama in three ways llama.cpp's converter introduces: every norm
weight is stored as w + 1 (its RMSNorm multiplies by the weight; Hugging Face's by 1 + w), so 1 is subtracted on
load; Q and K are not permuted (its rope is the half-split NeoX one); and the metadata has no layer types, local
rotary base or query_pre_attn_scalar, which take transformers' Gemma3TextConfig defaults (right for 270M).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import gguf
import numpy as np

GGUF_SUFFIX = ".gguf"
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
# Dequantised by gguf-py exactly as llama.cpp does; the i-quants, ternary and FP4 types are not accepted (untested).
SUPPORTED_TYPES = tuple(getattr(gguf.GGMLQuantizationType, name) for name in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
# GGUF tensor names (llama.cpp's) -> Hugging Face's; {i} is the layer.
_BODY_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's blocks: four norms (ffn_norm is the pre-feed-forward one there) and q/k norms.
_GEMMA3_BLOCK_NAMES = {
    **_BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_ROPE_SCALING_TYPES = ("none", "linear")


def gguf_file(path: str) -> str | None:
    """The GGUF file `path` names: itself if it ends in .gguf, or the one .gguf file of a directory that has no
    config.json; None for anything else (a Hugging Face checkpoint). ValueError for a directory of several."""
    if path.endswith(GGUF_SUFFIX):
        return path
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    found = sorted(f for f in os.listdir(path) if f.endswith(GGUF_SUFFIX))
    if len(found) > 1:
        raise ValueError(f"{path}: holds {len(found)} GGUF files ({', '.join(found)}); name one of them")
    return os.path.join(path, found[0]) if found else None


def open_gguf(path: str) -> gguf.GGUFReader:
    """gguf-py's reader of the file at `path` (memory-mapped: tensors are read when used). FileNotFoundError or a
    ValueError naming the file when it is missing, not a GGUF, truncated or split into several files."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf-py raises ValueError, IndexError, ... on a truncated or corrupt file
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({type(error).__name__}: {error})") from error
    size = os.path.getsize(path)
    short = next((t.name for t in reader.tensors if t.data_offset + t.n_bytes > size), None)
    if short is not None:
        raise ValueError(f"{path}: truncated GGUF file: tensor {short!r} ends past the file's {size} bytes")
    if _field(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1) > 1:
        raise ValueError(f"{path}: one part of a split GGUF model; merge the parts into one file (llama.cpp's "
                         "gguf-split --merge)")
    return reader


class TensorInfo(NamedTuple):
    """Where one tensor of a GGUF file lies, and how it is stored."""

    name: str  # llama.cpp's name, e.g. blk.0.attn_q.weight
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: [in, out]
    offset: int  # of its bytes from the start of the file
    num_bytes: int


def read_gguf_config(path: str) -> Any:
    """The transformers config (a LlamaConfig: what config.json would hold) of the GGUF file at `path`.
    ValueError naming the file and the setting for an architecture, rope scaling or shape we do not implement."""
    return _read_header(path, _version(path))[0]


def _version(path: str) -> tuple[int, int]:
    """(modification time, size) of `path`, so a cache entry of an older version of the file is not used."""
    stat = os.stat(path) if os.path.isfile(path) else None
    return (stat.st_mtime_ns, stat.st_size) if stat else (0, 0)


@functools.lru_cache(maxsize=4)
def _read_header(path: str, version: tuple[int, int]) -> tuple[Any, tuple[TensorInfo, ...]]:
    """(transformers config, tensors) of the GGUF file at `path`, cached per file version: config validation and
    the loader each ask for them."""
    reader = open_gguf(path)
    tensors = tuple(TensorInfo(t.name, t.tensor_type, tuple(int(d) for d in t.shape), int(t.data_offset),
                               int(t.n_bytes)) for t in reader.tensors)
    return _config_of(reader, path), tensors


def _config_of(reader: gguf.GGUFReader, path: str) -> Any:
    """The transformers config of the file `reader` reads (`path`, for messages)."""
    import transformers

    architecture = _field(reader, gguf.Keys.General.ARCHITECTURE, "")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def key(template: str) -> str:
        return template.format(arch=architecture)

    def required(template: str) -> Any:
        value = _field(reader, key(template))
        if value is None:
            raise ValueError(f"{path}: the GGUF metadata has no {key(template)!r}")
        return value

    tensors = {t.name: t for t in reader.tensors}
    hidden_size, num_heads = required(gguf.Keys.LLM.EMBEDDING_LENGTH), required(gguf.Keys.Attention.HEAD_COUNT)
    head_dim = _field(reader, key(gguf.Keys.Attention.KEY_LENGTH), hidden_size // num_heads)
    for template, allowed, meaning in ((gguf.Keys.LLM.EXPERT_COUNT, 0, "no experts"),
                                       (gguf.Keys.Attention.VALUE_LENGTH, head_dim, "the key length"),
                                       (gguf.Keys.Rope.DIMENSION_COUNT, head_dim, "rotary on the whole head")):
        value = _field(reader, key(template), allowed)
        if value != allowed:
            raise ValueError(f"{path}: {key(template)} = {value!r} is not supported (only {allowed}: {meaning})")
    rope_parameters = {"rope_type": "default", "rope_theta": _float32(_field(reader, key(gguf.Keys.Rope.FREQ_BASE), 1e4))}
    scaling = _field(reader, key(gguf.Keys.Rope.SCALING_TYPE), "none")
    if scaling not in _ROPE_SCALING_TYPES or "rope_freqs.weight" in tensors:
        found = "per-frequency factors (the rope_freqs tensor, Llama 3)" if scaling == "none" else repr(scaling)
        raise ValueError(f"{path}: rope scaling {found} is not supported; supported: {', '.join(_ROPE_SCALING_TYPES)}")
    if scaling == "linear":
        rope_parameters.update(rope_type="linear", factor=_float32(required(gguf.Keys.Rope.SCALING_FACTOR)))
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: the GGUF file has no token_embd.weight tensor")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml order: [hidden, vocab]
    token_ids = {ours: _field(reader, f"tokenizer.ggml.{theirs}") for ours, theirs in (
        ("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=required(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        num_hidden_layers=required(gguf.Keys.LLM.BLOCK_COUNT),
        num_attention_heads=num_heads,
        num_key_value_heads=_field(reader, key(gguf.Keys.Attention.HEAD_COUNT_KV), num_heads),
        head_dim=head_dim,
        max_position_embeddings=required(gguf.Keys.LLM.CONTEXT_LENGTH),
        rms_norm_eps=_float32(required(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
        tie_word_embeddings="output.weight" not in tensors,
        **token_ids,
    )
    if architecture == "gemma3":
        # The global base and window are in the metadata; layer types, the local base (10,000) and
        # query_pre_attn_scalar (256) are not: transformers' defaults, as its own GGUF loader leaves them.
        pattern = _field(reader, key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN), 6)
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:  # llama.cpp's per-layer list form
            raise ValueError(f"{path}: {key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)} = {pattern!r} is not "
                             "supported (only a positive int: every N-th layer global)")
        return transformers.Gemma3TextConfig(
            **common, hidden_activation="gelu_pytorch_tanh", sliding_window_pattern=pattern,
            sliding_window=_field(reader, key(gguf.Keys.Attention.SLIDING_WINDOW), 4096),
            rope_parameters={"full_attention": rope_parameters,
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        )
    return transformers.LlamaConfig(**common, rope_parameters=rope_parameters, hidden_act="silu")


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, read when called from `file_bytes` (the file's memory map): dequantised to
    float32 in nn.Linear's [out, in] layout (a norm: [n]), its rows un-permuted if it is a Q or K projection
    (`rotary_heads` heads), `shift` subtracted (Gemma 3's norms, stored as w + 1). Prints as its file, for messages."""

    path: str
    info: TensorInfo
    file_bytes: np.ndarray
    rotary_heads: int | None = None
    shift: float = 0.0

    def __call__(self) -> np.ndarray:
        stored = self.file_bytes[self.info.offset:self.info.offset + self.info.num_bytes]
        array = np.asarray(gguf.quants.dequantize(stored, self.info.tensor_type), dtype=np.float32)
        array = array.reshape(self.info.shape[::-1])  # ggml order is [in, out]
        if self.shift:
            array = array - np.float32(self.shift)
        return array if self.rotary_heads is None else unpermute_rotary(array, self.rotary_heads)

    def __str__(self) -> str:
        return self.path


def gguf_tensors(path: str, num_heads: int, num_kv_heads: int) -> dict[str, GGUFTensor]:
    """{Hugging Face tensor name: tensor} of the GGUF file at `path`, whose model has `num_heads` query and
    `num_kv_heads` key-value heads. Tensors without a Hugging Face name keep their GGUF name (so the loader reports
    them as unexpected). ValueError naming a tensor of a type we do not accept."""
    config, infos = _read_header(path, _version(path))
    gemma = config.model_type == "gemma3_text"
    file_bytes = np.memmap(path, mode="r")  # unmapped when the last tensor reading it is dropped
    rotary_heads = {} if gemma else {"attn_q": num_heads, "attn_k": num_kv_heads}  # Gemma 3's Q, K: not permuted
    tensors = {}
    for info in infos:
        if info.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(
                f"{path}: tensor {info.name!r} has type {info.tensor_type.name}, which is not supported; "
                f"supported: {', '.join(t.name for t in SUPPORTED_TYPES)}")
        module = info.name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # blk.3.attn_q.weight -> attn_q
        shift = 1.0 if gemma and module.endswith("norm") else 0.0  # every Gemma 3 norm is stored as w + 1
        name = hf_tensor_name(info.name, _GEMMA3_BLOCK_NAMES if gemma else _BLOCK_NAMES)
        tensors[name] = GGUFTensor(path, info, file_bytes, rotary_heads.get(module), shift)
    return tensors


def hf_tensor_name(name: str, block_names: dict[str, str] = _BLOCK_NAMES) -> str:
    """The Hugging Face name of GGUF tensor `name` ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'),
    or `name` itself when it has none; `block_names` maps the architecture's block tensors (Llama's by default)."""
    module, _, leaf = name.rpartition(".")
    if module in _BODY_NAMES:
        return f"{_BODY_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block_names:
        return f"model.layers.{parts[1]}.{block_names[parts[2]]}.{leaf}"
    return name


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a Q or K projection's rows ([out, in]; `num_heads` query or key-value heads):
    its converter interleaves each head's two rotary halves for its own rope kernel; ours rotates halves, as
    Hugging Face's does (transformers' `LlamaTensorProcessor._reverse_permute_weights`)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value of the file (a Python scalar, string or list), or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))
