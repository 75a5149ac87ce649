"""Structured outputs, tool calls and reasoning through the OpenAI server.

The parsing layer (`chat_output.ChoiceOutput`, `tool_calls`) is tested on recorded outputs: whole
and streamed in every cut agree. The default model (SmolLM2-135M-Instruct) then serves them end
to end under the `openai` client: JSON schemas, json_object, regex and choice (both field
spellings, both endpoints), tool_choice required / named / auto, reasoning, and the mistakes
that must be 400s. SmolLM2 knows no tool-call or thinking format, so the `auto` and reasoning
tests make it write one (hermes `<tool_call>` blocks, qwen3 `<think>`) with a regex constraint:
the parsers then read real generated text, streamed as the engine produced it.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest

pytest.register_assert_rewrite("server_utils")
from server_utils import ServerProcess, sse_chunks  # noqa: E402

from jaxserve.entrypoints.openai.chat_output import ChoiceOutput, finish_reason  # noqa: E402
from jaxserve.entrypoints.openai.serving import RequestError  # noqa: E402
from jaxserve.entrypoints.openai.tool_calls import (  # noqa: E402
    RequiredCalls,
    ToolPlan,
    plan_tools,
    template_tool_calls,
)
from jaxserve.entrypoints.openai.tool_parsers import ToolParserManager  # noqa: E402
from jaxserve.reasoning import ReasoningParserManager  # noqa: E402

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
    "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- the parsing layer on recorded text ---------------------------------------------------------
def _streamed(parser: ChoiceOutput, text: str, cuts: list[int]) -> dict:
    """Feeds `text` cut at `cuts`, then finishes; the deltas reassembled into one message."""
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    return _assemble([d.model_dump() for d in deltas])


def _assemble(deltas: list[dict]) -> dict:
    """Stream deltas -> {content, reasoning, calls}, checking OpenAI's tool-call delta shape."""
    content, reasoning, calls = "", "", {}
    for d in deltas:
        content += d.get("content") or ""
        reasoning += d.get("reasoning_content") or ""
        assert d.get("reasoning") == d.get("reasoning_content")
        for tc in d.get("tool_calls") or []:
            assert "index" in tc
            if tc["index"] not in calls:  # the first delta of a call: id, type, name
                assert tc["id"].startswith("call_") and tc["type"] == "function", tc
                assert tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return {"content": content or None, "reasoning": reasoning or None,
            "calls": [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]}


def _whole(parser: ChoiceOutput, text: str) -> dict:
    m = parser.whole(text)
    return {"content": m.content, "reasoning": m.reasoning,
            "calls": [(c["function"]["name"], c["function"]["arguments"])
                      for c in m.tool_calls or []]}


HERMES = ('<think>\nLet me check the weather.\n</think>\n\nI will look it up.\n<tool_call>\n'
          '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
          '</tool_call>')
REQUIRED = ('[{"name": "get_weather", "parameters": {"city": "Zürich", "unit": "celsius"}}, '
            '{"name":"get_time","parameters":{"zone":"CET"}}]')


def _plans():
    hermes = ToolParserManager.get("hermes")
    return {
        "auto+reasoning": (ToolPlan("auto", [WEATHER, TIME], parser=hermes), "qwen3", HERMES,
                           {"content": "I will look it up.\n", "reasoning":
                            "Let me check the weather.",
                            "calls": [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                                      ("get_time", '{"zone": "CET"}')]}),
        "auto, parallel_tool_calls=false": (
            ToolPlan("auto", [WEATHER, TIME], parser=hermes, parallel=False), None,
            HERMES.split("</think>\n\n")[1],
            {"content": "I will look it up.\n", "reasoning": None,
             "calls": [("get_weather", '{"city": "Paris", "unit": "celsius"}')]}),
        "auto, no call": (ToolPlan("auto", [WEATHER], parser=hermes), None, "Sunny, 20 C.",
                          {"content": "Sunny, 20 C.", "reasoning": None, "calls": []}),
        "required": (ToolPlan("required", [WEATHER, TIME]), None, REQUIRED,
                     {"content": None, "reasoning": None,
                      "calls": [("get_weather", '{"city": "Zürich", "unit": "celsius"}'),
                                ("get_time", '{"zone": "CET"}')]}),
        "named": (ToolPlan("named", [WEATHER], name="get_weather"), None,
                  '{"city":"Paris","unit":"celsius"}',
                  {"content": None, "reasoning": None,
                   "calls": [("get_weather", '{"city":"Paris","unit":"celsius"}')]}),
        "reasoning only": (ToolPlan(), "qwen3", "<think>Hmm.</think>\n\nYes.",
                           {"content": "Yes.", "reasoning": "Hmm.", "calls": []}),
        "reasoning cut short": (ToolPlan(), "deepseek_r1", "I think that",
                                {"content": None, "reasoning": "I think that", "calls": []}),
    }


@pytest.mark.parametrize("case", list(_plans()), ids=str)
def test_choice_output_whole_and_streamed_agree(case):
    plan, reasoning, text, expected = _plans()[case]

    def make():
        r = ReasoningParserManager.get(reasoning)(None) if reasoning else None
        return ChoiceOutput(plan, r, None)

    assert _whole(make(), text) == expected
    for step in (1, 2, 3, 7):  # every cut of these sizes
        assert _streamed(make(), text, list(range(step, len(text), step))) == expected, step


def test_required_calls_wait_for_complete_elements():
    reader = RequiredCalls()
    assert reader.feed('[{"name": "get_time", "parameters": {"zone": "C') == []
    calls = reader.feed('ET"}} , {"name"')
    assert [(c.name, c.arguments) for c in calls] == [("get_time", '{"zone": "CET"}')]
    assert reader.feed(': "x", "parameters": {}}]') [0].arguments == "{}"
    assert reader.closed and reader.num_calls == 2


def test_finish_reason_for_tool_calls():
    assert finish_reason("stop", ToolPlan("required"), True) == "tool_calls"
    assert finish_reason("stop", ToolPlan("auto"), True) == "tool_calls"
    assert finish_reason("stop", ToolPlan("auto"), False) == "stop"
    assert finish_reason("stop", ToolPlan("named"), True) == "stop"  # as OpenAI's forced call
    assert finish_reason("length", ToolPlan("required"), True) == "length"


class _Req:
    def __init__(self, tools=None, tool_choice=None, parallel_tool_calls=None):
        self.tools, self.tool_choice = tools, tool_choice
        self.parallel_tool_calls = parallel_tool_calls


def test_plan_tools_modes_and_refusals():
    assert plan_tools(_Req(), auto_enabled=False, parser_name=None).mode == "none"
    assert plan_tools(_Req([WEATHER], "none"), auto_enabled=False, parser_name=None).mode == "none"
    with pytest.raises(RequestError, match='"auto" tool choice requires --enable-auto-tool-choice '
                                           "and --tool-call-parser"):
        plan_tools(_Req([WEATHER]), auto_enabled=False, parser_name=None)  # auto by default
    auto = plan_tools(_Req([WEATHER]), auto_enabled=True, parser_name="hermes")
    assert auto.mode == "auto" and auto.parser is ToolParserManager.get("hermes")
    one = plan_tools(_Req([WEATHER, TIME], "required", False), auto_enabled=False,
                     parser_name=None)
    assert one.constraint is not None and one.constraint.json["maxItems"] == 1
    named = plan_tools(_Req([WEATHER, TIME], {"type": "function",
                                              "function": {"name": "get_time"}}),
                       auto_enabled=False, parser_name=None)
    assert (named.mode, named.name) == ("named", "get_time")
    assert named.constraint.json == TIME["function"]["parameters"]


def test_history_tool_call_arguments_reach_templates_as_objects():
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "f", "arguments": "[1"}}]
    out = template_tool_calls(calls)
    assert out[0]["function"]["arguments"] == {"city": "Paris"}
    assert out[1]["function"]["arguments"] == "[1"  # not an object: left as given
    assert calls[0]["function"]["arguments"] == '{"city": "Paris"}'  # the request is untouched


# ---- the default model behind `jaxserve serve` ---------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from jaxserve.models.source import resolve_model

    try:
        path = resolve_model(None).path
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")
    log = str(tmp_path_factory.mktemp("structured-server") / "server.log")
    proc = ServerProcess(path, log, max_model_len=512, max_num_batched_tokens=128,
                         max_num_seqs=4, enable_auto_tool_choice=True,
                         tool_call_parser="hermes", reasoning_parser="qwen3",
                         guided_decoding_disable_any_whitespace=True,
                         trust_request_chat_template=True)  # for the tool-history template
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def chat(client, model, **kw):
    kw.setdefault("messages", ASK)
    return client.chat.completions.create(model=model, temperature=0, max_tokens=80, **kw)


