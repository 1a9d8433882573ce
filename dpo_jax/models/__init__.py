"""Model families by name, the pure (graphdef, params) helpers the trainer and sampler use, and HF import/export.

Every family is a frozen config dataclass and an `nnx.Module` holding only `nnx.Param` state, with one interface:
`__call__(tokens_BxT, positions_BxT=None, segment_ids_BxT=None, branch_ids_BxT=None) -> hidden_BxTxD` and
`logits(hidden_BxTxD) -> logits_BxTxV` (float32). Positions and segment ids let several sequences share a row:
a token attends only to earlier tokens of its own segment; branch ids let sequences share a prefix (branch 0 is
seen by every branch of its segment, another branch only by itself: `layers.attention_mask`). For decoding,
`empty_cache(batch, slots)` and `__call__(tokens, positions, cache=cache) -> (hidden, cache)` keep each layer's keys
and values (`layers.KVCache`, slot = position). Families: gpt2, gptj, gpt_neox (Pythia), llama, qwen2, mistral,
qwen3, phi3, gemma2 and gemma3 (gemma.py) — one small file each on the shared skeleton `decoder.py` and the pieces
in `layers.py`; `config.scan_layers` stacks
the blocks into one `lax.scan` (`stacking.py` converts between the forms). `registry.py` knows the families by
name, `functional.py` holds the pure (graphdef, params) calls, `hf.py` reads and writes Hugging Face checkpoints
(and reads GGUF files through `gguf.py`).
"""

from flax import nnx  # some callers reach it as models.nnx

from dpo_jax.models.family import COMPUTE_DTYPES, SCAN_LAYERS_FROM, Family
from dpo_jax.models.functional import apply_model, apply_with_cache, empty_cache
from dpo_jax.models.hf import is_local_path, load_hf, read_hf_config, save_hf
from dpo_jax.models.layers import REMAT_MODES
from dpo_jax.models.registry import (
    MODEL_FAMILIES, abstract_model, config_from_dict, config_from_section, config_to_dict, create_model,
    family_names, family_of, make_config, model_from_config, param_path, split_params,
)
from dpo_jax.models.stacking import blocks_name, form_change, is_stacked_path, layer_paths, to_form

__all__ = [
    "COMPUTE_DTYPES", "Family", "MODEL_FAMILIES", "REMAT_MODES", "SCAN_LAYERS_FROM", "abstract_model", "apply_model",
    "apply_with_cache", "blocks_name", "config_from_dict", "config_from_section", "config_to_dict", "create_model",
    "empty_cache", "family_names", "family_of", "form_change", "is_local_path", "is_stacked_path", "layer_paths",
    "load_hf", "make_config", "model_from_config", "param_path", "read_hf_config", "save_hf", "split_params",
    "nnx", "to_form",
]
