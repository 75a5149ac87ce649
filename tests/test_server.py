"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP.

One `jaxserve serve` subprocess serves most tests; frontend flags are tried on in-process apps that
share one engine; SIGTERM gets its own small subprocess. The model is a tiny random Llama with the
default model's tokenizer, so its text is gibberish but deterministic at temperature 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import signal
import ssl
import sys
import threading
import time
import uuid

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_utils")
from server_utils import SERVED_NAME, SERVER_ENGINE, ServerProcess, metric, sse_chunks  # noqa: E402

# The fixtures: server_model_dir, inprocess_engine, serve_app.
pytest_plugins = ["server_utils"]

MAX_LOGPROBS = 5
PROMPT = "The quick brown fox jumps over the lazy dog because"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="session")
def server(server_model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("server-log") / "server.log")
    proc = ServerProcess(server_model_dir, log, served_model_name=[SERVED_NAME],
                         max_logprobs=MAX_LOGPROBS, **SERVER_ENGINE)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0,
                         timeout=60)


def post_ok(http: httpx.Client, path: str, body: dict) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, path: str, body: dict) -> list[dict]:
    r = http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_chunks(r)


def assert_error(r: httpx.Response, status: int) -> dict:
    """The response is an OpenAI-shaped error with this status; returns the error object."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    return err


def collect(chunks: list[dict], key: str = "text") -> dict[int, dict]:
    """Per choice index: the joined text (or delta content), finish reasons and chunk count."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            st = out.setdefault(c["index"], {"text": "", "finish": [], "n": 0})
            piece = c[key] if key == "text" else (c["delta"].get("content") or "")
            assert not st["finish"], f"choice {c['index']} got a chunk after its finish_reason"
            st["text"] += piece
            st["n"] += 1
            if c["finish_reason"] is not None:
                st["finish"].append(c["finish_reason"])
    return out


# ---- endpoints --------------------------------------------------------------------------------
def test_models(http, client):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [SERVED_NAME]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["max_model_len"] == SERVER_ENGINE["max_model_len"]
    assert [m.id for m in client.models.list()] == [SERVED_NAME]
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME
    err = assert_error(http.get("/v1/models/no-such-model"), 404)
    assert "no-such-model" in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_and_chat_with_the_openai_client(client, default_tokenizer):
    tok = default_tokenizer
    r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=7, temperature=0)
    assert r.object == "text_completion" and r.model == SERVED_NAME
    assert r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok(PROMPT).input_ids)
    assert 1 <= r.usage.completion_tokens <= 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    c = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=7,
                                       temperature=0)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    assert c.choices[0].message.role == "assistant" and c.choices[0].message.content
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert c.usage.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
    # max_completion_tokens is the newer name of max_tokens.
    c2 = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, temperature=0,
                                        max_completion_tokens=7)
    assert c2.choices[0].message.content == c.choices[0].message.content


