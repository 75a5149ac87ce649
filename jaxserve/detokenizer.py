"""Incremental detokenization and stop-string handling for one output sequence.

Three pieces, each usable alone:

- `IncrementalDetokenizer` turns token ids into text deltas one id at a time, never emitting a
  half-decoded multi-byte character (vLLM's prefix_offset/read_offset algorithm).
- `find_stop` / `stop_holdback` are pure string functions: where a stop string ends the output, and
  how much of the text's tail must not be streamed yet because it may still become a stop string.
- `OutputText` combines both per sequence for the engine: append ids, read the (truncated) text, and
  take safe-to-stream deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from jaxserve.sampling_params import SamplingParams

# NOTE: how many already-read tokens are decoded in front of the new ones. The context lets
# decoders that depend on neighbours (SentencePiece's leading-space rule) decode the new token as
# it reads in the middle of a text, not at its start. vLLM uses the same value.
PREFIX_WINDOW = 5
# Forget ids before the window once this many pile up, so memory stays bounded per sequence.
_TRIM_AT = 256
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting broken UTF-8.

    Each `add` decodes only a small window: the ids in `[prefix_offset, read_offset)` (already
    emitted, kept as context) and the ids after `read_offset` (not emitted yet). The delta is the
    window's text minus the context's text. While the window's text ends in U+FFFD (a character
    whose bytes have not all arrived) nothing is emitted and the offsets stay, so the next id is
    decoded together with the pending ones.

    The deltas concatenate to `tokenizer.decode(output_ids, skip_special_tokens=...)` for valid
    UTF-8 text with byte-level (GPT-2 style) tokenizers. With a prompt, the last prompt ids are the
    first context, so the output reads as a continuation of the prompt (a SentencePiece
    tokenizer then keeps the leading space of the first output token, as vLLM does). Text the
    tokenizer's `clean_up_tokenization_spaces` would change is not cleaned up (as in vLLM).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # NOTE: a `tokenizers` backend decodes a window in ~1 us; `tokenizer.decode` adds Python
        # overhead but is the only path for slow tokenizers (which also honour the spaces flag).
        if backend is not None and hasattr(backend, "decode"):
            self._decode_ids = self._backend_decoder(backend)
        else:
            self._decode_ids = self._slow_decoder(tokenizer)
        self._ids: list[int] = [int(i) for i in prompt_token_ids[-PREFIX_WINDOW:]]
        self._read_offset = len(self._ids)
        self._prefix_offset = 0
        self._pieces: list[str] = []

    def _backend_decoder(self, backend: Any):
        skip = self.skip_special_tokens

        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip)

        return decode

    def _slow_decoder(self, tokenizer: Any):
        skip, spaces = self.skip_special_tokens, self.spaces_between_special_tokens

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(
                ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces
            )

        return decode

    def add(self, token_id: int) -> str:
        """Append one output token id; return the newly readable text ("" while a character is
        incomplete or the token decodes to nothing, e.g. a skipped special token)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode_ids(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode_ids(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of every delta)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""


class StopMatch(NamedTuple):
    """A stop string found in the output: which one, and how much text to keep."""

    stop_str: str
    truncate_to: int  # length of the output text to keep; the rest is dropped


def find_stop(
    text: str, new_chars: int, stop: Sequence[str], include_stop_str_in_output: bool
) -> StopMatch | None:
    """Find a stop string that ends inside the last `new_chars` characters of `text`.

    Only matches that end in the new characters are considered (older text was searched
    before), but they may start earlier, so a stop string split across tokens is found. Among the
    matches the one that starts first wins; at equal starts the one listed first in `stop` wins.
    The kept text ends before the stop string, or after it with `include_stop_str_in_output`.
    """
    if new_chars <= 0 or not stop:
        return None
    best: tuple[int, int] | None = None  # (start, index into stop)
    for i, s in enumerate(stop):
        # A match ending at or after len(text) - new_chars + 1 starts at or after this.
        start = text.find(s, max(0, len(text) - new_chars - len(s) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, i)
    if best is None:
        return None
    start, i = best
    keep = start + len(stop[i]) if include_stop_str_in_output else start
    return StopMatch(stop[i], keep)


def stop_holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop string.

    That is the length of the longest suffix of `text` that is a proper prefix of some stop string
    (at most `max(len(s) for s in stop) - 1`). Streaming everything but this suffix never shows a
    client text that a later stop match removes; it holds back less than vLLM's fixed buffer of
    `max_stop_len - 1` characters when the tail cannot start a stop string.
    """
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class OutputText:
    """The detokenized output of one sequence with its stop strings applied (used by the engine).

    Call `append` for every sampled id. Once it returns a stop string the text is final and is cut
    before that stop string (or after it with `include_stop_str_in_output`); the engine finishes
    the sequence with that string as `stop_reason`. Stop strings are only looked for in text that
    tokens past the first `min_tokens` produced. With `detokenize=False` no text is produced.
    """

    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], sampling_params: SamplingParams
    ) -> None:
        params = sampling_params
        self.stop: list[str] = list(params.stop or [])
        if self.stop and not params.detokenize:
            raise ValueError(
                f"stop strings need detokenize=True, got {params.stop=} with detokenize=False"
            )
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self._detok = (
            IncrementalDetokenizer(
                tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens,
            )
            if params.detokenize
            else None
        )
        self._text = ""
        self._num_tokens = 0
        self._emitted = 0
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """The output text so far; after a stop match, the final truncated text."""
        return self._text

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched (no more ids may be appended)."""
        return self.stop_reason is not None

    def append(self, token_id: int, *, stop_terminated: bool = False) -> str | None:
        """Add one sampled id; return the stop string that matched now, else None.

        `stop_terminated=True` marks an EOS or `stop_token_ids` id that finishes the sequence: like
        vLLM, its text is not added to the output (even with `skip_special_tokens=False`) and no
        stop string is looked for.
        """
        assert self.stop_reason is None, "append after a stop string matched"
        self._num_tokens += 1
        if self._detok is None or stop_terminated:
            return None
        delta = self._detok.add(token_id)
        if not delta:
            return None
        self._text += delta
        if self._num_tokens <= self.min_tokens:
            return None
        match = find_stop(self._text, len(delta), self.stop, self.include_stop_str_in_output)
        if match is None:
            return None
        self._text = self._text[: match.truncate_to]
        self.stop_reason = match.stop_str
        return match.stop_str

    def take_delta(self, finished: bool = False) -> str:
        """The text not taken yet that is safe to stream now.

        Until the sequence is `finished` (or a stop string matched), a tail that may still grow
        into a stop string is held back (only when stop strings exist and are not included in the
        output). When finished, everything left is returned.
        """
        end = len(self._text)
        if not (finished or self.stopped or self.include_stop_str_in_output):
            end -= stop_holdback(self._text, self.stop)
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta
