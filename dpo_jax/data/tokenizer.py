"""Tokenizers: the built-in word tokenizer of the synthetic task, and Hugging Face tokenizers, behind one interface.

Callers rely only on `pad_token_id`, `eos_token_id`, `vocab_size` (every id the tokenizer can produce),
`encode(text, add_special_tokens=False)`, `decode(ids)` (special tokens dropped), `special_prefix` (the ids a
tokenizer puts before a text on its own, e.g. Llama's BOS), `special_ids`, `render_chat(messages, ...)` (the chat
template) and `save_pretrained(dir)`.
Names `get_tokenizer` accepts: "synthetic_words"; "hf:<directory or repo id>" (transformers.AutoTokenizer);
"model", the tokenizer saved beside the checkpoint at `config.model.path` (or stored in it, for a GGUF file).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

from dpo_jax.data import gguf_tokenizer, synthetic

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<unk>")


class NoChatTemplate(ValueError):
    """Chat-message data met a tokenizer without a chat template: a setup error, not one record's."""
HF_PREFIX = "hf:"
MODEL_TOKENIZER = "model"  # the tokenizer of config.model.path


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary; ids 0/1/2 are pad/eos/unk."""

    pad_token_id: int = 0
    eos_token_id: int = 1
    unk_token_id: int = 2
    bos_token_id = None

    def __init__(self, words: Iterable[str]) -> None:
        words = list(dict.fromkeys(words))
        for w in words:
            if not w or w != w.strip() or len(w.split()) != 1 or w in SPECIAL_TOKENS:
                raise ValueError(f"WordTokenizer: invalid vocabulary word {w!r} (must be one non-special word)")
        self.id_to_word: list[str] = list(SPECIAL_TOKENS) + words
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.id_to_word)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self.id_to_word)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of the whitespace-separated words of `text` (unknown words -> unk); adds no special tokens."""
        del add_special_tokens  # Accepted for Hugging Face compatibility; nothing is ever added.
        return [self.word_to_id.get(w, self.unk_token_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Words of `ids` joined by spaces, skipping pad and eos."""
        skip = (self.pad_token_id, self.eos_token_id)
        return " ".join(self.id_to_word[int(i)] for i in ids if int(i) not in skip)

    special_prefix: tuple[int, ...] = ()  # no BOS

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are no text: pad, eos, unk."""
        return frozenset((self.pad_token_id, self.eos_token_id, self.unk_token_id))

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The word tokenizer has no chat template: chat data needs a Hugging Face tokenizer."""
        raise NoChatTemplate("the synthetic_words tokenizer has no chat template; chat-message data needs a "
                             "tokenizer with one (data.tokenizer = 'model' or 'hf:<path>')")

    def to_hf(self):
        """The same tokenizer as a transformers fast tokenizer (a `tokenizers` WordLevel model): same ids, same text."""
        import transformers
        from tokenizers import Tokenizer, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel(vocab=self.word_to_id, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )

    def save_pretrained(self, directory: str) -> None:
        """Write Hugging Face tokenizer files, so an exported model loads with `AutoTokenizer` too."""
        self.to_hf().save_pretrained(directory)


class HFTokenizer:
    """A transformers tokenizer behind the interface above. EOS is required (every completion ends with it);
    without a pad token, padding uses EOS, as the DPO reference code does (the loss mask ignores padding)."""

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name or tokenizer.name_or_path!r} has no EOS token; DPO appends EOS to completions")
        self.tokenizer, self.name = tokenizer, name or tokenizer.name_or_path
        self.eos_token_id: int = tokenizer.eos_token_id
        self.bos_token_id: int | None = tokenizer.bos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`, not its `vocab_size`)."""
        return len(self.tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; no BOS/EOS unless `add_special_tokens` (the reference code adds none)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens (EOS, padding)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    @functools.cached_property
    def special_prefix(self) -> tuple[int, ...]:
        """The ids the tokenizer puts before a text encoded with its special tokens: (BOS,) for Llama, () for GPT-2."""
        plain = self.tokenizer.encode("a", add_special_tokens=False)
        full = self.tokenizer.encode("a", add_special_tokens=True)
        start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        return tuple(full[:start])

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (BOS, EOS, pad, chat markers): no text of their own."""
        return frozenset(self.tokenizer.all_special_ids)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """`messages` as text through the tokenizer's chat template (ValueError if it has none)."""
        if not self.tokenizer.chat_template:
            raise NoChatTemplate(f"tokenizer {self.name!r} has no chat template; chat-message data needs one")
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer's own files."""
        self.tokenizer.save_pretrained(directory)


_BUILTIN = {"synthetic_words": lambda: WordTokenizer(synthetic.WORDS)}


def tokenizer_names() -> list[str]:
    """Fixed names `get_tokenizer` accepts; "hf:<path>" names any Hugging Face tokenizer besides."""
    return sorted([*_BUILTIN, MODEL_TOKENIZER])


def check_tokenizer_name(name: str, model_path: str = "") -> None:
    """ValueError unless `get_tokenizer(name, model_path)` can be asked for it (before anything is loaded)."""
    if name in _BUILTIN or (name.startswith(HF_PREFIX) and name[len(HF_PREFIX):].strip()):
        return
    if name == MODEL_TOKENIZER:
        if not model_path:
            raise ValueError(f"tokenizer {name!r} is the checkpoint's own, so it needs config.model.path")
        return
    raise ValueError(
        f"unknown tokenizer {name!r}; valid: {', '.join(sorted(_BUILTIN))}, {MODEL_TOKENIZER!r} (the tokenizer of "
        f"config.model.path) or '{HF_PREFIX}<directory or Hugging Face repo id>'"
    )


def get_tokenizer(name: str, model_path: str = "") -> WordTokenizer | HFTokenizer:
    """The tokenizer called `name` ("synthetic_words", "model" with `model_path`, or "hf:<path>")."""
    check_tokenizer_name(name, model_path)
    if name in _BUILTIN:
        return _BUILTIN[name]()
    import transformers

    path = model_path if name == MODEL_TOKENIZER else name[len(HF_PREFIX):]
    if (gguf_path := gguf_tokenizer.gguf_file(path)) is not None:
        return HFTokenizer(gguf_tokenizer.read_gguf_tokenizer(gguf_path), name)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as error:  # missing files, offline without a cached copy, unknown repo
        raise FileNotFoundError(f"tokenizer {name!r}: transformers.AutoTokenizer could not load {path!r}: {error}") from error
    return HFTokenizer(tokenizer, name)
