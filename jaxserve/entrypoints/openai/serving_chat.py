"""`POST /v1/chat/completions`: the chat template, one request (n choices), streaming chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jaxserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionLogProbs,
                                                  ChatCompletionRequest, ChatCompletionResponse,
                                                  ChatCompletionResponseChoice,
                                                  ChatCompletionStreamChoice,
                                                  ChatCompletionStreamResponse, ChatMessage,
                                                  DeltaMessage)
from jaxserve.entrypoints.openai.serving import (SYSTEM_FINGERPRINT, OpenAIServing,
                                                 RequestError, value_error)
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

# Keys a request's chat_template_kwargs may not set: the server sets them itself.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "chat_template", "tools",
                             "documents", "add_generation_prompt", "continue_final_message"}


@dataclass
class ChatPrompt:
    text: str
    ids: list[int]
    params: SamplingParams
    role: str
    echo: str  # the last message's content, sent first when echo is on


class OpenAIServingChat(OpenAIServing):

    def __init__(self, *args, chat_template: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template or self.core.chat_template

    def conversation(self, messages: list[ChatMessage],
                     content_format: str | None = None) -> list[dict[str, Any]]:
        """Messages as the template sees them: text parts joined into one string ("string"
        format, the default) or kept as OpenAI's list of parts ("openai")."""
        fmt = content_format or self.options.chat_template_content_format
        out = []
        for m in messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list) and fmt != "openai":
                d["content"] = "\n".join(part["text"] for part in m.content)
            out.append(d)
        return out

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool,
               continue_final_message: bool, chat_template: str | None = None,
               chat_template_kwargs: dict[str, Any] | None = None,
               tools: list | None = None, documents: list | None = None) -> str:
        """The chat template applied; a template error is the user's (400)."""
        template = chat_template or self.chat_template
        if template is None:
            raise RequestError("The model has no chat template: start the server with "
                               "--chat-template, or use /v1/completions.")
        kwargs = dict(chat_template_kwargs or {})
        reserved = _RESERVED_TEMPLATE_KWARGS & kwargs.keys()
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {sorted(reserved)}",
                               param="chat_template_kwargs")
        if continue_final_message and messages[-1].role != "assistant":
            raise RequestError("continue_final_message needs the last message to be the "
                               "assistant's", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                self.conversation(messages), chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, tools=tools,
                documents=documents, **kwargs)
        except Exception as e:  # noqa: BLE001 - jinja errors come from the user's messages
            raise RequestError(f"The chat template could not be applied to these messages: "
                               f"{e}", param="messages") from None

    def prepare(self, request: ChatCompletionRequest) -> ChatPrompt:
        self.check_model(request.model)
        problem = request.problem()
        if problem is not None:
            raise RequestError(problem[0], param=problem[1])
        text = self.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                           continue_final_message=request.continue_final_message,
                           chat_template=request.chat_template,
                           chat_template_kwargs=request.chat_template_kwargs,
                           tools=request.tools, documents=request.documents)
        ids = self.tokenizer(text, add_special_tokens=request.add_special_tokens).input_ids
        ids = self.prompt_ids(ids, request.truncate_prompt_tokens, param="messages")
        requested = request.max_completion_tokens
        if requested is None:
            requested = request.max_tokens
        max_tokens = self.max_tokens_for(len(ids), requested, what="messages")
        top = request.top_logprobs or 0 if request.logprobs else None
        kind = RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
        try:
            params = request.sampling_params(max_tokens, top, self.default_sampling, kind)
        except ValueError as e:
            error = value_error(e, self.fields)
            if error.param == "logprobs":
                error.param = "top_logprobs"  # the chat field that asked for them
            raise error from None
        self.validate(ids, params, request.priority)
        role = (self.options.response_role if request.add_generation_prompt
                else request.messages[-1].role)
        echo = ""
        last = request.messages[-1]
        if request.echo and last.role == role and last.content:
            echo = (last.content if isinstance(last.content, str)
                    else "\n".join(p["text"] for p in last.content))
        return ChatPrompt(text, ids, params, role, echo)

    def _logprobs(self, request: ChatCompletionRequest, token_ids, steps):
        if not request.logprobs:
            return None
        return ChatCompletionLogProbs(
            content=self.chat_logprobs(token_ids, steps or [], request.top_logprobs or 0))

    async def complete(self, request: ChatCompletionRequest, request_id: str,
                       engine_id: str, prompt: ChatPrompt) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        try:
            async for out in self.generate(engine_id, prompt.ids, prompt.params,
                                           prompt=prompt.text, priority=request.priority):
                final = out
        except ValueError as e:
            raise RequestError(str(e)) from None
        choices = [ChatCompletionResponseChoice(
            index=c.index, message=AssistantMessage(role=prompt.role,
                                                    content=prompt.echo + c.text),
            logprobs=self._logprobs(request, c.token_ids, c.logprobs),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            token_ids=list(c.token_ids) if request.return_token_ids else None)
            for c in final.outputs]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(
            id=request_id, model=request.model or self.model_name, choices=choices,
            usage=self.usage(len(prompt.ids), completion_tokens, final.num_cached_tokens),
            prompt_logprobs=(self.prompt_logprobs_json(final)
                             if request.prompt_logprobs is not None else None),
            prompt_token_ids=list(prompt.ids) if request.return_token_ids else None,
            system_fingerprint=SYSTEM_FINGERPRINT)

    async def stream(self, request: ChatCompletionRequest, request_id: str, engine_id: str,
                     prompt: ChatPrompt) -> AsyncIterator[str]:
        """SSE payloads. Each choice's first chunk carries the role; they go out together, in
        index order, once the first token exists. Each choice ends with one finish_reason."""
        created = int(time.time())
        model = request.model or self.model_name
        include_usage, continuous = self.stream_usage(request)
        started = False
        prompt_tokens, completion_tokens, cached = len(prompt.ids), 0, None

        def chunk(choices, usage=None, last: bool = False) -> str:
            c = ChatCompletionStreamResponse(id=request_id, created=created, model=model,
                                             choices=choices)
            if usage is not None:
                c.usage = usage
            if last:
                c.system_fingerprint = SYSTEM_FINGERPRINT
            return c.model_dump_json(context={"include_usage": include_usage})

        async for out in self.generate(engine_id, prompt.ids, prompt.params, prompt=prompt.text,
                                       priority=request.priority):
            if cached is None:
                cached = out.num_cached_tokens
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                usage = (self.usage(prompt_tokens, completion_tokens, cached) if continuous
                         else None)
                if not started:  # the first token exists: every choice's role chunk, in order
                    started = True
                    for i in range(request.n):
                        yield chunk([ChatCompletionStreamChoice(
                            index=i, delta=DeltaMessage(role=prompt.role, content=""),
                            logprobs=None, finish_reason=None)], usage)
                        if prompt.echo:
                            yield chunk([ChatCompletionStreamChoice(
                                index=i, delta=DeltaMessage(content=prompt.echo),
                                logprobs=None, finish_reason=None)], usage)
                if not c.text and not c.token_ids and c.finish_reason is None:
                    continue
                yield chunk([ChatCompletionStreamChoice(
                    index=c.index, delta=DeltaMessage(content=c.text),
                    logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    token_ids=list(c.token_ids) if request.return_token_ids else None)], usage,
                    last=c.finish_reason is not None and not include_usage)
        if include_usage:
            yield chunk([], self.usage(prompt_tokens, completion_tokens, cached or 0), last=True)