def test_tokenize_and_detokenize(http, default_tokenizer):
    tok = default_tokenizer
    ids = tok(PROMPT).input_ids
    body = post_ok(http, "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == SERVER_ENGINE["max_model_len"]
    assert body["token_strs"] == tok.convert_ids_to_tokens(ids)
    assert post_ok(http, "/tokenize", {"prompt": PROMPT}).get("token_strs") is None

    body = post_ok(http, "/tokenize", {"model": SERVED_NAME, "messages": MESSAGES})
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tok(text, add_special_tokens=False).input_ids
    no_prompt = post_ok(http, "/tokenize", {"messages": MESSAGES,
                                            "add_generation_prompt": False})
    assert no_prompt["count"] < body["count"]

    assert post_ok(http, "/detokenize", {"tokens": ids})["prompt"] == PROMPT
    assert_error(http.post("/detokenize", json={"tokens": [len(tok) + 5]}), 400)
    assert_error(http.post("/tokenize", json={"prompt": PROMPT, "model": "nope"}), 404)


def test_health_ping_version(http):
    from jaxserve import __version__

    assert http.get("/health").status_code == 200
    assert http.get("/ping").status_code == 200
    assert http.post("/ping").status_code == 200
    assert http.get("/version").json() == {"version": __version__}


def test_load_counts_requests_in_flight(http):
    assert http.get("/load").json() == {"server_load": 0}
    long = {"prompt": PROMPT, "max_tokens": 80, "n": 4, "temperature": 1.0, "ignore_eos": True}
    answered, seen = threading.Event(), []

    def send():
        with httpx.Client(base_url=str(http.base_url), timeout=60) as other:
            other.post("/v1/completions", json=long).read()
        answered.set()

    sender = threading.Thread(target=send)
    sender.start()
    while not answered.is_set():
        seen.append(http.get("/load").json()["server_load"])
    sender.join()
    assert max(seen) >= 1

    # A stream counts until it ends: hold one open after its first event and ask.
    with httpx.Client(base_url=str(http.base_url), timeout=60) as other:
        with other.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            next(lines)
            during = http.get("/load").json()["server_load"]
            rest = list(lines)
    assert "data: [DONE]" in rest
    assert during >= 1, "a streaming request is not counted by /load while it streams"
    assert http.get("/load").json() == {"server_load": 0}


def test_openapi_schema(http):
    schema = http.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize"):
        assert path in schema["paths"], path


def test_metrics_move(http, client):
    before = http.get("/metrics").text
    assert "# TYPE vllm:prompt_tokens_total counter" in before
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hit_rate",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        metric(before, name)
    prompt = f"{uuid.uuid4().hex} metrics"  # unseen, so no prefix-cache hits
    r = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    after = http.get("/metrics").text

    def moved(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert moved("vllm:generation_tokens_total") == r.usage.completion_tokens == 6
    assert moved("vllm:request_success_total") == 1
    assert metric(after, "vllm:request_success_total", finished_reason="length") >= 1
    assert moved("vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:inter_token_latency_seconds_count") == 5
    assert metric(after, "vllm:num_requests_running") == 0


# ---- streaming -----------------------------------------------------------------------------------
def test_completion_stream_equals_non_stream(http, client):
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    full = post_ok(http, "/v1/completions", body)
    chunks = stream(http, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == SERVED_NAME for c in chunks)
    *content, last = chunks
    assert last["choices"] == [] and last["usage"] == full["usage"]
    assert all(c.get("usage") is None for c in content)
    got = collect(content)
    assert list(got) == [0] and got[0]["n"] > 1
    assert got[0]["text"] == full["choices"][0]["text"]
    assert got[0]["finish"] == [full["choices"][0]["finish_reason"]]

    # Without include_usage there is no usage chunk; the openai client sees the same text.
    plain = stream(http, "/v1/completions", body)
    assert all(c["choices"] for c in plain)
    parts = client.completions.create(**body, stream=True)
    assert "".join(p.choices[0].text for p in parts if p.choices) == full["choices"][0]["text"]


def test_chat_stream_equals_non_stream(http, client):
    body = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    full = post_ok(http, "/v1/chat/completions", body)
    chunks = stream(http, "/v1/chat/completions",
                    {**body, "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": ""} and first["finish_reason"] is None
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    *content, last = chunks
    assert last["choices"] == [] and last["usage"] == full["usage"]
    got = collect(content, key="delta")
    assert got[0]["text"] == full["choices"][0]["message"]["content"]
    assert got[0]["finish"] == [full["choices"][0]["finish_reason"]]

    parts = list(client.chat.completions.create(**body, stream=True,
                                                stream_options={"include_usage": True}))
    assert parts[-1].choices == [] and parts[-1].usage.total_tokens == full["usage"]["total_tokens"]
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == full["choices"][0]["message"]["content"]


def test_stream_options_without_stream_is_400(http, client):
    opts = {"stream_options": {"include_usage": True}}
    assert_error(http.post("/v1/completions", json={"prompt": PROMPT, **opts}), 400)
    assert_error(http.post("/v1/chat/completions", json={"messages": MESSAGES, **opts}), 400)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, stream=False,
                                  stream_options={"include_usage": True})


def test_n3_streamed_and_not(http):
    body = {"model": SERVED_NAME, "prompt": PROMPT, "max_tokens": 12, "n": 3,
            "temperature": 0.8, "seed": 1234}
    full = post_ok(http, "/v1/completions", body)
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in full["choices"]]
    assert len(set(texts)) > 1, "n=3 at temperature 0.8 gave three equal samples"
    assert [c["text"] for c in post_ok(http, "/v1/completions", body)["choices"]] == texts
    assert full["usage"]["completion_tokens"] <= 36

    chunks = stream(http, "/v1/completions", body)
    assert all(len(c["choices"]) >= 1 and all("index" in x for x in c["choices"]) for c in chunks)
    got = collect(chunks)
    assert sorted(got) == [0, 1, 2]
    assert [got[i]["text"] for i in range(3)] == texts
    assert all(len(got[i]["finish"]) == 1 for i in range(3))

    chat = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 12, "n": 3,
            "temperature": 0.8, "seed": 99}
    full = post_ok(http, "/v1/chat/completions", chat)
    texts = [c["message"]["content"] for c in full["choices"]]
    chunks = stream(http, "/v1/chat/completions", chat)
    firsts = {}
    for c in chunks:
        for x in c["choices"]:
            firsts.setdefault(x["index"], x["delta"])
    assert firsts == {i: {"role": "assistant", "content": ""} for i in range(3)}
    # The three role chunks lead, in index order; content follows.
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in chunks[:3]] == \
        [(i, {"role": "assistant", "content": ""}) for i in range(3)]
    got = collect(chunks, key="delta")
    assert [got[i]["text"] for i in range(3)] == texts
    assert all(len(got[i]["finish"]) == 1 for i in range(3))


