"""Requests that used to break the server (issue 15): each is now an OpenAI-shaped 4xx, and the
server answers /health while it is handled and after.

Most run on in-process apps over the shared tiny engine (server_utils); start-up and SIGTERM run
`jaxserve serve` in a subprocess. /health is polled with a short client timeout, never timed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx
import pytest

pytest.register_assert_rewrite("server_utils")
from server_utils import (REPO, SERVER_ENGINE, ServerProcess, serve_argv,  # noqa: E402
                          sse_events)

pytest_plugins = ["server_utils"]

HEALTH_TIMEOUT = 10.0  # a busy two-core machine answers in far less; a hung loop never does
BODY_LIMIT = 2_000_000
ASK = [{"role": "user", "content": "Hello"}]
NESTED_LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}"
               "{% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def app(serve_app):
    with serve_app(max_request_body_bytes=BODY_LIMIT) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def trusting_app(serve_app):
    with serve_app(trust_request_chat_template=True) as server:
        yield server.base_url


def healthy(url: str) -> None:
    assert httpx.get(url + "/health", timeout=HEALTH_TIMEOUT).status_code == 200


def while_healthy(url: str, send):
    """`send()`'s result; /health must answer while it runs (polled at least once) and after."""
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=send()), daemon=True)
    worker.start()
    polls = 0
    while worker.is_alive() or polls == 0:
        healthy(url)
        polls += 1
        worker.join(0.1)
    healthy(url)
    assert "r" in result, "the request raised"
    return result["r"]


def post(url: str, path: str, body, timeout: float = 120.0) -> httpx.Response:
    """POST `body` (a dict, dumped with NaN allowed, or raw text/bytes)."""
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, timeout=timeout,
                      headers={"content-type": "application/json"})


