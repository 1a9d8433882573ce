"""The tokenizer stored in a GGUF file (llama.cpp's format), as a transformers fast tokenizer, without torch.

A GGUF holds no tokenizer.json: its `tokenizer.*` metadata (tokens, merges, token types, special token ids,
`add_bos_token`, the chat template) describe one. transformers rebuilds it with
`integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer`, but its own file reader imports torch, so here
gguf-py reads the fields and the same converter builds the tokenizer: the ids are transformers' own (checked against
its loader in tests/fixtures/gguf/make_smollm2_reference.py). That converter is internal API of transformers 5.25;
`tests/test_gguf.py` pins what is used of it. The weights and config of the same file are read by models/gguf.py
(data/ does not import models/, so the rule of which file a path names is written in both, and tested to agree).
"""

from __future__ import annotations

import os
from typing import Any

GGUF_SUFFIX = ".gguf"
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}


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


def read_gguf_tokenizer(path: str) -> Any:
    """The transformers fast tokenizer that the GGUF file at `path` describes (vocabulary, merges, special tokens,
    `add_bos_token`, chat template). ValueError naming the file if it is no GGUF or holds no usable tokenizer."""
    # Imported here, as data/tokenizer.py imports transformers: `import dpo_jax.data` stays light.
    import gguf
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf-py raises ValueError, IndexError, ... on a truncated or foreign file
        raise ValueError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.tokens)")
    architecture = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else ""
    fields, settings = (
        {ours: metadata[f"tokenizer.{key}"] for key, ours in names.items() if f"tokenizer.{key}" in metadata}
        for names in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    )
    if fields.get("tokenizer_type") == "llama":
        settings.setdefault("add_bos_token", True)  # llama.cpp's default for a sentencepiece vocabulary
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        settings[name] = fields["tokens"][token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(architecture, fields)
    except ValueError as error:  # a tokenizer type transformers cannot build
        raise ValueError(f"{path}: {error}") from error
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)
    tokenizer.name_or_path = path
    return tokenizer
