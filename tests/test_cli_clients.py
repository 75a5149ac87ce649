"""`jaxserve chat` and `jaxserve complete` against a fake OpenAI-compatible server on loopback
that streams canned replies and records what it was sent. Tests the clients only."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxserve import cli

PIECES = ["Hel", "lo", " world"]


class _FakeOpenAI(BaseHTTPRequestHandler):
    """GET /v1/models lists two models; POST completions stream PIECES as server-sent events.
    The first `server.hang` POSTs get no answer, the next `server.ramble` ones an endless stream;
    `server.gone` is set when the client closes one of those."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        models = [{"id": name, "object": "model", "created": 0, "owned_by": "test"}
                  for name in ("fake-model", "other-model")]
        body = json.dumps({"object": "list", "data": models}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "auth": self.headers["Authorization"], "body": request})
        chat = self.path.endswith("/chat/completions")
        if self.server.hang > 0:  # a request that never gets an answer: wait for the client to go
            self.server.hang -= 1
            self.server.received.set()
            self.rfile.read(1)  # b"" once the client closes the connection
            self.server.gone.set()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        rambles, self.server.ramble = self.server.ramble > 0, self.server.ramble - 1
        for piece in _forever(PIECES) if rambles else PIECES:
            try:
                self._send_chunk(chat, request, piece)
            except OSError:  # the client closed the stream: the reply was stopped
                self.server.gone.set()
                return
        self.wfile.write(b"data: [DONE]\n\n")

    def _send_chunk(self, chat: bool, request: dict, piece: str) -> None:
        if chat:
            choice = {"index": 0, "delta": {"role": "assistant", "content": piece},
                      "finish_reason": None}
        else:
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
        chunk = {"id": "x", "created": 0, "model": request["model"], "choices": [choice],
                 "object": "chat.completion.chunk" if chat else "text_completion"}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()


