"""The OpenAI protocol as pydantic models: OpenAI's fields, vLLM's extra fields, and the checks
that turn a user mistake into a 400 before it reaches the engine."""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from jaxserve.sampling_params import RequestOutputKind, SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# JSON has no -inf: logprobs are clipped here, as vLLM clips them.
MIN_LOGPROB = -9999.0


class OpenAIBaseModel(BaseModel):
    """Unknown request fields are kept in `model_extra`; the server logs them as ignored."""

    model_config = ConfigDict(extra="allow")


class _Response(OpenAIBaseModel):
    """A response part whose vLLM-only fields are left out of the JSON unless filled in."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("token_ids", "prompt_token_ids",
                                                "prompt_logprobs")

    @model_serializer(mode="wrap")
    def _omit_empty_extras(self, handler):
        data = handler(self)
        for key in self._omit_if_none:
            if key in data and data[key] is None:
                del data[key]
        return data


class _StreamResponse(OpenAIBaseModel):
    """A stream chunk: `usage` is present (null until the last chunk) only when the client asked
    for it with stream_options.include_usage, as OpenAI's API has it."""

    @model_serializer(mode="wrap")
    def _usage_only_when_asked(self, handler, info):
        data = handler(self)
        if data.get("usage") is None and not (info.context or {}).get("include_usage"):
            data.pop("usage", None)
        if data.get("system_fingerprint") is None:
            data.pop("system_fingerprint", None)
        return data


# ---- errors -------------------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- shared request parts ------------------------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class _SamplingFields(OpenAIBaseModel):
    """Fields both endpoints share: OpenAI's, then vLLM's extras. Numbers must be finite: JSON's
    NaN and Infinity (which Python's parser takes) are a 400."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1, le=128)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # OpenAI fields that describe the request and do not change what is generated: accepted.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras.
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    priority: int = 0
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    # Output constraints (see structured_request.py): at most one of response_format,
    # structured_outputs and the older guided_* fields.
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: Any = None
    logits_processors: Any = None

    def problem(self) -> tuple[str, str] | None:
        """(message, param) for the first field that is wrong together with another one, or
        that asks for something jaxserve does not do yet."""
        if self.stream_options is not None and not self.stream:
            return "stream_options can only be given when stream is true", "stream_options"
        message = self.unsupported()
        if message is not None:
            return message, message.split()[0].rstrip(":")
        return None

    def unsupported(self) -> str | None:
        """The first field asking for something jaxserve does not do yet, as an error message."""
        if self.use_beam_search:
            return "use_beam_search is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported"
        if self.length_penalty != 1.0:
            return "length_penalty only applies to beam search, which is not supported"
        if self.logits_processors is not None:
            return "logits_processors are not supported"
        return None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any], output_kind: RequestOutputKind,
                        ) -> SamplingParams:
        """The engine's SamplingParams; unset fields take the server's defaults (generation
        config), then vLLM's. Raises ValueError for out-of-range values."""

        def pick(name: str, fallback):
            value = getattr(self, name)
            if value is not None:
                return value
            return defaults.get(name, fallback)

        if max_tokens is None:
            max_tokens = defaults.get("max_tokens")
        return SamplingParams(
            n=self.n, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words, output_kind=output_kind)


# ---- completions ---------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    add_special_tokens: bool = True


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenUsageInfo(OpenAIBaseModel):
    cached_tokens: int | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptTokenUsageInfo | None = None
    completion_tokens_details: dict[str, int] | None = None


class CompletionResponseChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class CompletionStreamChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionStreamResponse(_StreamResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- chat ---------------------------------------------------------------------------------------
class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and self.role not in ("assistant",):
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for part in self.content:
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not supported "
                                     "(text only: this server has no multimodal models)")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    # vLLM's extras.
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def problem(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs set to true", "top_logprobs"
        if self.continue_final_message and self.add_generation_prompt:
            return ("continue_final_message and add_generation_prompt cannot both be true",
                    "continue_final_message")
        return super().problem()

    def unsupported(self) -> str | None:
        # OpenAI fields that would change the answer and that jaxserve does not implement.
        for name in ("functions", "function_call", "audio", "web_search_options", "verbosity"):
            if (self.model_extra or {}).get(name) is not None:
                return f"{name} is not supported"
        if (self.model_extra or {}).get("modalities") not in (None, ["text"]):
            return "modalities other than ['text'] are not supported"
        if self.reasoning_effort is not None:
            return "reasoning_effort is not supported"
        return super().unsupported()


class ChatLogProb(OpenAIBaseModel):
    token: str
    logprob: float = MIN_LOGPROB
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatLogProbsContent] | None = None


class AssistantMessage(_Response):
    """OpenAI's message fields (null when unused); tool_calls, and reasoning_content (vLLM's
    older name of `reasoning`), only when there are some."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("tool_calls", "reasoning_content")

    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatCompletionResponseChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None
    prompt_token_ids: list[int] | None = None
    system_fingerprint: str | None = None


class DeltaMessage(_Response):
    """A chunk's delta; role, reasoning and tool_calls only when set. A tool call delta is
    OpenAI's {"index", "id", "type", "function": {"name", "arguments"}}: index on every delta,
    id, type and name only on a call's first."""

    _omit_if_none: ClassVar[tuple[str, ...]] = ("role", "reasoning", "reasoning_content",
                                                "tool_calls")

    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(_StreamResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


# ---- models, tokenize ----------------------------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "jaxserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeCompletionRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
