"""`POST /v1/chat/completions`: the chat template, one request (n choices), streaming chunks;
tools (tool_calls.py), output constraints (structured_request.py) and reasoning (chat_output.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from jaxserve.entrypoints.openai.chat_output import ChoiceOutput, finish_reason
from jaxserve.entrypoints.openai.chat_template import TemplateLimitError, render_bounded
from jaxserve.entrypoints.openai.protocol import (AssistantMessage, ChatCompletionLogProbs,
                                                  ChatCompletionRequest, ChatCompletionResponse,
                                                  ChatCompletionResponseChoice,
                                                  ChatCompletionStreamChoice,
                                                  ChatCompletionStreamResponse, ChatMessage,
                                                  DeltaMessage)
from jaxserve.entrypoints.openai.serving import (SYSTEM_FINGERPRINT, OpenAIServing,
                                                 RequestError, value_error)
from jaxserve.entrypoints.openai.structured_request import requested_constraint
from jaxserve.entrypoints.openai.tool_calls import ToolPlan, plan_tools, template_tool_calls
from jaxserve.entrypoints.openai.tool_parsers import ToolParserManager
from jaxserve.outputs import RequestOutput
from jaxserve.reasoning import ReasoningParserManager
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
    tools: ToolPlan
    constraint_param: str | None = None  # the field that constrains the output, if any


class OpenAIServingChat(OpenAIServing):

    def __init__(self, *args, chat_template: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template or self.core.chat_template
        name = self.options.reasoning_parser
        self.reasoning_parser = ReasoningParserManager.get(name) if name else None
        if self.options.tool_call_parser:
            ToolParserManager.get(self.options.tool_call_parser)  # a bad name fails at start-up

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
            if m.tool_calls:
                d["tool_calls"] = template_tool_calls(m.tool_calls)
            if m.content is None and fmt != "openai":
                d["content"] = ""  # an assistant's tool calls alone: templates concatenate it
            out.append(d)
        return out

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool,
               continue_final_message: bool, chat_template: str | None = None,
               chat_template_kwargs: dict[str, Any] | None = None,
               tools: list | None = None, documents: list | None = None) -> str:
        """The chat template applied; a template error is the user's (400)."""
        if chat_template is not None and not self.options.trust_request_chat_template:
            raise RequestError("Chat templates sent in requests are refused: this server does "
                               "not run with --trust-request-chat-template.",
                               param="chat_template")
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
            return render_bounded(
                self.tokenizer, self.conversation(messages), template=template,
                timeout_s=self.options.chat_template_timeout_s,
                max_chars=self.max_prompt_chars,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message, tools=tools,
                documents=documents, **kwargs)
        except TemplateLimitError as e:
            raise RequestError(f"The chat template was stopped: {e}.", param="messages") from None
        except RecursionError:
            raise RequestError("The chat template recursed too deeply.", param="messages") from None
        except Exception as e:  # noqa: BLE001 - jinja errors come from the user's messages
            raise RequestError(f"The chat template could not be applied to these messages: "
                               f"{e}", param="messages") from None

    def prepare(self, request: ChatCompletionRequest) -> ChatPrompt:
        self.check_model(request.model)
        problem = request.problem()
        if problem is not None:
            raise RequestError(problem[0], param=problem[1])
        tools = plan_tools(request, auto_enabled=self.options.enable_auto_tool_choice,
                           parser_name=self.options.tool_call_parser)
        constraint = requested_constraint(request)
        if constraint is not None and tools.constraint is not None:
            raise RequestError(f"tool_choice {request.tool_choice!r} constrains the output "
                               f"already; it cannot be combined with {constraint.param}",
                               param=constraint.param)
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
        constraint_param = None
        if tools.constraint is not None:
            params.structured_outputs, constraint_param = tools.constraint, "tool_choice"
        elif constraint is not None:
            params.structured_outputs, constraint_param = constraint.params, constraint.param
        if tools.mode == "auto" and tools.parser.needs_special_tokens:
            params.skip_special_tokens = False  # the call markers must reach the parser
        self.validate(ids, params, request.priority)
        role = (self.options.response_role if request.add_generation_prompt
                else request.messages[-1].role)
        echo = ""
        last = request.messages[-1]
        if request.echo and last.role == role and last.content:
            echo = (last.content if isinstance(last.content, str)
                    else "\n".join(p["text"] for p in last.content))
        return ChatPrompt(text, ids, params, role, echo, tools, constraint_param)

    def choice_output(self, request: ChatCompletionRequest,
                      prompt: ChatPrompt) -> ChoiceOutput | None:
        """A parser for one choice's output; None when the text is all content."""
        if prompt.tools.mode == "none" and self.reasoning_parser is None:
            return None
        reasoning = None
        if self.reasoning_parser is not None:
            reasoning = self.reasoning_parser(self.tokenizer,
                                              **(request.chat_template_kwargs or {}))
        return ChoiceOutput(prompt.tools, reasoning, self.tokenizer)

    def message(self, request: ChatCompletionRequest, prompt: ChatPrompt,
                text: str, engine_reason: str | None) -> tuple[AssistantMessage, str | None]:
        """A finished choice's message and finish_reason."""
        parser = self.choice_output(request, prompt)
        if parser is None:
            return AssistantMessage(role=prompt.role, content=prompt.echo + text), engine_reason
        parsed = parser.whole(text)
        content = parsed.content
        if prompt.echo:
            content = prompt.echo + (content or "")
        message = AssistantMessage(role=prompt.role, content=content,
                                   reasoning=parsed.reasoning,
                                   reasoning_content=parsed.reasoning,
                                   tool_calls=parsed.tool_calls)
        return message, finish_reason(engine_reason, prompt.tools, bool(parsed.tool_calls))

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
        choices = []
        for c in final.outputs:
            self.check_constrained_finish(prompt.params, c.finish_reason, prompt.constraint_param)
            message, reason = self.message(request, prompt, c.text, c.finish_reason)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=message,
                logprobs=self._logprobs(request, c.token_ids, c.logprobs),
                finish_reason=reason, stop_reason=c.stop_reason,
                token_ids=list(c.token_ids) if request.return_token_ids else None))
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
        parsers: dict[int, ChoiceOutput | None] = {}

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
                self.check_constrained_finish(prompt.params, c.finish_reason,
                                              prompt.constraint_param)
                if c.index not in parsers:
                    parsers[c.index] = self.choice_output(request, prompt)
                for choice in self._stream_choices(request, prompt, c, parsers[c.index]):
                    yield chunk([choice], usage,
                                last=choice.finish_reason is not None and not include_usage)
        if include_usage:
            yield chunk([], self.usage(prompt_tokens, completion_tokens, cached or 0), last=True)

    def _stream_choices(self, request: ChatCompletionRequest, prompt: ChatPrompt, c,
                        parser: ChoiceOutput | None) -> list[ChatCompletionStreamChoice]:
        """The chunks of one engine delta of choice `c`: its text as content, or, through the
        parser, reasoning, content and tool-call deltas. The step's logprobs and token ids ride
        on the first, the finish_reason on the last (an empty delta when nothing else is due)."""
        logprobs = self._logprobs(request, c.token_ids, c.logprobs)
        token_ids = list(c.token_ids) if request.return_token_ids else None
        if parser is None:
            deltas, reason = [DeltaMessage(content=c.text)], c.finish_reason
        else:
            deltas = parser.feed(c.text) if c.text else []
            if c.finish_reason is not None:
                deltas += parser.finish()
            reason = finish_reason(c.finish_reason, prompt.tools, parser.num_calls > 0)
            if not deltas and (reason is not None or logprobs is not None
                               or token_ids is not None):
                deltas = [DeltaMessage()]
        last = len(deltas) - 1
        return [ChatCompletionStreamChoice(
            index=c.index, delta=d, logprobs=logprobs if j == 0 else None,
            finish_reason=reason if j == last else None,
            stop_reason=c.stop_reason if j == last else None,
            token_ids=token_ids if j == 0 else None) for j, d in enumerate(deltas)]
