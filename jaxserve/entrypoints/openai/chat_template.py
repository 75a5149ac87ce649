"""Chat templates: `--chat-template` read at start-up, and rendering within bounds.

A template is Jinja run in transformers' sandbox, which stops a template from reaching Python
internals but not from looping for ever: a nested loop over `range(100000)` renders for hours.
`render_bounded` renders on the calling thread (the server calls it from a worker thread, never
on the event loop) with a trace function on the template's own frames only: past the deadline,
or once the template has produced more than `max_chars` of text, the next line the template runs
raises `TemplateLimitError`. A thread cannot be killed, but a template can be made to stop.

NOTE: the trace sees template code, not the single builtin a template line may call; one
operation on a huge value (`'x' * 10**10`) is not interrupted. Templates sent in requests are
refused unless the server runs with `--trust-request-chat-template`, as in vLLM.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from jaxserve.models.source import load_chat_template, looks_like_path  # noqa: F401

# The compiled Jinja code of a template built from a string runs under this file name.
_TEMPLATE_FILE = "<template>"


class TemplateLimitError(Exception):
    """A chat template ran past its time or output bound."""


def render_bounded(tokenizer, conversation: list[dict[str, Any]], *, template: str,
                   timeout_s: float, max_chars: int, **kwargs: Any) -> str:
    """`tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
    **kwargs)`, stopped with `TemplateLimitError` after `timeout_s` seconds or `max_chars`
    characters of output. Runs on the calling thread; call it off the event loop."""
    deadline = time.monotonic() + timeout_s
    produced = [0]

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the chat template did not finish within {timeout_s:g} s")
        if event == "return" and isinstance(arg, str):  # a chunk the template yields
            produced[0] += len(arg)
            if produced[0] > max_chars:
                raise TemplateLimitError(f"the chat template produced more than {max_chars} "
                                         "characters")
        return check

    def on_call(frame, event, arg):
        if frame.f_code.co_filename != _TEMPLATE_FILE:
            return None  # no line events outside template code
        return check(frame, event, arg)

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template,
                                             tokenize=False, **kwargs)
    finally:
        sys.settrace(previous)
    if len(text) > max_chars:
        raise TemplateLimitError(f"the chat template produced more than {max_chars} characters")
    return text
