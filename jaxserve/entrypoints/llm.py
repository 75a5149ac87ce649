"""The offline Python API, after vLLM's `LLM`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence as Seq
from typing import Any

from jaxserve.engine.args import EngineArgs
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.progress import progress
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


class LLM:
    """Generate text for a batch of prompts with continuous batching.

    >>> llm = LLM()  # the default model, SmolLM2-135M-Instruct
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, tensor_parallel_size: int = 1,
                 **kwargs: Any):
        args = EngineArgs(model=model, tokenizer=tokenizer, dtype=dtype,
                          max_model_len=max_model_len, seed=seed,
                          tensor_parallel_size=tensor_parallel_size, **kwargs)
        if args.node_rank > 0:
            raise ValueError(f"node_rank={args.node_rank}: only node 0 runs an LLM; the other "
                             "nodes run jaxserve.engine.distributed.run_follower(EngineArgs(...)) "
                             "or `jaxserve serve ... --node-rank N`")
        self.engine = LLMEngine(args)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Prompts are strings, `{"prompt_token_ids": [...]}` dicts, or lists of either."""
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} "
                             "sampling params")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError("priority must give one value per prompt")
        # Tokenize and validate everything first: a bad prompt must not leave the others queued.
        requests = []
        for prompt, params in zip(prompts, sampling_params):
            text, ids = self._tokenize(prompt)
            self.engine.validate(ids, params)
            if params.structured_outputs is not None:
                self.engine.compile_grammar(params).result()  # a grammar error raises here
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY
            requests.append((str(next(self._ids)), text, ids, params))
        try:
            for i, (request_id, text, ids, params) in enumerate(requests):
                self.engine.add_request(request_id, ids, params, prompt=text,
                                        priority=priority[i] if priority else 0)
        except BaseException:
            for request_id, *_ in requests:
                self.engine.abort_request(request_id)
            raise
        return self._run([r[0] for r in requests], use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt": self.apply_chat_template(
            conv, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(chat_template_kwargs or {}))}
            for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        template = chat_template or self.engine.chat_template
        if template is None:
            raise ValueError("the model has no chat template; pass chat_template= "
                             "(or --chat-template)")
        return self.engine.tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **kwargs)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer(prompt).input_ids
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                # A rendered chat template already holds its special tokens.
                text = prompt["prompt"]
                return text, self.engine.tokenizer(text, add_special_tokens=False).input_ids
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict with "
                         f"'prompt' or 'prompt_token_ids', got {type(prompt).__name__}")

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = progress(total=len(order), desc="Processed prompts", unit="prompt",
                       disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_all()
            raise
        finally:
            bar.close()
        return [done[r] for r in order]


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        return [prompts]
    return list(prompts)
