"""What both generation endpoints share: model names, prompt checks, the engine call, errors,
logprobs in OpenAI's two formats, and merging the streams of a batched request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jaxserve import __version__
from jaxserve.engine.async_engine import AsyncLLMEngine
from jaxserve.entrypoints.openai.protocol import (MIN_LOGPROB, ChatLogProb, ChatLogProbsContent,
                                                  CompletionLogProbs, PromptTokenUsageInfo,
                                                  UsageInfo)
from jaxserve.outputs import Logprob, RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger("jaxserve.server")

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class RequestError(Exception):
    """A user mistake: becomes an OpenAI-shaped error with this status, never a 500."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


SYSTEM_FINGERPRINT = f"jaxserve-{__version__}"
# A request whose grammar is not compiled by then is refused (the compile runs on, cached).
GRAMMAR_COMPILE_TIMEOUT_S = 30.0


def value_error(e: ValueError, fields) -> RequestError:
    """A 400 for a ValueError from SamplingParams or the engine; `param` is the field the message
    starts with, when it names one."""
    message = str(e)
    first = message.split(" ", 1)[0].strip(":,")
    return RequestError(message, param=first if first in fields else None)


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) spells each byte as a character: printable Latin-1 bytes as
    themselves, the others as U+0100 onwards in byte order. Character -> byte."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The token's own bytes (OpenAI's `bytes`), also when it holds part of a UTF-8 character
    and its text alone decodes to U+FFFD."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece:
        m = _BYTE_FALLBACK.fullmatch(piece)
        if m:  # SentencePiece byte fallback: <0xE2>
            return [int(m.group(1), 16)]
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        table = _byte_level_table()
        if type(decoder).__name__ == "ByteLevel" and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(text.encode("utf-8"))


@dataclass
class ServingOptions:
    """The frontend flags the endpoints read."""

    served_model_names: list[str]
    response_role: str = "assistant"
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    enable_force_include_usage: bool = False
    chat_template_content_format: str = "auto"
    enable_log_requests: bool = False
    max_log_len: int | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    trust_request_chat_template: bool = False
    chat_template_timeout_s: float = 5.0  # a render past this is stopped (a 400)