SCHEMAS = {
    "nested object with enum": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "home": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "country": {"enum": ["France", "Spain", "Italy"]}},
            "required": ["city", "country"], "additionalProperties": False}},
        "required": ["name", "home"], "additionalProperties": False},
    "array of strings": {"type": "object", "properties": {
        "colours": {"type": "array", "items": {"type": "string", "maxLength": 8},
                    "minItems": 2, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False},
    "bounded numbers": {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "height": {"type": "number", "minimum": 1.2, "maximum": 2.2},
        "member": {"type": "boolean"}},
        "required": ["age", "height", "member"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_validates(client, model, name):
    schema = SCHEMAS[name]
    r = chat(client, model, messages=[{"role": "user", "content": "Describe a person."}],
             response_format={"type": "json_schema",
                              "json_schema": {"name": "answer", "schema": schema,
                                              "strict": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_completions_schema(client, model):
    r = chat(client, model, response_format={"type": "json_object"},
             messages=[{"role": "user", "content": 'Reply with the JSON {"ok": true}'}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = SCHEMAS["bounded numbers"]
    c = client.completions.create(model=model, prompt="A person as JSON:", max_tokens=60,
                                  temperature=0, extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(c.choices[0].text), schema)


@pytest.mark.parametrize("fields", [
    {"guided_regex": r"\d{3}-\d{4}"}, {"structured_outputs": {"regex": r"\d{3}-\d{4}"}}],
    ids=["guided_regex", "structured_outputs.regex"])
def test_regex_output_matches(client, model, fields):
    r = chat(client, model, extra_body=fields,
             messages=[{"role": "user", "content": "Give me a phone number."}])
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].message.content)
    c = client.completions.create(model=model, prompt="Call me at", max_tokens=20,
                                  temperature=0, extra_body=fields)
    assert re.fullmatch(r"\d{3}-\d{4}", c.choices[0].text)


@pytest.mark.parametrize("fields", [
    {"guided_choice": ["sunny", "rainy", "snowy"]},
    {"structured_outputs": {"choice": ["sunny", "rainy", "snowy"]}}],
    ids=["guided_choice", "structured_outputs.choice"])
def test_choice_output_is_one_of_them(client, model, fields):
    r = chat(client, model, extra_body=fields, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert text in ("sunny", "rainy", "snowy")


def _stream_message(http, body: dict) -> tuple[dict, list[str | None]]:
    """A streamed chat's deltas reassembled (checking the tool-call delta shape) and the
    finish_reasons seen."""
    r = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    return _assemble(deltas), [x for x in reasons if x is not None]


def _body(**kw) -> dict:
    return {"messages": ASK, "temperature": 0, "max_tokens": 80, **kw}


@pytest.mark.parametrize("parallel", [None, False], ids=["parallel", "parallel_tool_calls=false"])
def test_required_tool_calls_validate_whole_and_streamed(client, model, http, parallel):
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    r = chat(client, model, tools=[WEATHER, TIME], tool_choice="required", **extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and (parallel is None or len(calls) == 1)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id) and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    streamed, reasons = _stream_message(http, _body(tools=[WEATHER, TIME],
                                                    tool_choice="required", **extra))
    assert streamed["calls"] == [(c.function.name, c.function.arguments) for c in calls]
    assert streamed["content"] is None and reasons == ["tool_calls"]


def test_named_tool_choice(client, model, http):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, model, tools=[WEATHER, TIME], tool_choice=choice)
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.content is None
    [call] = c.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed, reasons = _stream_message(http, _body(tools=[WEATHER, TIME], tool_choice=choice))
    assert streamed["calls"] == [("get_weather", call.function.arguments)]
    assert reasons == ["stop"]


HERMES_REGEX = (r'I will check\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": '
                r'"[A-Z][a-z]{2,10}", "unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


def test_auto_tool_choice_parses_hermes_calls(client, model, http):
    """tool_choice auto (the default with tools) and --tool-call-parser hermes: the model is made
    to write a hermes block by a regex; the parser turns it into a call."""
    r = chat(client, model, tools=[WEATHER], extra_body={"guided_regex": HERMES_REGEX})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "I will check.\n"
    [call] = c.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed, reasons = _stream_message(http, _body(tools=[WEATHER], tool_choice="auto",
                                                    guided_regex=HERMES_REGEX))
    assert streamed == {"content": "I will check.\n", "reasoning": None,
                        "calls": [("get_weather", call.function.arguments)]}
    assert reasons == ["tool_calls"]


def test_reasoning_parser_splits_reasoning_from_content(client, model, http):
    regex = r"<think>\n[a-z ]{5,30}\n</think>\n\n(Yes|No)\."
    r = chat(client, model, extra_body={"guided_regex": regex})
    msg = r.choices[0].message
    whole = {"content": msg.content, "reasoning": msg.reasoning_content}
    assert whole["content"] in ("Yes.", "No.") and re.fullmatch(r"[a-z ]+", whole["reasoning"])
    streamed, reasons = _stream_message(http, _body(guided_regex=regex))
    assert streamed == {**whole, "calls": []} and reasons == ["stop"]
    # enable_thinking=False reaches the parser: all of it is content.
    r = chat(client, model, extra_body={"guided_regex": regex,
                                        "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content.startswith("<think>")


def test_tool_history_reaches_the_template(http):
    template = ("{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{% for k, v in "
                "m.tool_calls[0].function.arguments.items() %}{{ k }}={{ v }}{% endfor %}"
                "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = http.post("/tokenize", json={"messages": messages, "chat_template": template,
                                     "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    text = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "assistant:city=Paris" in text and "tool:sunny" in text
    r = http.post("/v1/chat/completions", json=_body(messages=messages, max_tokens=2))
    assert r.status_code == 200, r.text


def _bad(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


BAD = {
    "schema of a bad type": _body(response_format=_bad({"type": "strin"})),
    "json_schema without schema": _body(response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x"}}),
    "bad guided_json": _body(guided_json={"type": "object", "properties": 5}),
    "regex that does not compile": _body(guided_regex="(["),
    "regex llguidance rejects": _body(guided_regex="(?=abc)abc"),
    "grammar llguidance rejects": _body(guided_grammar="start: undefined_rule"),
    "empty choice": _body(structured_outputs={"choice": []}),
    "unknown structured_outputs key": _body(structured_outputs={"regexp": "a"}),
    "two constraints": _body(guided_regex="a", response_format={"type": "json_object"}),
    "guided_decoding_backend xgrammar": _body(guided_choice=["a"],
                                              guided_decoding_backend="xgrammar"),
    "unknown tool in tool_choice": _body(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}}),
    "tools not a list": _body(tools={"type": "function"}, tool_choice="required"),
    "tool without a name": _body(tools=[{"type": "function", "function": {}}]),
    "tool with a bad schema": _body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": 7}}}], tool_choice="required"),
    "required without tools": _body(tool_choice="required"),
    "required with empty tools": _body(tools=[], tool_choice="required"),
    "tool_choice of a bad value": _body(tools=[WEATHER], tool_choice="always"),
    "tool constraint and response_format": _body(tools=[WEATHER], tool_choice="required",
                                                 response_format={"type": "json_object"}),
}


@pytest.mark.parametrize("body", BAD.values(), ids=BAD.keys())
def test_malformed_requests_are_400(http, body):
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert r.status_code == 400, (stream, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


def test_completions_constraint_errors_are_400(http):
    for fields in ({"guided_regex": "(?=a)a"}, {"response_format": _bad({"type": 3})},
                   {"guided_choice": ["a"], "guided_regex": "b"}):
        r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, **fields})
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"error"}


def test_bad_grammar_does_not_disturb_a_concurrent_request(http):
    good = _body(messages=[{"role": "user", "content": "Give me a phone number."}],
                 guided_regex=r"\d{3}-\d{4}")
    result = {}

    def run_good():
        result["r"] = http.post("/v1/chat/completions", json={**good, "stream": True})

    thread = threading.Thread(target=run_good)
    thread.start()
    statuses = [http.post("/v1/chat/completions", json=_body(
        guided_grammar=f"start: rule{i}")).status_code for i in range(4)]
    thread.join(timeout=120)
    assert statuses == [400] * 4
    r = result["r"]
    assert r.status_code == 200
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in sse_chunks(r) if c["choices"])
    assert re.fullmatch(r"\d{3}-\d{4}", text)
