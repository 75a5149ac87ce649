"""The grammar backend: compiles specs with llguidance and hands out per-sequence matchers.

    backend = GrammarBackend(tokenizer, vocab_size=model_vocab)   # once, at start-up (~0.5 s)
    future = backend.compile(spec)          # on the compile pool, cached by spec
    matcher = future.result().matcher()     # one per sequence, cheap (a copy of a prototype)
    matcher.fill_bitmask(bitmask, row)      # before each step: the allowed next tokens
    matcher.accept_token(sampled_id)        # after each step

llguidance was chosen over xgrammar by `scripts/bench_grammar.py`: JSON schemas compile in a few
milliseconds instead of up to hundreds, mask fills cost about the same, and it needs neither torch
nor triton.

Threading: `compile` never runs on the caller's thread; grammars are built on a small thread pool
(llguidance drops the GIL while it builds). A `CompiledGrammar` is immutable and may be shared.
A `Matcher` belongs to one sequence and is used from the engine thread only; `fill_bitmasks`
fills many rows in parallel inside llguidance.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from jaxserve.structured_output.bitmask import bitmask_words
from jaxserve.structured_output.spec import StructuredOutputSpec

logger = logging.getLogger(__name__)


class CompiledGrammar:
    """One compiled spec: a validated llguidance grammar and a prototype matcher to copy."""

    def __init__(self, spec: StructuredOutputSpec, prototype, eos_token_ids: frozenset[int]):
        self.spec = spec
        self._prototype = prototype  # NOTE: never advanced; only deep-copied.
        self._eos = eos_token_ids

    def matcher(self) -> Matcher:
        """A fresh matcher at the start of the grammar (about 10 us)."""
        return Matcher(self._prototype.deep_copy(), self._eos)


class Matcher:
    """The grammar state of one sequence. Not thread-safe: the engine thread owns it."""

    def __init__(self, ll_matcher, eos_token_ids: frozenset[int]):
        self._m = ll_matcher
        self._eos = eos_token_ids
        self._num_tokens = 0
        self._eos_at: int | None = None  # tokens consumed when EOS was accepted

    def accept_token(self, token_id: int) -> bool:
        """Advance by `token_id` if the grammar allows it; False (state unchanged) if not.

        An EOS id is allowed once the grammar is complete; accepting it terminates the matcher.
        """
        token_id = int(token_id)
        if self.is_terminated():
            return False
        if token_id in self._eos:
            # NOTE: llguidance's try/validate calls do not accept EOS; decide it here.
            if not self._m.is_accepting() or not self._m.consume_token(token_id):
                return False
            self._eos_at = self._num_tokens + 1
        elif self._m.try_consume_tokens([token_id]) != 1:
            return False
        self._num_tokens += 1
        return True

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32 [rows, ceil(V/32)]: bit j of
        word w allows token 32*w+j). A terminated matcher allows nothing."""
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous:
            raise ValueError(f"bitmask must be a C-contiguous int32 [rows, words] array, got "
                             f"{bitmask.dtype=} {bitmask.shape=}")
        if not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"{row=} is outside the bitmask's {bitmask.shape[0]} rows")
        target = bitmask[row]
        if self.is_terminated():
            target[:] = 0
            return
        self._m.unsafe_compute_mask_ptr(target.ctypes.data, target.nbytes)

    def is_terminated(self) -> bool:
        """True once EOS was accepted: the sequence is finished."""
        return self._eos_at is not None

    def is_accepting(self) -> bool:
        """True when the text so far is complete (EOS would be accepted now)."""
        return not self.is_terminated() and self._m.is_accepting()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (for speculative decoding)."""
        if not 0 <= num_tokens <= self._num_tokens:
            raise ValueError(f"cannot roll back {num_tokens=}: {self._num_tokens} accepted")
        if num_tokens and not self._m.rollback(num_tokens):
            raise RuntimeError(f"llguidance could not roll back {num_tokens} tokens: "
                               f"{self._m.get_error()}")
        self._num_tokens -= num_tokens
        if self._eos_at is not None and self._eos_at > self._num_tokens:
            self._eos_at = None

    @property
    def num_tokens(self) -> int:
        """Tokens accepted so far (EOS included)."""
        return self._num_tokens


class GrammarBackend:
    """Compiles specs for one tokenizer and one logits width.

    tokenizer:     a `transformers` fast tokenizer (its Rust `backend_tokenizer` is handed over).
    vocab_size:    the model's logits width V; ids at or above the tokenizer's length are never
                   allowed. Bitmasks are int32 [rows, ceil(V/32)].
    eos_token_ids: ids that end a sequence and are allowed once the grammar is complete;
                   defaults to the tokenizer's `eos_token_id`.
    any_whitespace: JSON may hold any whitespace between tokens (vLLM's default); False allows
                   none, which keeps small models from looping on newlines.
    """

    def __init__(
        self, tokenizer, vocab_size: int, *, eos_token_ids: Iterable[int] | None = None,
        max_workers: int = 2, cache_size: int = 256, any_whitespace: bool = True,
    ):  # fmt: skip
        import llguidance

        self._ll = llguidance
        if eos_token_ids is None:
            eos_token_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("no EOS token: pass eos_token_ids (the tokenizer has none)")
        if vocab_size < len(tokenizer):
            raise ValueError(f"{vocab_size=} is smaller than the tokenizer's {len(tokenizer)} "
                             "tokens; pass the model's logits width")
        if max(self.eos_token_ids) >= vocab_size:
            raise ValueError(f"{self.eos_token_ids=} must be below {vocab_size=}")
        self.vocab_size = vocab_size
        self.bitmask_words = bitmask_words(vocab_size)
        self.any_whitespace = any_whitespace
        self._tok = llguidance.LLTokenizer(
            tokenizer.backend_tokenizer.to_str(), n_vocab=vocab_size,
            eos_token=sorted(self.eos_token_ids),
        )  # fmt: skip
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="grammar-compile")
        self._executor = None  # llguidance's parallel mask filler, made on first use
        self._cache: OrderedDict[StructuredOutputSpec, concurrent.futures.Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiles = 0  # cache misses sent to the pool, for metrics and tests

    def compile(self, spec: StructuredOutputSpec) -> concurrent.futures.Future[CompiledGrammar]:
        """The compiled grammar of `spec`, built on the pool once and then served from an LRU
        cache. A grammar the library rejects resolves the future with `ValueError(message)`."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._build, spec)
            self.num_compiles += 1
            self._cache[spec] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def fill_bitmasks(self, rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
        """`matcher.fill_bitmask(bitmask, row)` for each pair, in parallel inside llguidance."""
        live = []
        for matcher, row in rows:
            if matcher.is_terminated():
                matcher.fill_bitmask(bitmask, row)
            else:
                live.append((matcher._m, int(row)))
        if not live:
            return
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous:
            raise ValueError(f"bitmask must be a C-contiguous int32 [rows, words] array, got "
                             f"{bitmask.dtype=} {bitmask.shape=}")
        if self._executor is None:
            self._executor = self._ll.LLExecutor()
        self._executor.unsafe_compute_mask_ptr(live, bitmask.ctypes.data, bitmask.shape[1] * 4,
                                               bitmask.shape[0])

    def shutdown(self) -> None:
        """Stop the compile pool (pending compiles are cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _build(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        ll = self._ll
        try:
            grammar = self._grammar_text(spec)
        except ValueError as e:
            raise ValueError(f"{spec.kind}: {e}") from None
        try:
            prototype = ll.LLMatcher(self._tok, grammar, log_level=0,
                                     limits=ll.LLParserLimits(verbose_errors=False))
        except Exception as e:  # noqa: BLE001 - a Rust panic surfaces as a bare Exception
            raise ValueError(f"{spec.kind}: {library_error(str(e))}") from None
        if prototype.is_error():
            raise ValueError(f"{spec.kind}: {library_error(prototype.get_error())}")
        self._check_startable(spec, prototype)
        logger.debug("compiled %s grammar (%d chars)", spec.kind, len(spec.value))
        return CompiledGrammar(spec, prototype, self.eos_token_ids)

    def _check_startable(self, spec: StructuredOutputSpec, prototype) -> None:
        """The first mask builds the lexer: a grammar that no text can start, or one past the
        library's limits, shows there (an error, or nothing allowed but EOS before the grammar
        is complete). Raises ValueError."""
        for _ in range(2):  # NOTE: a lexer out of fuel may only say so on a second copy
            probe = prototype.deep_copy()
            mask = np.zeros((1, self.bitmask_words), np.int32)
            probe.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            if probe.is_error():
                raise ValueError(f"{spec.kind}: no output can satisfy it "
                                 f"({library_error(probe.get_error())})")
            allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))
            if not probe.is_accepting() and set(allowed.tolist()) <= self.eos_token_ids:
                raise ValueError(f"{spec.kind}: no output can satisfy it (no text may start it)")

    def _grammar_text(self, spec: StructuredOutputSpec) -> str:
        ll = self._ll
        options = {"whitespace_flexible": self.any_whitespace}
        if spec.kind == "json":
            return ll.LLMatcher.grammar_from_json_schema(spec.value, overrides=options)
        if spec.kind == "json_object":
            return ll.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=options)
        if spec.kind == "regex":
            return ll.LLMatcher.grammar_from_regex(ascii_shorthands(spec.value))
        if spec.kind == "choice":
            alternatives = " | ".join(json.dumps(c) for c in spec.choices)
            return ll.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        if grammar_syntax(spec.value) == "gbnf":
            return ll.grammar_from("gbnf", spec.value)  # converted to Lark by llguidance
        return ll.LLMatcher.grammar_from_lark(spec.value)


def library_error(message: str) -> str:
    """llguidance's error message fit for a client: on one line, short, without its parser
    state, Rust panic or backtrace (a panic says the grammar is beyond what it can build)."""
    if "panic" in message or "<backtrace>" in message:
        return "the grammar library cannot build it (it is too large or too complex)"
    text = " ".join(re.split(r"<state>|<non-verbose/>", message)[0].split()) or "rejected"
    if text == "NoExtensionBias":
        return "the grammar allows no text at all"
    return text if len(text) <= 400 else text[:400] + "..."


_SHORTHANDS = {"d": "0-9", "w": "0-9A-Za-z_"}


def ascii_shorthands(regex: str) -> str:
    r"""`\d`, `\w` (and `\D`, `\W` outside brackets) as their ASCII classes.

    llguidance reads them as Unicode classes, so `\d` admits tokens of any script's digits (and
    a model's greedy choice may be one); vLLM's default backend, like JSON Schema's `pattern`,
    means ASCII. Escaped backslashes are left alone.
    """
    out, i, in_class = [], 0, False
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt in _SHORTHANDS:
                out.append(_SHORTHANDS[nxt] if in_class else f"[{_SHORTHANDS[nxt]}]")
            elif nxt.lower() in _SHORTHANDS and not in_class:
                out.append(f"[^{_SHORTHANDS[nxt.lower()]}]")
            else:
                out.append(c + nxt)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class and out[-1:] != ["["]:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


_GBNF_RULE = re.compile(r"(?m)^\s*[A-Za-z_][\w.-]*\s*::=")


def grammar_syntax(text: str) -> str:
    """"gbnf" when any line defines a rule with `::=` (llama.cpp's GBNF, the EBNF that vLLM's
    xgrammar backend takes), else "lark" (llguidance's Lark dialect, `start:` or `?start:`)."""
    return "gbnf" if _GBNF_RULE.search(text) else "lark"