class OpenAIServing:
    """Holds the engine and the options; validates and submits requests."""

    def __init__(self, engine: AsyncLLMEngine, options: ServingOptions):
        self.engine = engine
        self.core = engine.engine  # the LLMEngine: tokenizer, limits (read-only here)
        self.options = options
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self.default_sampling = dict(self.core.default_sampling_params)
        # Text longer than this cannot fit the context (no token is 64 characters on average),
        # so it is refused before tokenizing; a rendered chat template is stopped there.
        self.max_prompt_chars = max(1 << 20, 64 * self.max_model_len)
        # Field names an error message may start with (its `param`).
        self.fields = set(SamplingParams.__dataclass_fields__) | {"prompt", "messages",
                                                                  "top_logprobs"}
        # NOTE: one thread hands grammars to the engine's backend, off the event loop: the
        # first builds the backend (tokenizer tables, ~0.5 s), and a schema check costs ms.
        self._grammar_submit = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="jaxserve-grammar")

    # ---- checks ----------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.options.served_model_names:
            raise RequestError(f"The model `{name}` does not exist.", 404, param="model",
                               code="model_not_found")

    @property
    def model_name(self) -> str:
        return self.options.served_model_names[0]

    def check_prompt_ids(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise RequestError("The prompt is empty.", param=param)
        vocab = self.core.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"Token id {bad} is out of vocabulary (size {vocab}).",
                               param=param)

    def prompt_ids(self, ids: list[int], truncate: int | None, param: str) -> list[int]:
        """`ids` checked, then cut to their last `truncate` tokens (-1: max_model_len; vLLM's
        truncate_prompt_tokens) and checked again."""
        self.check_prompt_ids(ids, param=param)
        if truncate is None:
            return ids
        keep = self.max_model_len if truncate == -1 else truncate
        ids = ids[-keep:] if keep else []
        self.check_prompt_ids(ids, param=param)
        return ids

    def check_prompt_text(self, text: str, truncate: int | None, param: str) -> None:
        """A 400 for text far beyond the context, before it takes a thread seconds to tokenize
        (unless the request asks for the prompt to be truncated)."""
        if truncate is None and len(text) > self.max_prompt_chars:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"{param} has {len(text)} characters, far more than that. Please reduce the "
                f"length of the {param}.", param=param, code="context_length_exceeded")

    def stream_usage(self, request) -> tuple[bool, bool]:
        """(a last chunk with usage, usage in every chunk): stream_options, or the server's
        --enable-force-include-usage."""
        opts = request.stream_options
        include = self.options.enable_force_include_usage or bool(opts and opts.include_usage)
        return include, include and bool(opts and opts.continuous_usage_stats)

    def max_tokens_for(self, prompt_len: int, requested: int | None, *, what: str) -> int:
        """The request's max_tokens, checked against the context; None means all that fits."""
        limit = self.max_model_len
        if prompt_len >= limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, your request "
                f"has {prompt_len} input tokens. Please reduce the length of the input {what}.",
                param="messages" if what == "messages" else "prompt",
                code="context_length_exceeded")
        room = limit - prompt_len
        if requested is None:
            default = self.default_sampling.get("max_tokens")
            return min(room, default) if default else room
        if prompt_len + requested > limit:
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in "
                f"the completion). Please reduce the length of the {what} or completion.",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def validate(self, ids: list[int], params: SamplingParams, priority: int) -> None:
        """The engine's own checks, run here so a bad request fails before its stream starts.
        A grammar is checked apart, by `compile_grammar`, off the event loop."""
        if params.structured_outputs is not None:
            params = dataclasses.replace(params, structured_outputs=None)
        try:
            self.core.validate(ids, params)
        except ValueError as e:
            raise value_error(e, self.fields) from None
        if priority != 0 and self.core.scheduler_config.policy != "priority":
            raise RequestError("priority is only allowed with --scheduling-policy priority",
                               param="priority")

    def log_request(self, request_id: str, prompt: str | None, ids: list[int],
                    params: SamplingParams) -> None:
        if not self.options.enable_log_requests:
            return
        n = self.options.max_log_len
        shown_prompt = prompt[:n] if (prompt is not None and n is not None) else prompt
        shown_ids = ids[:n] if n is not None else ids
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s",
                    request_id, shown_prompt, params, shown_ids)

    async def compile_grammar(self, params: SamplingParams, param: str | None) -> None:
        """Compiles the request's grammar before it is added (the engine then finds it in its
        cache); a spec or grammar the library rejects is a 400 naming `param`."""
        if params.structured_outputs is None:
            return
        loop = asyncio.get_running_loop()
        try:
            future = await loop.run_in_executor(self._grammar_submit, self.core.compile_grammar,
                                                params)
            # NOTE: shielded: the compile (cached, shared by requests) runs on if this one leaves.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                   GRAMMAR_COMPILE_TIMEOUT_S)
        except ValueError as e:
            raise RequestError(str(e), param=param) from None
        except TimeoutError:
            raise RequestError(f"The output constraint did not compile within "
                               f"{GRAMMAR_COMPILE_TIMEOUT_S:g} s; give a smaller one.",
                               param=param) from None

    @staticmethod
    def check_constrained_finish(params: SamplingParams, reason: str | None,
                                 param: str | None) -> None:
        """A constrained output the engine stopped mid-grammar ("abort") would break its
        constraint: the client gets this error instead of the text."""
        if reason == "abort" and params.structured_outputs is not None:
            raise RequestError("The output could not be completed under its constraint: the "
                               "grammar library stopped it (the grammar is too complex, or no "
                               "output within the limits satisfies it).", param=param)

    # ---- engine ----------------------------------------------------------------------------
    def generate(self, request_id: str, ids: list[int], params: SamplingParams, *,
                 prompt: str | None, priority: int) -> AsyncIterator[RequestOutput]:
        self.log_request(request_id, prompt, ids, params)
        return self.engine.generate(request_id, ids, params, prompt=prompt, priority=priority)

    # ---- tokens and logprobs ---------------------------------------------------------------
    def token_str(self, token_id: int, lp: Logprob | None = None) -> str:
        if self.options.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, token_ids: list[int], steps: list[dict[int, Logprob] | None],
                            k: int, offset: int) -> CompletionLogProbs:
        """OpenAI's completions format: parallel lists; a `None` step is the first prompt token.
        `top_logprobs` holds the chosen token and the `k` most likely."""
        out = CompletionLogProbs()
        for tid, step in zip(token_ids, steps):
            chosen = step.get(tid) if step else None
            tok = self.token_str(tid, chosen)
            out.tokens.append(tok)
            out.text_offset.append(offset)
            offset += len(tok)
            if step is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(chosen.logprob, MIN_LOGPROB))
            out.top_logprobs.append({
                self.token_str(i, lp): max(lp.logprob, MIN_LOGPROB) for i, lp in step.items()
                if i == tid or (lp.rank is not None and lp.rank <= k)})
        return out

    def chat_logprobs(self, token_ids: list[int], steps: list[dict[int, Logprob]],
                      k: int) -> list[ChatLogProbsContent]:
        """OpenAI's chat format: one entry per token, with the `k` most likely by rank."""
        content = []
        for tid, step in zip(token_ids, steps):
            chosen = step[tid]
            tok = self.token_str(tid, chosen)
            top = sorted(((lp.rank, i, lp) for i, lp in step.items()
                          if lp.rank is not None and 1 <= lp.rank <= k), key=lambda t: t[0])
            content.append(ChatLogProbsContent(
                token=tok, logprob=max(chosen.logprob, MIN_LOGPROB),
                bytes=token_bytes(self.tokenizer, tid, tok),
                top_logprobs=[ChatLogProb(token=(s := self.token_str(i, lp)),
                                          logprob=max(lp.logprob, MIN_LOGPROB),
                                          bytes=token_bytes(self.tokenizer, i, s))
                              for _, i, lp in top]))
        return content

    def prompt_logprobs_json(self, out: RequestOutput) -> list[dict[int, dict[str, Any]] | None]:
        """vLLM's `prompt_logprobs` field: per prompt token, {id: {logprob, rank, decoded_token}}."""
        return [None if step is None else {
            i: {"logprob": max(lp.logprob, MIN_LOGPROB), "rank": lp.rank,
                "decoded_token": self.token_str(i, lp)} for i, lp in step.items()}
            for step in out.prompt_logprobs or []]

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> UsageInfo:
        details = (PromptTokenUsageInfo(cached_tokens=cached)
                   if self.options.enable_prompt_tokens_details else None)
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens,
                         prompt_tokens_details=details)


async def merge_streams(streams: list[AsyncIterator[RequestOutput]],
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the stream's index.
    Closing the merged stream (a disconnect) cancels every request that is still running."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
