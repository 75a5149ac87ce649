"""The tokenizer of a GGUF file, built from its metadata without torch.

A GGUF file has no tokenizer.json: llama.cpp's converter stores the vocabulary, the merges, a type
per token (normal, control, user-defined, ...), the special token ids, the pre-tokenizer's name and
the chat template as metadata. `gguf_tokenizer` reads those (through `GGUFFile`, which decodes the
long string arrays only when asked) and builds a `tokenizers` BPE tokenizer, wrapped in
`transformers.PreTrainedTokenizerFast` so the rest of jaxserve sees the usual interface.

`transformers` can do this too (`AutoTokenizer.from_pretrained(folder, gguf_file=...)`), but its
GGUF reader imports torch, and serving must not need torch. Two kinds of vocabulary are built here:
byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, Qwen 2/3, ...) and sentencepiece
BPE (`"llama"` in a llama file: Llama 2, Mistral, TinyLlama, ...), whose merges, when the file has
none, follow from the token scores. Other vocabularies (Gemma's sentencepiece, with its own quirks,
unigram, ...) go to transformers, which then needs torch (`gguf_tokenizer` says so).

Text is split before BPE as llama.cpp splits it for the file's `tokenizer.ggml.pre`
(`_PRE_SPLITS`); a name not in that table gets GPT-2's split, as in transformers. The tests compare
ids with transformers' own GGUF loader, which knows fewer names: for "smollm" it does not split
digits one by one, as llama.cpp and SmolLM's own tokenizer.json do (on the default model, whose
vocabulary has no multi-digit token, the ids agree).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from .gguf_weights import SUPPORTED_GGUF_ARCHITECTURES

if TYPE_CHECKING:
    from .gguf_weights import GGUFFile

logger = logging.getLogger(__name__)

# `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# How text is cut into words before BPE, by `tokenizer.ggml.pre`. Either "digits" (each digit on
# its own, then GPT-2's split) or a regex whose matches are the words (byte-level without its own
# regex after it).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), "digits"),
}


class GGUFVocab:
    """The tokenizer metadata of a GGUF file, under readable names."""

    def __init__(self, gguf: GGUFFile):
        self.path = gguf.path
        self.architecture = gguf.architecture
        self.model = gguf.field("tokenizer.ggml.model")
        self.pre = gguf.field("tokenizer.ggml.pre")
        self.tokens: list[str] = gguf.field("tokenizer.ggml.tokens") or []
        self.token_types: list[int] = gguf.field("tokenizer.ggml.token_type") or []
        self.merges: list[str] = gguf.field("tokenizer.ggml.merges") or []
        self.scores: list[float] = gguf.field("tokenizer.ggml.scores") or []
        self.chat_template: str | None = gguf.field("tokenizer.chat_template")
        # NOTE: llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say.
        add_bos = gguf.field("tokenizer.ggml.add_bos_token", self.model == "llama")
        self.add_bos_token: bool = bool(add_bos)
        self.add_eos_token: bool = bool(gguf.field("tokenizer.ggml.add_eos_token", False))
        self.special_ids = {
            name: gguf.field(f"tokenizer.ggml.{key}")
            for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        }  # fmt: skip

    def special_token(self, name: str) -> str | None:
        """The text of special token `name` ("bos_token", ...), or None when the file has none."""
        token_id = self.special_ids[name]
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def gguf_tokenizer(gguf: GGUFFile, **kwargs: Any):
    """A `transformers.PreTrainedTokenizerFast` for GGUF file `gguf`; `kwargs` go to its
    constructor (or to `AutoTokenizer` for vocabularies built by transformers)."""
    vocab = GGUFVocab(gguf)
    if vocab.model == "gpt2":
        tokenizer = byte_level_bpe(vocab)
    elif vocab.model == "llama" and vocab.architecture in _SENTENCEPIECE_ARCHITECTURES:
        tokenizer = sentencepiece_bpe(vocab)
    else:
        return _transformers_gguf_tokenizer(vocab, kwargs)
    from transformers import PreTrainedTokenizerFast

    kwargs.pop("trust_remote_code", None)  # nothing remote to trust: all of it is in the file
    specials = {name: vocab.special_token(name) for name in vocab.special_ids}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        chat_template=vocab.chat_template,
        add_bos_token=vocab.add_bos_token,
        add_eos_token=vocab.add_eos_token,
        clean_up_tokenization_spaces=False,
        **{name: token for name, token in specials.items() if token is not None},
        **kwargs,
    )


def byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a byte-level BPE vocabulary ("gpt2" in GGUF terms)."""
    alphabet = _byte_alphabet()
    spelled = frozenset(alphabet.values())
    # Tokens are stored spelled in the byte alphabet ("Ġthe"); one with other characters (an added
    # token such as "<think>" is plain text anyway) is respelled from its UTF-8 bytes so that BPE
    # can reach it.
    ids = {
        token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode()): i
        for i, token in enumerate(vocab.tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    tokenizer = Tokenizer(models.BPE(ids, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(vocab.pre)
    tokenizer.decoder = decoders.ByteLevel()
    # NOTE: a control token with characters outside the byte alphabet is a mislabelled piece of
    # text, not a control token (adding it would grow the vocabulary).
    _add_marked_tokens(tokenizer, vocab, lambda token: set(token) <= spelled and token in ids)
    return tokenizer


# Architectures whose "llama" (sentencepiece) vocabulary is plain: Gemma's is not (its whitespace
# tokens and merge order need transformers' handling).
_SENTENCEPIECE_ARCHITECTURES = tuple(a for a in SUPPORTED_GGUF_ARCHITECTURES if a != "gemma2")


def sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a sentencepiece BPE vocabulary ("llama" in GGUF terms): "▁"
    for a space (and one before the text), bytes of unknown characters as <0xNN> tokens."""
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    if vocab.merges:
        merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    else:
        merges = _merges_from_scores(vocab.tokens, vocab.scores)
    tokenizer = Tokenizer(models.BPE(ids, merges, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    _add_marked_tokens(tokenizer, vocab, lambda token: True)
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens of
    the vocabulary, the best-scored result first (sentencepiece merges the best-scored pair)."""
    if len(scores) != len(tokens):
        raise ValueError(f"a sentencepiece vocabulary of {len(tokens)} tokens has "
                         f"{len(scores)} scores and no merges: the file is incomplete.")
    ids = {token: i for i, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                found.append((-score, ids[token], ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(found)]


def _add_marked_tokens(tokenizer: Tokenizer, vocab: GGUFVocab, keep) -> None:
    """Control tokens (<|im_start|>, <s>) become special tokens: matched whole, dropped by
    decode(skip_special_tokens=True); user-defined ones (<think>) are matched whole but are not
    special. `keep(token)` says which of them are real."""
    types = vocab.token_types or [_NORMAL] * len(vocab.tokens)
    marked = [(t, kind) for t, kind in zip(vocab.tokens, types)
              if kind in (_CONTROL, _USER_DEFINED) and keep(t)]  # fmt: skip
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in marked if kind == _CONTROL])  # fmt: skip
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in marked if kind == _USER_DEFINED])  # fmt: skip


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _PRE_SPLITS.get(pre)
    if split is None:
        if pre not in (None, "default", "gpt2", "gpt-2"):
            logger.info("GGUF pre-tokenizer %r: splitting text as GPT-2 does", pre)
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])  # fmt: skip
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of each byte as a printable character: printable Latin-1 bytes stand for
    themselves, the other 68 (controls, space, ...) for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _transformers_gguf_tokenizer(vocab: GGUFVocab, kwargs: dict[str, Any]):
    """Vocabularies other than byte-level BPE: transformers' GGUF loader, which needs torch."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch") is None:
        raise ValueError(
            f"{vocab.path}: its tokenizer is a {vocab.model!r} vocabulary, which jaxserve reads "
            "with transformers' GGUF loader, and that needs torch: `pip install torch` (the CPU "
            "wheel is enough), or pass --tokenizer with an HF folder holding tokenizer.json."
        )
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(vocab.path))
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