def assert_error(r: httpx.Response, status: int, *, param: str | None = None,
                 says: str = "") -> str:
    """An OpenAI-shaped error with this status, no internals in its message; the message."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    message = err["message"]
    assert says.lower() in message.lower(), message
    for internal in ("Traceback", "panic", "backtrace", "internal error", "<state>"):
        assert internal not in message, message
    return message


# ---- 1. chat templates in requests ---------------------------------------------------------------
def test_request_chat_template_refused_unless_trusted(app):
    for path in ("/v1/chat/completions", "/tokenize"):
        r = while_healthy(app, lambda: post(app, path, {
            "messages": ASK, "chat_template": NESTED_LOOP, "max_tokens": 2}))
        assert_error(r, 400, param="chat_template", says="--trust-request-chat-template")


def test_trusted_runaway_template_is_stopped(trusting_app):
    url = trusting_app
    r = while_healthy(url, lambda: post(url, "/v1/chat/completions", {
        "messages": ASK, "chat_template": NESTED_LOOP, "max_tokens": 2}))
    assert_error(r, 400, param="messages", says="did not finish within")
    huge = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"
    r = while_healthy(url, lambda: post(url, "/tokenize", {"messages": ASK,
                                                           "chat_template": huge}))
    assert_error(r, 400, says="characters")
    # A well-behaved request template is used.
    r = post(url, "/tokenize", {"messages": ASK, "return_token_strs": True,
                                "chat_template": "{% for m in messages %}<<{{ m.content }}>>"
                                                 "{% endfor %}"})
    assert r.status_code == 200, r.text
    assert "".join(r.json()["token_strs"]).replace("Ġ", " ") == "<<Hello>>"


# ---- 2. request size -----------------------------------------------------------------------------
def test_body_over_the_limit_is_413(app):
    big = json.dumps({"prompt": "x" * (2 * BODY_LIMIT)})
    r = while_healthy(app, lambda: post(app, "/v1/completions", big))
    assert_error(r, 413, says="--max-request-body-bytes")

    def chunked():  # no Content-Length: the limit holds while the body arrives
        yield b'{"prompt": "'
        for _ in range(60):
            yield b"y" * 50_000
        yield b'"}'

    def send():
        try:
            return httpx.post(app + "/v1/completions", content=chunked(), timeout=60,
                              headers={"content-type": "application/json"})
        except httpx.HTTPError as e:  # the server may close before the client is done
            return e

    r = while_healthy(app, send)
    if isinstance(r, httpx.Response):
        assert_error(r, 413)
    else:
        assert isinstance(r, (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError)), r


def test_large_prompt_is_tokenized_off_the_event_loop(app):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20_000  # 900 kB, ~200k tokens
    r = while_healthy(app, lambda: post(app, "/v1/completions", {"prompt": prompt}))
    assert_error(r, 400, says="maximum context length")
    r = while_healthy(app, lambda: post(app, "/tokenize", {"prompt": prompt}))
    assert r.status_code == 200 and r.json()["count"] > 100_000


# ---- 3. parseable bad input ----------------------------------------------------------------------
def _nested_schema(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("case", ["deep JSON", "deep json_schema", "surrogate in prompt",
                                  "surrogate in message", "surrogate to /tokenize",
                                  "100k guided_choice"])
def test_bad_input_is_400(app, case):
    path, body, says = {
        "deep JSON": ("/v1/completions",
                      '{"prompt": "x", "stop": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested"),
        "deep json_schema": ("/v1/chat/completions", {
            "messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
                "name": "deep", "schema": _nested_schema(400)}}}, "nested"),
        "surrogate in prompt": ("/v1/completions", '{"prompt": "a\\ud800b"}', "surrogate"),
        "surrogate in message": ("/v1/chat/completions",
                                 '{"messages": [{"role": "user", "content": "\\udfff"}]}',
                                 "surrogate"),
        "surrogate to /tokenize": ("/tokenize", '{"prompt": "\\ud800"}', "surrogate"),
        "100k guided_choice": ("/v1/completions", {
            "prompt": "Pick", "guided_choice": [f"option {i}" for i in range(100_000)]},
            "at most"),
    }[case]
    r = while_healthy(app, lambda: post(app, path, body))
    assert_error(r, 400, says=says)


# ---- 4. numbers that are not finite --------------------------------------------------------------
@pytest.mark.parametrize("field, value, param", [
    ("temperature", "NaN", "temperature"), ("temperature", "Infinity", "temperature"),
    ("top_p", "-Infinity", "top_p"), ("logit_bias", '{"42": NaN}', "logit_bias.42"),
    ("logit_bias", '{"42": Infinity}', "logit_bias.42")])
def test_non_finite_numbers_are_400(app, field, value, param):
    for path, start in (("/v1/completions", '{"prompt": "Hi", "max_tokens": 2, '),
                        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": '
                                                 '"Hi"}], "max_tokens": 2, ')):
        r = while_healthy(app, lambda: post(app, path, f'{start}"{field}": {value}}}'))
        assert_error(r, 400, param=param, says="finite")


# ---- 5. constraints no output can satisfy --------------------------------------------------------
SELF_REQUIRING = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


@pytest.mark.parametrize("constraint, param", [
    ({"guided_grammar": "root ::= root"}, "guided_grammar"),
    ({"guided_json": {"$ref": "#"}}, "guided_json"),
    ({"guided_json": SELF_REQUIRING}, "guided_json"),
    ({"structured_outputs": {"json": {"$defs": {"n": {"$ref": "#/$defs/n"}},
                                      "$ref": "#/$defs/n"}}}, "structured_outputs"),
    ({"guided_regex": "a{1000000}"}, "guided_regex")], ids=str)
def test_unsatisfiable_constraint_is_400(app, constraint, param):
    r = while_healthy(app, lambda: post(app, "/v1/completions", {
        "prompt": "Go", "max_tokens": 4, **constraint}))
    assert_error(r, 400, param=param)


def test_recursive_schema_with_a_base_case_is_served(app):
    import jsonschema

    tree = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 3},
        "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
        "required": ["name"], "additionalProperties": False}
    r = while_healthy(app, lambda: post(app, "/v1/completions", {
        "prompt": "A tree:", "max_tokens": 40, "temperature": 0, "guided_json": tree}))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length"), choice
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["text"]), tree)


def test_constrained_output_stopped_mid_grammar_is_an_error_not_text():
    from jaxserve.entrypoints.openai.serving import OpenAIServing, RequestError
    from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

    constrained = SamplingParams(structured_outputs=StructuredOutputsParams(regex="[ab]+"))
    with pytest.raises(RequestError, match="could not be completed") as e:
        OpenAIServing.check_constrained_finish(constrained, "abort", "guided_regex")
    assert e.value.status == 400 and e.value.param == "guided_regex"
    for reason in ("stop", "length", None):  # a prefix cut by max_tokens is allowed
        OpenAIServing.check_constrained_finish(constrained, reason, "guided_regex")
    OpenAIServing.check_constrained_finish(SamplingParams(), "abort", None)


# ---- 6. --chat-template naming a missing file ----------------------------------------------------
def test_missing_chat_template_file_fails_at_start_up(tmp_path):
    from jaxserve.entrypoints.openai.chat_template import load_chat_template

    missing = str(tmp_path / "nope" / "template.jinja")
    proc = subprocess.run(serve_argv("unused-model", chat_template=missing, port=0),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "no such file" in proc.stderr + proc.stdout and missing in proc.stderr + proc.stdout
    for value in ("template.j2", "templates/chat"):
        with pytest.raises(ValueError, match="no such file"):
            load_chat_template(value)
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert load_chat_template(inline) == inline
    (tmp_path / "t.jinja").write_text(inline)
    assert load_chat_template(str(tmp_path / "t.jinja")) == inline


def test_missing_chat_template_file_fails_in_python_too(tiny_model_dir, tmp_path):
    from jaxserve import LLM

    folder, _ = tiny_model_dir("LlamaForCausalLM")
    with pytest.raises(ValueError, match="no such file"):
        LLM(model=folder, chat_template=str(tmp_path / "missing.jinja"), max_model_len=64)


# ---- 7. SIGTERM with streams open ----------------------------------------------------------------
def test_sigterm_ends_open_streams_with_an_error_and_done(server_model_dir, tmp_path):
    engine = {**SERVER_ENGINE, "max_model_len": 256}
    server = ServerProcess(server_model_dir, str(tmp_path / "server.log"), **engine)
    try:
        server.wait_ready()
        body = {"prompt": "Count:", "max_tokens": 250, "ignore_eos": True, "n": 8,
                "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["choices"]
            healthy(server.base_url)  # during the stream
            server.proc.send_signal(signal.SIGTERM)
            rest = "\n".join(lines)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    events = sse_events(httpx.Response(200, text=first + "\n\n" + rest))
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert "shutting down" in error["message"], error
    log = server.log(tail=100_000)
    for bad in ("Traceback", "Exception in ASGI application", "ERROR"):
        assert bad not in log, log[-3000:]


# ---- 8. tool calls never invent argument keys ----------------------------------------------------
CITY = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"]}}}
OPEN = {"type": "function", "function": {"name": "anything", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": True}}}


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_calls_take_only_declared_arguments(app, default_tokenizer, choice):
    from types import SimpleNamespace

    from jaxserve.entrypoints.openai.tool_calls import plan_tools
    from jaxserve.structured_output import GrammarBackend

    tool_choice = choice if choice == "required" else {"type": "function",
                                                       "function": {"name": "weather"}}
    request = SimpleNamespace(tools=[CITY, OPEN], tool_choice=tool_choice,
                              parallel_tool_calls=None)
    plan = plan_tools(request, auto_enabled=False, parser_name=None)
    backend = GrammarBackend(default_tokenizer, len(default_tokenizer))
    grammar = backend.compile(plan.constraint.spec()).result(timeout=60)

    def accepts(text: str) -> bool:
        m = grammar.matcher()
        ids = default_tokenizer(text, add_special_tokens=False).input_ids
        return all(m.accept_token(t) for t in ids) and m.is_accepting()

    def call(name: str, args: str) -> str:
        return f'[{{"name": "{name}", "parameters": {args}}}]' if choice == "required" else args

    assert accepts(call("weather", '{"city": "Paris"}'))
    assert not accepts(call("weather", '{"city": "Paris", "country": "FR"}'))
    if choice == "required":  # a tool whose schema allows more keys keeps them
        assert accepts(call("anything", '{"x": 1}'))
    r = while_healthy(app, lambda: post(app, "/v1/chat/completions", {
        "messages": ASK, "tools": [CITY, OPEN], "tool_choice": tool_choice, "max_tokens": 30,
        "temperature": 0}))
    assert r.status_code == 200, r.text