def test_batched_prompts(http, default_tokenizer):
    prompts = [PROMPT, "Once upon a time"]
    single = [post_ok(http, "/v1/completions", {"prompt": p, "max_tokens": 8,
                                                "temperature": 0})["choices"][0]["text"]
              for p in prompts]
    ids = [default_tokenizer(p).input_ids for p in prompts]
    for prompt in (prompts, ids):
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "n": 2}
        full = post_ok(http, "/v1/completions", body)
        assert [c["index"] for c in full["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in full["choices"]] == [single[0]] * 2 + [single[1]] * 2
        assert full["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])
        got = collect(stream(http, "/v1/completions", body))
        assert [got[i]["text"] for i in range(4)] == [single[0]] * 2 + [single[1]] * 2
        assert all(len(got[i]["finish"]) == 1 for i in range(4))


# ---- logprobs ------------------------------------------------------------------------------------
def test_completion_logprobs(http):
    k = 3
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": k}
    full = post_ok(http, "/v1/completions", body)
    choice = full["choices"][0]
    lp = choice["logprobs"]
    n = full["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert len(lp["text_offset"]) == n and lp["text_offset"][0] == 0
    for i, (tok, logprob, top) in enumerate(zip(lp["tokens"], lp["token_logprobs"],
                                                lp["top_logprobs"])):
        assert logprob <= 0
        assert k <= len(top) <= k + 1 and top[tok] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()), abs=1e-5), "greedy is not the top"
        if i + 1 < n:
            assert lp["text_offset"][i + 1] == lp["text_offset"][i] + len(tok)
    if not any("\ufffd" in t for t in lp["tokens"]):
        assert "".join(lp["tokens"]) == choice["text"]

    chunks = stream(http, "/v1/completions", body)
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        for x in c["choices"]:
            for key in streamed:
                streamed[key] += (x["logprobs"] or {}).get(key, [])
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    assert streamed["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-5)

    echo = post_ok(http, "/v1/completions", {**body, "echo": True, "logprobs": 2})
    c = echo["choices"][0]
    assert c["text"] == PROMPT + choice["text"]
    elp = c["logprobs"]
    prompt_len = full["usage"]["prompt_tokens"]
    assert len(elp["tokens"]) == prompt_len + n
    assert elp["token_logprobs"][0] is None and elp["top_logprobs"][0] is None
    assert all(v is not None for v in elp["token_logprobs"][1:])
    assert elp["text_offset"][0] == 0
    assert all(b >= a for a, b in zip(elp["text_offset"], elp["text_offset"][1:]))
    assert elp["text_offset"][prompt_len] == len(PROMPT)
    assert all(len(t) <= 3 for t in elp["top_logprobs"][1:])


def test_chat_logprobs(http, client):
    body = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}
    full = post_ok(http, "/v1/chat/completions", body)
    content = full["choices"][0]["logprobs"]["content"]
    assert len(content) == full["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) >= {"token", "logprob", "bytes", "top_logprobs"}
        if "\ufffd" not in entry["token"]:
            assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        top = entry["top_logprobs"]
        assert len(top) == 3
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert top[0]["token"] == entry["token"]  # greedy
        assert top[0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-5)
        assert all(t["bytes"] == list(t["token"].encode("utf-8")) for t in top
                   if "\ufffd" not in t["token"])
    # The tokens' bytes, joined, are the message: also across a character split between tokens.
    joined = bytes(b for e in content for b in e["bytes"])
    assert joined.decode("utf-8", errors="replace") == full["choices"][0]["message"]["content"]

    chunks = stream(http, "/v1/chat/completions", body)
    streamed = [e for c in chunks for x in c["choices"] for e in
                ((x.get("logprobs") or {}).get("content") or [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]

    r = client.chat.completions.create(**{**body, "top_logprobs": 0})
    assert [e.token for e in r.choices[0].logprobs.content] == [e["token"] for e in content]
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)
    plain = post_ok(http, "/v1/chat/completions", {**body, "logprobs": False,
                                                    "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


# ---- stop strings -------------------------------------------------------------------------------
def _stop_across_tokens(tokens: list[str], text: str) -> str:
    """A string made of the end of one token and the start of the next, seen once in `text`."""
    for a, b in zip(tokens[1:], tokens[2:]):
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in a + b:
            stop = a[-2:] + b[:2]
            if text.count(stop) == 1:
                return stop
    pytest.fail(f"no stop string spanning two tokens in {tokens}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(http, include):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    greedy = post_ok(http, "/v1/completions", {**body, "logprobs": 0})["choices"][0]
    text = greedy["text"]
    stop = _stop_across_tokens(greedy["logprobs"]["tokens"], text)
    cut = text.index(stop) + (len(stop) if include else 0)
    expected = text[:cut]
    body = {**body, "stop": [stop], "include_stop_str_in_output": include}
    full = post_ok(http, "/v1/completions", body)["choices"][0]
    assert (full["text"], full["finish_reason"]) == (expected, "stop")
    assert full.get("stop_reason") == stop
    got = collect(stream(http, "/v1/completions", body))[0]
    assert (got["text"], got["finish"]) == (expected, ["stop"])

    chat = {"messages": MESSAGES, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "logprobs": True}
    greedy = post_ok(http, "/v1/chat/completions", chat)["choices"][0]
    text = greedy["message"]["content"]
    stop = _stop_across_tokens([e["token"] for e in greedy["logprobs"]["content"]], text)
    expected = text[:text.index(stop) + (len(stop) if include else 0)]
    chat = {**chat, "stop": stop, "include_stop_str_in_output": include}
    got = collect(stream(http, "/v1/chat/completions", chat), key="delta")[0]
    assert (got["text"], got["finish"]) == (expected, ["stop"])
    full = post_ok(http, "/v1/chat/completions", chat)["choices"][0]
    assert (full["message"]["content"], full["finish_reason"]) == (expected, "stop")


# ---- errors -------------------------------------------------------------------------------------
_TOO_LONG = " ".join(["word"] * 200)

BAD_COMPLETIONS = {
    "prompt plus max_tokens beyond the context": {"prompt": PROMPT, "max_tokens": 200},
    "prompt alone beyond the context": {"prompt": _TOO_LONG, "max_tokens": 1},
    "logprobs above --max-logprobs": {"prompt": PROMPT, "logprobs": MAX_LOGPROBS + 1},
    "temperature -1": {"prompt": PROMPT, "temperature": -1},
    "top_p 2": {"prompt": PROMPT, "top_p": 2},
    "top_k -5": {"prompt": PROMPT, "top_k": -5},
    "n 0": {"prompt": PROMPT, "n": 0},
    "max_tokens -1": {"prompt": PROMPT, "max_tokens": -1},
    "token id beyond the vocabulary": {"prompt": [1, 2, 10**9]},
    "negative token id": {"prompt": [5, -1]},
    "batched token id beyond the vocabulary": {"prompt": [[5, 6], [7, 10**6]]},
    "empty prompt": {"prompt": ""},
    "empty token list": {"prompt": []},
    "empty batch": {"prompt": [[]]},
    "prompt of the wrong type": {"prompt": 5},
    "seed above int64": {"prompt": PROMPT, "seed": 2**63},
    "seed below int64": {"prompt": PROMPT, "seed": -(2**63) - 1},
    "stop token id outside the vocabulary": {"prompt": PROMPT, "stop_token_ids": [10**9]},
    "streamed, prompt plus max_tokens beyond the context": {"prompt": PROMPT, "max_tokens": 200,
                                                          "stream": True},
}

BAD_CHATS = {
    "no messages": {"messages": []},
    "functions (not supported)": {"messages": MESSAGES, "functions": [{"name": "f"}]},
    "audio output (not supported)": {"messages": MESSAGES, "modalities": ["text", "audio"],
                                     "audio": {"voice": "alloy", "format": "wav"}},
    "message without a role": {"messages": [{"content": "hi"}]},
    "message with an unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content of the wrong type": {"messages": [{"role": "user", "content": 5}]},
    "user message without content": {"messages": [{"role": "user"}]},
    "messages not a list": {"messages": "hello"},
    "top_logprobs above --max-logprobs": {"messages": MESSAGES, "logprobs": True,
                                          "top_logprobs": MAX_LOGPROBS + 1},
    "max_tokens beyond the context": {"messages": MESSAGES, "max_tokens": 500},
    "seed above int64": {"messages": MESSAGES, "seed": 2**64},
    "temperature -1": {"messages": MESSAGES, "temperature": -1},
    "streamed, temperature -1": {"messages": MESSAGES, "temperature": -1, "stream": True},
}


@pytest.mark.parametrize("body", BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_completion_is_400(http, body):
    assert_error(http.post("/v1/completions", json=body), 400)


@pytest.mark.parametrize("body", BAD_CHATS.values(), ids=BAD_CHATS.keys())
def test_bad_chat_is_400(http, body):
    assert_error(http.post("/v1/chat/completions", json=body), 400)


def test_other_error_statuses(http, client):
    assert_error(http.post("/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"}), 400)
    assert_error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
    for path, body in (("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        err = assert_error(http.post(path, json={**body, "model": "no-such-model"}), 404)
        assert "no-such-model" in err["message"]
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.delete("/v1/chat/completions"), 405)
    assert_error(http.get("/no/such/path"), 404)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED_NAME, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=500)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)


def test_server_survives_the_errors(http, client):
    """Runs after the error tests: the engine still answers, and nothing was left running."""
    assert http.get("/health").status_code == 200
    r = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens >= 1
    text = http.get("/metrics").text
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:num_requests_waiting") == 0


def test_no_request_id_header_by_default(http):
    assert "x-request-id" not in http.get("/v1/models").headers


def test_cors_preflight_default_allows_any_origin(http):
    r = http.options("/v1/chat/completions", headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "https://example.com")
    assert "POST" in r.headers["access-control-allow-methods"]


# ---- clients that give up -----------------------------------------------------------------------
async def _dropped_requests(base_url: str, count: int) -> dict[str, int]:
    """`count` long requests (completions and chat, ignoring EOS), three in four streamed, whose
    clients leave without waiting for the answer. No clock decides when: a streamed request's
    client leaves at its first chunk (the request is in the engine then, with most of its tokens
    still to make), the others' once every streamed client has left (they are in the engine or
    queued for it by then). Returns how many were dropped, answered, or refused."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    streams_left = sum(1 for i in range(count) if i % 4)
    streams_gone = asyncio.Event()

    def stream_done() -> None:
        nonlocal streams_left
        streams_left -= 1
        if streams_left == 0:
            streams_gone.set()

    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as c:

        async def one(i: int) -> str:
            stream = i % 4 != 0
            if i % 3:
                path, body = "/v1/completions", {"prompt": f"{i} {PROMPT}", "max_tokens": 80}
            else:
                path = "/v1/chat/completions"
                body = {"messages": [{"role": "user", "content": f"{i} {PROMPT}"}],
                        "max_tokens": 50}
            body.update(ignore_eos=True, stream=stream)
            try:
                async with c.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        return f"status {r.status_code}"
                    if stream:
                        async for chunk in r.aiter_text():
                            if chunk:  # leaving the block closes the connection
                                return "answered" if "[DONE]" in chunk else "dropped"
                        return "answered"
                    read = asyncio.ensure_future(r.aread())
                    gone = asyncio.ensure_future(streams_gone.wait())
                    await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
                    gone.cancel()
                    if read.done():
                        read.result()
                        return "answered"
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await read
                    return "dropped"
            finally:
                if stream:
                    stream_done()

        outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    return {o: outcomes.count(o) for o in set(outcomes)}


def test_dropped_requests_free_the_engine(server, http):
    aborted_before = metric(http.get("/metrics").text, "vllm:request_success_total",
                            finished_reason="abort")
    outcomes = asyncio.run(_dropped_requests(server.base_url, 200))
    print(f"dropped requests: {outcomes}")
    dropped = outcomes.get("dropped", 0)
    assert set(outcomes) <= {"dropped", "answered"}, outcomes
    # Every streamed client (150) leaves at its first chunk, with tokens still to come.
    assert dropped >= 100, f"only {outcomes} of 200 requests were dropped; the test needs more"
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
                  timeout=10)  # the server answers at once after the drops
    assert r.status_code == 200
    deadline = time.monotonic() + 30  # a bound on waiting, not a measurement
    while True:
        text = http.get("/metrics").text
        state = {name: metric(text, f"vllm:{name}") for name in
                 ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}
        if not any(state.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert state == {"num_requests_running": 0, "num_requests_waiting": 0,
                     "kv_cache_usage_perc": 0}
    aborted = metric(text, "vllm:request_success_total", finished_reason="abort") - aborted_before
    assert aborted >= dropped // 2
    assert http.get("/load").json() == {"server_load": 0}


# ---- frontend flags, on in-process apps ---------------------------------------------------------
def test_api_key(serve_app, monkeypatch):
    with serve_app(api_key="sekret") as app:
        url = app.base_url
        assert_error(httpx.get(url + "/v1/models"), 401)
        assert_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}),
                     401)
        assert_error(httpx.post(url + "/v1/completions", json={"prompt": PROMPT}), 401)
        ok = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200
        preflight = httpx.options(url + "/v1/completions", headers={
            "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        r = good.completions.create(model=good.models.list().data[0].id, prompt=PROMPT,
                                    max_tokens=3)
        assert r.choices[0].text
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    with serve_app() as app:
        assert_error(httpx.get(app.base_url + "/v1/models"), 401)
        assert httpx.get(app.base_url + "/v1/models",
                         headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_request_id_headers(serve_app):
    with serve_app(enable_request_id_headers=True) as app:
        r = httpx.get(app.base_url + "/v1/models", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        a, b = (httpx.get(app.base_url + "/health").headers.get("x-request-id") for _ in "ab")
        assert a and b and a != b
        body = {"prompt": PROMPT, "max_tokens": 3}
        r = httpx.post(app.base_url + "/v1/completions", json=body,
                       headers={"X-Request-Id": "my-id"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-request-id"] == "my-id"
        assert r.json()["id"] == "cmpl-my-id"
        assert_error(httpx.post(app.base_url + "/v1/completions", json={"prompt": ""},
                                headers={"X-Request-Id": "bad"}), 400)

        async def same_id_twice():
            async with httpx.AsyncClient(base_url=app.base_url, timeout=30) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json=body,
                                                     headers={"X-Request-Id": "dup"})
                                              for _ in range(2)))

        assert [r.status_code for r in asyncio.run(same_id_twice())] == [200, 200]


def test_cors_allowed_origins(serve_app):
    with serve_app(allowed_origins=["https://good.example"], allowed_methods=["GET", "POST"],
                   allowed_headers=["content-type"]) as app:
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(app.base_url + "/v1/completions", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type"})

        ok = preflight("https://good.example")
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://good.example"
        assert "POST" in ok.headers["access-control-allow-methods"]
        bad = preflight("https://evil.example")
        assert bad.status_code == 400
        assert "access-control-allow-origin" not in bad.headers
        simple = httpx.get(app.base_url + "/v1/models", headers={"Origin": "https://good.example"})
        assert simple.headers["access-control-allow-origin"] == "https://good.example"


def test_served_model_names_and_role(serve_app):
    with serve_app(served_model_name=["first", "second"], response_role="bot") as app:
        cl = openai.OpenAI(base_url=app.base_url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in cl.models.list()] == ["first", "second"]
        r = cl.completions.create(model="second", prompt=PROMPT, max_tokens=2)
        assert r.model == "second"
        default = httpx.post(app.base_url + "/v1/completions",
                             json={"prompt": PROMPT, "max_tokens": 2}, timeout=30).json()
        assert default["model"] == "first"
        with pytest.raises(openai.NotFoundError):
            cl.completions.create(model="third", prompt=PROMPT, max_tokens=2)
        c = cl.chat.completions.create(model="first", messages=MESSAGES, max_tokens=2)
        assert c.choices[0].message.role == "bot"
        chunks = list(cl.chat.completions.create(model="first", messages=MESSAGES, max_tokens=2,
                                                 stream=True))
        assert chunks[0].choices[0].delta.role == "bot"


def test_force_include_usage_and_prompt_tokens_details(serve_app):
    with serve_app(enable_force_include_usage=True, enable_prompt_tokens_details=True) as app:
        body = {"prompt": f"{uuid.uuid4().hex} {PROMPT}", "max_tokens": 4, "temperature": 0}
        r = httpx.post(app.base_url + "/v1/completions", json={**body, "stream": True},
                       timeout=30)
        last = sse_chunks(r)[-1]
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
        first = httpx.post(app.base_url + "/v1/completions", json=body, timeout=30).json()
        again = httpx.post(app.base_url + "/v1/completions", json=body, timeout=30).json()
        assert "cached_tokens" in first["usage"]["prompt_tokens_details"]
        # The same prompt again hits the prefix cache (whole 4-token blocks of it).
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 4


def test_tokens_as_token_ids(serve_app):
    with serve_app(return_tokens_as_token_ids=True) as app:
        r = httpx.post(app.base_url + "/v1/completions", timeout=30, json={
            "prompt": PROMPT, "max_tokens": 3, "logprobs": 1, "temperature": 0}).json()
        tokens = r["choices"][0]["logprobs"]["tokens"]
        assert len(tokens) == 3 and all(t.startswith("token_id:") for t in tokens)


def test_disable_fastapi_docs(serve_app):
    with serve_app(disable_fastapi_docs=True) as app:
        assert httpx.get(app.base_url + "/openapi.json").status_code == 404
        assert httpx.get(app.base_url + "/health").status_code == 200


# ---- SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_exits_zero_within_the_shutdown_timeout(server_model_dir, tmp_path):
    """SIGTERM with more work in flight than any machine finishes within the shutdown timeout
    (32 streams of 200 tokens, 8 at a time): the server waits that long, then ends every open
    stream with an error event and [DONE], and exits 0. Held by the work, not by a clock: the
    time bound only catches a server that waits for the work to finish."""
    shutdown_timeout = 2
    proc = ServerProcess(server_model_dir, str(tmp_path / "sigterm.log"),
                         shutdown_timeout=shutdown_timeout,
                         **{**SERVER_ENGINE, "max_model_len": 256})
    try:
        proc.wait_ready()
        first_chunk = threading.Event()
        ended: list[str] = []

        async def streams():
            async with httpx.AsyncClient(base_url=proc.base_url, timeout=60) as c:
                async def one(i):
                    body = {"prompt": f"{i} {PROMPT}", "max_tokens": 200, "ignore_eos": True,
                            "stream": True}
                    cut = False
                    try:
                        async with c.stream("POST", "/v1/completions", json=body) as r:
                            async for line in r.aiter_lines():
                                first_chunk.set()
                                cut = cut or line.startswith('data: {"error"')
                                if line == "data: [DONE]":
                                    ended.append("cut" if cut else "done")
                                    return
                        ended.append("dropped")
                    except httpx.HTTPError:
                        ended.append("dropped")

                await asyncio.gather(*(one(i) for i in range(32)))

        clients = threading.Thread(target=asyncio.run, args=(streams(),))
        clients.start()
        assert first_chunk.wait(60)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rc = proc.proc.wait(timeout=shutdown_timeout + 60)
        took = time.monotonic() - start
        clients.join(timeout=30)
        assert not clients.is_alive(), "a client stream hung after the server stopped"
        assert len(ended) == 32 and "dropped" not in ended, ended
        assert "cut" in ended, "no stream was cut at the shutdown timeout"
        # 32 x 200 tokens, 8 at a time, is 800 steps: far past the timeout plus any teardown
        assert took < shutdown_timeout + 30, f"took {took:.1f} s to stop"
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.base_url + "/health")
        assert rc == 0, f"exit status {rc} after SIGTERM:\n{proc.log(1500)}"
    finally:
        proc.stop()


def test_failure_inside_a_stream(serve_app, inprocess_engine, monkeypatch):
    """An engine failure after the first tokens is one SSE error event (OpenAI's shape), then
    [DONE]; the request is aborted and the server carries on."""
    real_generate = inprocess_engine.generate

    async def failing_generate(*args, **kwargs):
        n = 0
        async for out in real_generate(*args, **kwargs):
            yield out
            n += 1
            if n == 2:
                raise RuntimeError("injected failure")

    with serve_app() as app:
        monkeypatch.setattr(inprocess_engine, "generate", failing_generate)
        body = {"prompt": PROMPT, "max_tokens": 40, "ignore_eos": True, "stream": True}
        for path, extra in (("/v1/completions", {}),
                            ("/v1/chat/completions", {"messages": MESSAGES})):
            req = {**body, **extra}
            if extra:
                del req["prompt"]
            r = httpx.post(app.base_url + path, json=req, timeout=30)
            assert r.status_code == 200
            *chunks, error = sse_chunks(r)
            assert chunks and all("choices" in c for c in chunks)
            assert set(error) == {"error"}
            assert set(error["error"]) == {"message", "type", "param", "code"}
            # the stream ends with an error, and internal exception text stays in the log
            assert "injected failure" not in error["error"]["message"]
            assert "Internal server error" in error["error"]["message"]
        monkeypatch.undo()
        deadline = time.monotonic() + 5
        while inprocess_engine.engine.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not inprocess_engine.engine.requests, "the failed requests were not aborted"
        r = httpx.post(app.base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200


def test_token_bytes_of_a_split_character(default_tokenizer):
    """A byte-level BPE token holding half of an emoji: its bytes, not U+FFFD's."""
    from jaxserve.entrypoints.openai.serving import token_bytes

    text = "smile \U0001F600 and \u65e5\u672c"
    ids = default_tokenizer(text, add_special_tokens=False).input_ids
    pieces = [token_bytes(default_tokenizer, i, default_tokenizer.decode([i])) for i in ids]
    assert any("\ufffd" in default_tokenizer.decode([i]) for i in ids)  # the case under test
    assert bytes(b for p in pieces for b in p).decode("utf-8") == text


def test_middleware_by_import_path(serve_app):
    with serve_app(middleware=["server_utils.TagMiddleware", "server_utils.tag_function"]) as app:
        r = httpx.get(app.base_url + "/v1/models")
        assert r.status_code == 200
        assert r.headers["x-tag-class"] == "1" and r.headers["x-tag-function"] == "1"


def test_root_path_behind_a_proxy(serve_app):
    """--root-path: the proxy strips the prefix; the schema names it as the server's base."""
    with serve_app(root_path="/api") as app:
        assert httpx.get(app.base_url + "/v1/models").status_code == 200
        schema = httpx.get(app.base_url + "/openapi.json").json()
        assert schema["servers"] == [{"url": "/api"}]


def test_ssl(serve_app, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with serve_app(ssl_keyfile=str(key), ssl_certfile=str(cert)) as app:
        assert app.base_url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        r = httpx.post(app.base_url + "/v1/completions", verify=trusted, timeout=30,
                       json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200, r.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on a TLS port
            httpx.get(app.base_url.replace("https://", "http://") + "/health", timeout=5)


def test_request_logging_with_max_log_len(serve_app, caplog):
    prompt = "abcdefghijklmnopqrstuvwxyz " * 4
    with serve_app(enable_log_requests=True, max_log_len=10) as app, \
            caplog.at_level(logging.INFO, logger="jaxserve.server"):
        r = httpx.post(app.base_url + "/v1/completions", timeout=30,
                       json={"prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if "Received request" in rec.getMessage()]
    assert len(lines) == 1
    assert "prompt: 'abcdefghij'," in lines[0]  # cut to --max-log-len characters
    with serve_app() as app, caplog.at_level(logging.INFO, logger="jaxserve.server"):
        caplog.clear()
        httpx.post(app.base_url + "/v1/completions", timeout=30,
                   json={"prompt": prompt, "max_tokens": 2})
    assert not any("Received request" in rec.getMessage() for rec in caplog.records)


def test_chat_template_flag(serve_app, default_tokenizer):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    with serve_app(chat_template=template) as app:
        r = httpx.post(app.base_url + "/tokenize", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi there"}]})
        assert r.status_code == 200
        expected = default_tokenizer("<user>hi there", add_special_tokens=False).input_ids
        assert r.json()["tokens"] == expected


def test_informational_openai_fields_are_accepted(http):
    body = {"model": SERVED_NAME, "messages": MESSAGES, "max_tokens": 2, "user": "u1",
            "metadata": {"team": "a"}, "store": False, "service_tier": "auto",
            "prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"]}
    assert post_ok(http, "/v1/chat/completions", body)["choices"][0]["message"]["content"] \
        is not None


@pytest.mark.slow
def test_readme_command_serves_the_default_model(default_tokenizer, tmp_path):
    """README's main command, `jaxserve serve` with no model (only a free port here): the
    default model answers the openai client and curl-style raw HTTP."""
    from server_utils import REPO, free_port

    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", "--port",
                                 str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "not ready in 300 s"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        cl = openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0)
        model = cl.models.list().data[0].id
        assert model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = cl.chat.completions.create(model=model, messages=question, max_tokens=32,
                                            temperature=0)
        assert "Paris" in answer.choices[0].message.content
        raw = httpx.post(base + "/v1/chat/completions", timeout=60,
                         json={"messages": question, "max_tokens": 32, "temperature": 0})
        assert raw.json()["choices"][0]["message"]["content"] == \
            answer.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
