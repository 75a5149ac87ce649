"""`POST /v1/completions`: string, token-id and batched prompts; echo; logprobs; streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from jaxserve.entrypoints.openai.protocol import (CompletionLogProbs, CompletionRequest,
                                                  CompletionResponse, CompletionResponseChoice,
                                                  CompletionStreamChoice,
                                                  CompletionStreamResponse)
from jaxserve.entrypoints.openai.serving import (SYSTEM_FINGERPRINT, OpenAIServing,
                                                 RequestError, merge_streams, value_error)
from jaxserve.entrypoints.openai.structured_request import requested_constraint
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]
    params: SamplingParams
    request_id: str
    constraint_param: str | None = None  # the field that constrains the output, if any


@dataclass
class _Choice:
    """Streaming state of one choice: what has been sent so far."""

    text_offset: int = 0
    tokens: int = 0
    echoed: bool = False
    finished: bool = False
    token_ids: list[int] = field(default_factory=list)


class OpenAIServingCompletion(OpenAIServing):

    def prepare(self, request: CompletionRequest, request_id: str) -> list[_Prompt]:
        """Tokenize and check every prompt of the request; raises RequestError."""
        self.check_model(request.model)
        problem = request.problem()
        if problem is None and request.suffix is not None:
            problem = "suffix is not supported", "suffix"
        if problem is not None:
            raise RequestError(problem[0], param=problem[1])
        prompts = request.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("The prompt is empty.", param="prompt")
        constraint = requested_constraint(request)
        logprobs = request.logprobs
        kind = RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt:
                    raise RequestError("The prompt is empty.", param="prompt")
                text = prompt
                self.check_prompt_text(text, request.truncate_prompt_tokens, "prompt")
                ids = self.tokenizer(prompt, add_special_tokens=request.add_special_tokens
                                     ).input_ids
            else:
                text, ids = None, list(prompt)
            ids = self.prompt_ids(ids, request.truncate_prompt_tokens, param="prompt")
            if request.truncate_prompt_tokens is not None:
                text = None  # the text no longer matches the ids
            max_tokens = self.max_tokens_for(len(ids), request.max_tokens, what="prompt")
            try:
                params = request.sampling_params(max_tokens, logprobs, self.default_sampling,
                                                 kind)
                if request.echo and logprobs is not None:
                    # The echoed prompt carries its own logprobs.
                    params.prompt_logprobs = max(logprobs, params.prompt_logprobs or 0)
            except ValueError as e:
                raise value_error(e, self.fields) from None
            if constraint is not None:
                params.structured_outputs = constraint.params
            self.validate(ids, params, request.priority)
            out.append(_Prompt(text, ids, params, f"{request_id}-{i}",
                               constraint.param if constraint else None))
        return out

    def _prompt_text(self, p: _Prompt) -> str:
        return p.text if p.text is not None else self.tokenizer.decode(p.ids)

    def _logprobs(self, k: int, p: _Prompt, out: RequestOutput, c: CompletionOutput,
                  offset: int, echo: str | None) -> tuple[CompletionLogProbs, int]:
        """The completions-format logprobs of `c`'s (new) tokens, their text starting at
        `offset`; with `echo` (the prompt's text), the prompt's own logprobs go first (offsets
        from 0) and the generated ones follow the prompt's text. Also returns the offset after."""
        if echo is not None:
            offset = len(echo)
        gen = self.completion_logprobs(c.token_ids, c.logprobs or [], k, offset)
        end = offset + sum(len(t) for t in gen.tokens)
        if echo is None:
            return gen, end
        steps = list(out.prompt_logprobs or [None] * len(p.ids))
        logprobs = self.completion_logprobs(p.ids, steps, k, 0)
        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
            getattr(logprobs, name).extend(getattr(gen, name))
        return logprobs, end

    # ---- non-streaming ---------------------------------------------------------------------
    async def complete(self, request: CompletionRequest, request_id: str,
                       prompts: list[_Prompt]) -> CompletionResponse:
        streams = [self.generate(p.request_id, p.ids, p.params, prompt=p.text,
                                 priority=request.priority) for p in prompts]
        final: dict[int, RequestOutput] = {}
        try:
            async for i, out in merge_streams(streams):
                final[i] = out
        except ValueError as e:
            raise RequestError(str(e)) from None
        choices, completion_tokens, cached = [], 0, 0
        n = request.n
        for i, p in enumerate(prompts):
            out = final[i]
            cached += out.num_cached_tokens
            echo = self._prompt_text(p) if request.echo else None
            for c in out.outputs:
                self.check_constrained_finish(p.params, c.finish_reason, p.constraint_param)
                completion_tokens += len(c.token_ids)
                logprobs = None
                if request.logprobs is not None:
                    logprobs, _ = self._logprobs(request.logprobs, p, out, c, 0, echo)
                text = c.text if echo is None else echo + c.text
                choices.append(CompletionResponseChoice(
                    index=i * n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    prompt_logprobs=(self.prompt_logprobs_json(out)
                                     if request.prompt_logprobs is not None else None),
                    token_ids=list(c.token_ids) if request.return_token_ids else None,
                    prompt_token_ids=list(p.ids) if request.return_token_ids else None))
        choices.sort(key=lambda c: c.index)
        prompt_tokens = sum(len(p.ids) for p in prompts)
        return CompletionResponse(id=request_id, model=request.model or self.model_name,
                                  choices=choices,
                                  usage=self.usage(prompt_tokens, completion_tokens, cached),
                                  system_fingerprint=SYSTEM_FINGERPRINT)

    # ---- streaming -------------------------------------------------------------------------
    async def stream(self, request: CompletionRequest, request_id: str,
                     prompts: list[_Prompt]) -> AsyncIterator[str]:
        """SSE lines; the caller turns exceptions into an error event followed by [DONE]."""
        created = int(time.time())
        model = request.model or self.model_name
        n = request.n
        include_usage, continuous = self.stream_usage(request)
        states = {(i, j): _Choice() for i in range(len(prompts)) for j in range(n)}
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens, cached = 0, 0
        streams = [self.generate(p.request_id, p.ids, p.params, prompt=p.text,
                                 priority=request.priority) for p in prompts]
        seen_cached: set[int] = set()
        async for i, out in merge_streams(streams):
            p = prompts[i]
            if i not in seen_cached:
                seen_cached.add(i)
                cached += out.num_cached_tokens
            for c in out.outputs:
                self.check_constrained_finish(p.params, c.finish_reason, p.constraint_param)
                st = states[(i, c.index)]
                echo = None
                if request.echo and not st.echoed:  # the choice's first chunk
                    st.echoed = True
                    echo = self._prompt_text(p)
                text, logprobs = c.text if echo is None else echo + c.text, None
                if request.logprobs is not None:
                    logprobs, st.text_offset = self._logprobs(request.logprobs, p, out, c,
                                                              st.text_offset, echo)
                completion_tokens += len(c.token_ids)
                if not text and not c.token_ids and c.finish_reason is None:
                    continue
                choice = CompletionStreamChoice(
                    index=i * n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    token_ids=list(c.token_ids) if request.return_token_ids else None,
                    prompt_token_ids=(list(p.ids) if request.return_token_ids
                                      and not st.token_ids else None))
                st.token_ids.extend(c.token_ids)
                # One choice per chunk, as vLLM and OpenAI send them.
                chunk = CompletionStreamResponse(id=request_id, created=created, model=model,
                                                 choices=[choice])
                if continuous:
                    chunk.usage = self.usage(prompt_tokens, completion_tokens, cached)
                if c.finish_reason is not None and not include_usage:
                    chunk.system_fingerprint = SYSTEM_FINGERPRINT
                yield chunk.model_dump_json(context={"include_usage": include_usage})
        if include_usage:
            chunk = CompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[],
                usage=self.usage(prompt_tokens, completion_tokens, cached),
                system_fingerprint=SYSTEM_FINGERPRINT)
            yield chunk.model_dump_json(context={"include_usage": True})