def _forever(pieces: list[str]):
    """`pieces` over and over, a little slower than a model (a reply that never ends)."""
    while True:
        for piece in pieces:
            yield piece
            time.sleep(0.01)


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    httpd.requests = []
    httpd.hang = httpd.ramble = 0  # how many requests, from the first, hang or never end
    httpd.received, httpd.gone = threading.Event(), threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_chat_quick_prints_the_stream(server, capsys):
    httpd, url = server
    assert cli.main(["chat", "--url", url, "-q", "hi there"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    [request] = httpd.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer EMPTY"
    assert request["body"]["model"] == "fake-model" and request["body"]["stream"] is True
    assert request["body"]["messages"] == [{"role": "user", "content": "hi there"}]


def test_chat_repl_sends_the_history(server, capsys, monkeypatch):
    httpd, url = server
    monkeypatch.setattr("sys.stdin", io.StringIO("first\n\nsecond\n"))
    assert cli.main(["chat", "--url", url, "--model-name", "other-model", "--api-key", "k",
                     "--system-prompt", "Be brief."]) == 0
    assert capsys.readouterr().out == "Hello world\nHello world\n"
    assert [r["body"]["model"] for r in httpd.requests] == ["other-model", "other-model"]
    assert httpd.requests[1]["auth"] == "Bearer k"
    assert httpd.requests[1]["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "second"}]


def test_complete_quick_and_repl(server, capsys, monkeypatch):
    httpd, url = server
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert cli.main(["complete", "--url", url, "--max-tokens", "5", "-q", "Once"]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    [request] = httpd.requests
    assert request["path"] == "/v1/completions" and request["auth"] == "Bearer from-env"
    assert request["body"]["prompt"] == "Once" and request["body"]["max_tokens"] == 5
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert cli.main(["complete", "--url", url]) == 0
    assert capsys.readouterr().out == "Hello world\nHello world\n"
    assert [r["body"]["prompt"] for r in httpd.requests[1:]] == ["a", "b"]
    assert httpd.requests[1]["body"]["max_tokens"] == cli.CLIENT_MAX_TOKENS


def test_unreachable_server_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    assert cli.main(["chat", "--url", f"http://127.0.0.1:{port}/v1", "--model-name", "m",
                     "-q", "hi"]) == 1
    assert capsys.readouterr().err.startswith("jaxserve: error: ")


def test_max_tokens_and_temperature(server, capsys):
    httpd, url = server
    assert cli.main(["chat", "--url", url, "-q", "hi"]) == 0
    body = httpd.requests[-1]["body"]
    assert body["max_tokens"] == cli.CLIENT_MAX_TOKENS == 512 and "temperature" not in body
    assert cli.main(["chat", "--url", url, "--max-tokens", "7", "--temperature", "0", "-q",
                     "hi"]) == 0
    assert (httpd.requests[-1]["body"]["max_tokens"], httpd.requests[-1]["body"]["temperature"]
            ) == (7, 0.0)
    assert cli.main(["complete", "--url", url, "--temperature", "0.5", "-q", "Once"]) == 0
    body = httpd.requests[-1]["body"]
    assert (body["max_tokens"], body["temperature"]) == (cli.CLIENT_MAX_TOKENS, 0.5)
    assert capsys.readouterr().out == "Hello world\n" * 3


class _CtrlCAt:
    """stdout that takes Ctrl-C (raises KeyboardInterrupt) when the reply has `after` pieces."""

    def __init__(self, after: int):
        self.after, self.pieces, self.text = after, 0, []

    def write(self, text: str) -> None:
        if text != "\n":
            self.pieces += 1
            if self.pieces == self.after + 1:
                raise KeyboardInterrupt
        self.text.append(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("command", ["chat", "complete"])
def test_ctrl_c_in_a_reply_stops_it_and_returns_to_the_prompt(server, monkeypatch, capsys,
                                                               command):
    httpd, url = server
    httpd.ramble = 1  # the first reply never ends
    out = _CtrlCAt(after=4)
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    assert cli.main([command, "--url", url]) == 0
    assert httpd.gone.wait(10), "the stopped reply's stream was not closed"
    assert "".join(out.text) == "Hello worldHel\nHello world\n"
    assert "(reply stopped)" in capsys.readouterr().err
    if command == "chat":  # the stopped reply, as shown, is part of the conversation
        assert httpd.requests[1]["body"]["messages"] == [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "Hello worldHel"},
            {"role": "user", "content": "second"}]


def test_ctrl_c_in_a_quick_reply_exits_130(server, monkeypatch):
    httpd, url = server
    httpd.ramble = 1
    monkeypatch.setattr("sys.stdout", _CtrlCAt(after=2))
    assert cli.main(["chat", "--url", url, "-q", "hi"]) == 130
    assert httpd.gone.wait(10)


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigint_in_a_real_session(server):
    """`jaxserve chat` in its own process, interrupted by real SIGINTs: one while it waits for a
    reply that never comes (the request is dropped, the prompt returns), one at the prompt (exits
    with 0). No traceback either time."""
    httpd, url = server
    httpd.hang = 1
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = "127.0.0.1"
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "chat", "--url", url,
                             "--model-name", "fake-model"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")),
                              daemon=True)
    reader.start()
    try:
        _wait_for(lambda: "".join(err).count("> ") == 1, "the first prompt")
        proc.stdin.write("first\n")
        proc.stdin.flush()
        assert httpd.received.wait(60)
        proc.send_signal(signal.SIGINT)
        assert httpd.gone.wait(30), "the interrupted request was not dropped"
        _wait_for(lambda: "".join(err).count("> ") == 2, "the prompt after Ctrl-C")
        proc.stdin.write("second\n")
        proc.stdin.flush()
        _wait_for(lambda: "".join(err).count("> ") == 3, "the prompt after the second reply")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    reader.join(10)
    assert proc.stdout.read() == "Hello world\n"
    assert "Traceback" not in "".join(err) and "(reply stopped)" in "".join(err)
    assert [r["body"]["messages"][-1]["content"] for r in httpd.requests] == ["first", "second"]
    assert len(httpd.requests[1]["body"]["messages"]) == 1  # "first" got no reply: dropped
